"""Who may do what: each RPC by the owner, another user, admin, and on an unknown task.

"Not yours" and "not there" must be the same NOT_FOUND, so other users' task
ids cannot be discovered.
"""

import pytest

pytestmark = pytest.mark.timeout(120)

UNKNOWN = "a7da14c7-b47a-4535-a263-5bb26e503002"
NOT_FOUND = 4


@pytest.fixture
def finished_task(cli):
    task_id = cli.start_id("client001", "sh", "-c", "echo owned-by-client001")
    cli.wait_ended(task_id)
    return task_id


def assert_not_found(result, task_id):
    """The one answer for a task that is not there or not the caller's."""
    assert result.returncode == NOT_FOUND
    assert result.stderr.decode() == f"taskman: task {task_id} not found\n"


@pytest.mark.parametrize("user, allowed", [("client001", True), ("admin", True),
                                           ("client002", False)])
def test_get_status(cli, finished_task, user, allowed):
    result = cli.run("get-status", finished_task, user=user)
    if allowed:
        assert result.returncode == 0, result.stderr
        assert finished_task in result.stdout.decode()
    else:
        assert_not_found(result, finished_task)
        assert result.stdout == b""


@pytest.mark.parametrize("user, allowed", [("client001", True), ("admin", True),
                                           ("client002", False)])
def test_stream(cli, finished_task, user, allowed):
    result = cli.run("stream", finished_task, user=user)
    if allowed:
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"owned-by-client001\n"
    else:
        assert_not_found(result, finished_task)
        assert result.stdout == b""


@pytest.mark.parametrize("user, allowed", [("client001", True), ("admin", True),
                                           ("client002", False)])
def test_stop(cli, user, allowed):
    task_id = cli.start_id("client001", "sleep", "60")
    try:
        result = cli.run("stop", task_id, user=user)
        if allowed:
            assert result.returncode == 0, result.stderr
            row = cli.wait_ended(task_id)
            assert row["STATUS"] == "JOB_STATUS_SIGNALED" and row["SOURCE"] == "user"
        else:
            assert_not_found(result, task_id)
            assert cli.status_row(task_id)["STATUS"] == "JOB_STATUS_STARTED"
    finally:
        cli.run("stop", task_id, user="client001")


@pytest.mark.parametrize("command", ["get-status", "stop", "stream"])
@pytest.mark.parametrize("user", ["client001", "client002", "admin"])
def test_unknown_task_is_not_found_for_everyone(cli, command, user):
    result = cli.run(command, UNKNOWN, user=user)
    assert_not_found(result, UNKNOWN)


@pytest.mark.parametrize("user", ["client001", "client002", "admin"])
def test_anyone_with_a_certificate_may_start_and_owns_the_task(cli, user):
    task_id = cli.start_id(user, "true")
    cli.wait_ended(task_id, user=user)
    others = {"client001", "client002"} - {user}
    for other in others:
        assert cli.run("get-status", task_id, user=other).returncode == NOT_FOUND
    assert cli.run("get-status", task_id, user="admin").returncode == 0


def test_tasks_run_as_their_owner_in_the_environment(cli):
    task_id = cli.start_id("client002", "sh", "-c", 'echo "$TASKMAN_USER"')
    cli.wait_ended(task_id, user="client002")
    assert cli.run("stream", task_id, user="client002").stdout == b"client002\n"
