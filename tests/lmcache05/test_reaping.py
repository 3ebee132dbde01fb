"""A worker that dies without unregistering (LMCache #3206): lmcd notices
the silence of its heartbeat and releases its registration."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lmcd.benchmarks.lmcache05 import LMCD, ServerOptions, running_server
from lmcd.client import Client
from tests.lmcache05.helpers import CHUNK

WORKER = textwrap.dedent(
    """
    import sys, time
    from lmcd.benchmarks.lmcache05 import LMCACHE_DRIVEN, Worker, zmq_context
    from tests.lmcache05.helpers import CHUNK, LAYOUT, prompt

    worker = Worker.start(
        sys.argv[1], zmq_context(), model="reap", layout=LAYOUT, mode=LMCACHE_DRIVEN
    )
    # The first store starts the worker's heartbeat (ping with its id).
    assert worker.store("reap-store", prompt(2 * CHUNK), [1, 2, 3, 4])
    print("ready", flush=True)
    time.sleep(120)
    """
)


def _instances(port: int) -> tuple[int, int]:
    with Client("127.0.0.1", port) as client:
        stats = client.stats(timeout=5.0)
    return len(stats["instances"]), stats["reaped_workers"]


def test_a_dead_worker_is_reaped(tmp_path: Path) -> None:
    options = ServerOptions(chunk_size=CHUNK, lmcd_flags=("--worker-timeout", "2"))
    with running_server(LMCD, options, tmp_path) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, server.url],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            assert _instances(server.port) == (1, 0)
            proc.kill()  # no unregister, no more pings
            proc.wait(10)
            deadline = time.monotonic() + 20
            while _instances(server.port) != (0, 1):
                assert time.monotonic() < deadline, "the dead worker was not reaped"
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        assert "silent for over" in server.log_path.read_text()
