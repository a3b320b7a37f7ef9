"""An independent client in another language reads the API from proto/:
Node.js with grpc-js, the proto loaded at run time (tests/integration/node).

Node.js is part of the project's machines, so a missing ``node`` or ``npm``
fails the test; set TASKMAN_ALLOW_NO_NODE=1 to skip it on a machine without
them. The client's packages are installed once per lock file (``npm ci``)
into a cache directory outside the checkout.
"""

import base64
import datetime
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from server_harness import REPO

pytestmark = pytest.mark.timeout(300)

NODE_DIR = Path(__file__).resolve().parent / "node"


def certs_dir(server) -> Path:
    """Where client001's bundle is: the server's own PKI if it made one, else
    where the CLI finds it ($TASKMAN_CERTS_DIR)."""
    own = Path(server.state_dir) / "pki"
    if (own / "client001.crt").exists():
        return own
    from taskman import tls

    ca, _, _ = tls.client_files("client001")
    return Path(ca).parent


@pytest.fixture(scope="module")
def node_client(tmp_path_factory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        if os.environ.get("TASKMAN_ALLOW_NO_NODE") == "1":
            pytest.skip("node/npm not installed (TASKMAN_ALLOW_NO_NODE=1)")
        pytest.fail("node and npm are needed for the independent client test "
                    "(set TASKMAN_ALLOW_NO_NODE=1 to skip it)")
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "taskman-tests" / ("node-" + hashlib.sha256(lock).hexdigest()[:16])
    if not (target / "node_modules" / "@grpc" / "grpc-js").is_dir():
        staging = tmp_path_factory.mktemp("npm")
        for name in ("package.json", "package-lock.json"):
            shutil.copy(NODE_DIR / name, staging / name)
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                                cwd=staging, capture_output=True, timeout=240)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
    shutil.copy(NODE_DIR / "client.js", target / "client.js")
    return target


def test_node_client_reads_offsets_streams_and_times(server, node_client):
    script = "printf 'out1\\n'; printf 'err1\\n' >&2; sleep 0.1; printf 'out2\\n'; exit 0"
    result = subprocess.run(
        ["node", str(node_client / "client.js"), server.address, str(certs_dir(server)), "client001",
         str(REPO / "proto"), "sh", "-c", script],
        capture_output=True, timeout=120, cwd=node_client)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    answer = json.loads(result.stdout)
    assert answer["status"] == "JOB_STATUS_EXITED_OK"
    assert answer["version"]
    chunks = answer["chunks"]
    data = [base64.b64decode(chunk["output"]) for chunk in chunks]
    # Offsets count the combined output: each chunk starts where the last ended.
    assert chunks[0]["offset"] == 0
    for (chunk, part), after in zip(zip(chunks, data, strict=True), chunks[1:], strict=False):
        assert after["offset"] == chunk["offset"] + len(part)
    by_stream = {}
    for chunk, part in zip(chunks, data, strict=True):
        by_stream.setdefault(chunk["stream"], b"")
        by_stream[chunk["stream"]] += part
    assert by_stream == {"OUTPUT_STREAM_STDOUT": b"out1\nout2\n",
                         "OUTPUT_STREAM_STDERR": b"err1\n"}
    times = [chunk["time"] for chunk in chunks]
    now_ms = datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000
    assert all(now_ms - 120_000 < moment <= now_ms for moment in times)
    assert b"".join(base64.b64decode(part) for part in answer["stderr"]) == b"err1\n"
