"""Fixtures: a real taskman-server per test module, torn down with SIGTERM.

One PKI is generated for the whole run (server_harness.session_pki) and named
by TASKMAN_CERTS_DIR; every server starts with a copy of it.

gRPC objects made in this process (the tests that speak gRPC directly) need
grpc's gevent integration, since tests/conftest.py patched gevent; and gRPC's
fork handlers off, since the tests fork the CLI (docs/design.md: with them on,
a few percent of forked children die before exec).
"""

import os

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

import grpc  # noqa: E402
import grpc.experimental.gevent  # noqa: E402
import pytest  # noqa: E402
from server_harness import Cli, Server, session_pki, started_servers  # noqa: E402

grpc.experimental.gevent.init_gevent()
# Before the test modules are imported: some read certificate paths at import.
SESSION_PKI = session_pki()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; its exit status on SIGTERM must be 0."""
    instance = Server(tmp_path_factory.mktemp("server")).start()
    yield instance
    status = instance.stop()
    assert status == 0, f"taskman-server exited with {status} on SIGTERM:\n{instance.log()}"


@pytest.fixture
def cli(server):
    return Cli(server)


@pytest.fixture
def start_server(tmp_path):
    """Start extra servers with options of the test's choosing; all stopped after."""
    yield from started_servers(tmp_path)


def pytest_report_header(config):
    from server_harness import DRIVER, program

    return (f"integration: {' '.join(program('taskman-server'))}, {' '.join(program('taskman'))}; "
            f"cgroup driver {DRIVER} (TASKMAN_TEST_CGROUP_DRIVER)")
