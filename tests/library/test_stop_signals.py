"""Stop's SIGTERM reaches every process of a task's tree, not only the main one.

Each process of the tree traps SIGTERM, says so on the task's output and
keeps running, so the stop must still end in SIGKILL after the grace: a
"TERM" line can only have been written while its process was alive, and
the test checks all of them arrived while the whole tree still ran. A
driver that signalled only the main pid would leave the child and the
grandchild silent (their SIGKILL comes after the grace all the same).

The cgroup driver must also reach a grandchild that called setsid(); the
``none`` driver signals the process group, which such a process leaves
(see taskman/cgroups/none.py), so its tree has no setsid.
"""

import os
import shutil
import tempfile

import gevent
import pytest

from support import driver_for_tests, poll_for, process_running, processes_of
from taskman.manager import TaskManager
from taskman.task import JobStatus, Source

pytestmark = pytest.mark.timeout(60)

GRACE = 4.0
NAMES = ("main", "child", "grandchild")

# $1: this process's name; $2: "setsid" to start the grandchild in a new session.
TREE = """\
name=$1
trap 'echo "$name TERM"' TERM
case $name in
    main) sh "$0" child "$2" & ;;
    child) if [ "$2" = setsid ]; then setsid sh "$0" grandchild & else sh "$0" grandchild & fi ;;
esac
echo "$name ready $$"
while :; do sleep 0.05; done
"""


@pytest.fixture
def script():
    """The tree's script in a 0755 directory of its own: readable by any task
    user (pytest's tmp_path sits under a 0700 directory)."""
    directory = tempfile.mkdtemp(prefix="taskman-stop-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "tree.sh")
    with open(path, "w") as file:
        file.write(TREE)
    os.chmod(path, 0o644)
    yield path
    shutil.rmtree(directory)


@pytest.mark.parametrize("kind", ["cgroup", "none"])
def test_every_process_of_the_tree_gets_sigterm_before_sigkill(kind, script, state_dir):
    manager = TaskManager(state_dir, driver=driver_for_tests(kind, "-stop"), stop_grace=GRACE)
    try:
        task = manager.start("alice", "sh", [script, "main", "setsid" if kind == "cgroup" else ""])
        output = []
        reader = gevent.spawn(lambda: [output.append(chunk)
                                       for chunk in manager.stream("alice", task.id)])

        def lines():
            return b"".join(output).decode().splitlines()

        def ready():
            return {words[0]: int(words[2]) for words in map(str.split, lines())
                    if words[1] == "ready"}

        poll_for(lambda: set(ready()) == set(NAMES), message="every process to trap SIGTERM")
        shells = ready()

        manager.stop("alice", task.id, wait=0)
        # Within the grace: every process said TERM and none of them has died.
        terms = {f"{name} TERM" for name in NAMES}
        try:
            poll_for(lambda: terms <= set(lines()), timeout=GRACE - 1,
                     message="SIGTERM to reach every process")
        except AssertionError:
            pass  # the assertion below shows who was missed
        assert terms <= set(lines()), lines()
        assert manager.status("alice", task.id).running
        assert all(process_running(pid) for pid in shells.values()), shells

        ended = poll_for(lambda: (lambda t: None if t.running else t)(
            manager.status("alice", task.id)), timeout=GRACE + 10, message="the stop to end")
        assert (ended.status, ended.signal, ended.source) == (JobStatus.SIGNALED, "SIGKILL",
                                                              Source.USER)
        reader.join(timeout=10)
        assert sorted(line for line in lines() if line.endswith("TERM")) == \
            sorted(f"{name} TERM" for name in NAMES)
        poll_for(lambda: not processes_of(task.id), message="the tree to be gone")
    finally:
        manager.shutdown(timeout=15)
