"""Shared fixtures. gevent is patched before anything else is imported, as in
the server: the library's greenlets, pipes and child watchers need the hub.

TASKMAN_REQUIRE_CGROUPS=1 (set by .ci/run) says this host has root and
cgroups, so a run that tested without them must not pass: a test skipped for
want of root or cgroups (support.NEEDS_ROOT_OR_CGROUPS) fails instead, and
TASKMAN_TEST_CGROUP_DRIVER=none is refused.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

import pytest  # noqa: E402

from support import needs_root_or_cgroups  # noqa: E402

REQUIRE_CGROUPS = os.environ.get("TASKMAN_REQUIRE_CGROUPS") == "1"


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    return str(path)


def pytest_configure(config):
    if REQUIRE_CGROUPS and os.environ.get("TASKMAN_TEST_CGROUP_DRIVER") == "none":
        raise pytest.UsageError("TASKMAN_REQUIRE_CGROUPS=1 refuses TASKMAN_TEST_CGROUP_DRIVER=none:"
                                " the integration suite would run without cgroups")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_CGROUPS and report.skipped and isinstance(report.longrepr, tuple)):
        return
    reason = report.longrepr[2]
    if needs_root_or_cgroups(reason):
        report.outcome = "failed"
        report.longrepr = (f"{reason}\nTASKMAN_REQUIRE_CGROUPS=1: this test must not skip for want"
                           " of root or cgroups")


def pytest_report_header(config):
    required = "required" if REQUIRE_CGROUPS else "optional (TASKMAN_REQUIRE_CGROUPS unset)"
    return f"running as uid {os.geteuid()}; root and cgroups {required}"
