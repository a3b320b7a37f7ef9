"""Fixtures for the reliability tests: real taskman-server processes (reusing
tests/server_harness.py, shared with the integration and fleet suites), raw gRPC stubs over mTLS, and probes
of what a server leaves behind (descriptors, zombies, output files, cgroups).

As in tests/integration: gRPC's fork handlers off (the tests fork the CLI and
servers) and grpc's gevent integration on (tests/conftest.py patched gevent).
"""

import os

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

import grpc  # noqa: E402
import grpc.experimental.gevent  # noqa: E402
import pytest  # noqa: E402
from reliability_support import ReliableServer  # noqa: E402
from server_harness import session_pki, started_servers  # noqa: E402

grpc.experimental.gevent.init_gevent()
# One PKI per run, named by TASKMAN_CERTS_DIR before the test modules load.
session_pki()


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long load and soak runs (tox -e soak); "
                                       "deselected by default with -m 'not soak'")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; it must exit 0 on SIGTERM and leave nothing behind."""
    instance = ReliableServer(tmp_path_factory.mktemp("server")).start()
    yield instance
    status = instance.stop()
    assert status == 0, f"taskman-server exited with {status} on SIGTERM:\n{instance.log()}"
    assert instance.task_groups() == [], "task cgroups left after shutdown"


@pytest.fixture
def start_server(tmp_path):
    """Start extra servers with options of the test's choosing; all stopped after."""
    yield from started_servers(tmp_path, ReliableServer)
