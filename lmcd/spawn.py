"""Start an `lmcd serve` of one's own (for `lmcd bench --spawn`, GPU checks,
and the benchmark suite) and stop it cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lmcd.client import Client, Unreachable
from lmcd.errors import LmcdError
from lmcd.wire.lmcache03 import RequestType


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    port: int, proc: subprocess.Popen[str] | None = None, timeout: float = 60.0
) -> None:
    """Return once the daemon on `port` answers NOOP; raises `LmcdError` if
    it exits or does not answer within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with Client("127.0.0.1", port) as client:
        while True:
            try:
                client.call(RequestType.NOOP, timeout=1.0)
                return
            except Unreachable:
                exited = proc is not None and proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    raise LmcdError("the spawned daemon did not start") from None


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """SIGINT (a clean shutdown), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_command(port: int, *flags: str) -> list[str]:
    """The command line of `lmcd serve` on loopback port `port`, plus `flags`."""
    return [
        sys.executable,
        "-m",
        "lmcd",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]


@contextmanager
def spawned_daemon(*flags: str, log_level: str = "warning") -> Iterator[int]:
    """Run `lmcd serve FLAGS` on a free loopback port; yields the port once
    it answers. Its log goes to this process's stderr."""
    port = free_port()
    args = serve_command(port, "--log-level", log_level, *flags)
    proc = subprocess.Popen(args, text=True)
    try:
        wait_ready(port, proc)
        yield port
    finally:
        stop(proc)
