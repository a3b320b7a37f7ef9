"""Install script; the metadata lives in setup.cfg.

The one build step beyond copying Python files: compile the task gate
(taskman/gate/taskman-gate.c), the small program every task starts as (see
taskman/sandbox.py), with the system C compiler into the installed package.
"""
import os
import shlex
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

GATE_SOURCE = os.path.join("taskman", "gate", "taskman-gate.c")
GATE_BINARY = os.path.join("taskman", "gate", "taskman-gate")
CFLAGS = ["-O2", "-Wall", "-Werror"]


def find_compiler() -> list:
    """Return the compiler command ($CC, else cc, else gcc); raise SetupError if none."""
    configured = shlex.split(os.environ.get("CC", ""))
    if configured and shutil.which(configured[0]):
        return configured
    for name in ("cc", "gcc"):
        if shutil.which(name):
            return [name]
    raise SetupError(
        f"taskman needs a C compiler to build its task gate ({GATE_SOURCE}), and none was found "
        "(tried $CC, cc, gcc). Install one (Debian/Ubuntu: apt-get install gcc; "
        "Fedora/RHEL: dnf install gcc) and run the install again.")


def compile_gate(target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    command = [*find_compiler(), *CFLAGS, "-o", target, GATE_SOURCE]
    print(" ".join(command))
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as error:
        raise SetupError(f"compiling the task gate failed: {' '.join(command)} exited {error.returncode}") \
            from None
    # Never setuid: the server runs it as root and it drops to the task's user.
    os.chmod(target, 0o755)


class BuildPyWithGate(build_py):
    """build_py, then the gate: into the build tree, or beside the source for `pip install -e`."""

    def run(self):
        super().run()
        # An editable install imports taskman/ from the checkout itself.
        in_place = getattr(self, "editable_mode", False)
        compile_gate(GATE_BINARY if in_place else os.path.join(self.build_lib, GATE_BINARY))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, os.path.join(self.build_lib, GATE_BINARY)]


setup(cmdclass={"build_py": BuildPyWithGate})
