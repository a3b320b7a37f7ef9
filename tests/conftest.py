"""Shared fixtures. gevent is patched before anything else is imported, as in
the server: the library's greenlets, pipes and child watchers need the hub."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    return str(path)


def pytest_report_header(config):
    return f"running as uid {os.geteuid()}"
