"""Start an `lmcd serve` of one's own (for `lmcd bench --spawn`, GPU checks,
and the benchmark suite) and stop it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lmcd.client import Client, Unreachable
from lmcd.errors import LmcdError
from lmcd.wire.lmcache03 import RequestType


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (racy: to
    run a daemon, pass `--port 0` and read the port back instead)."""
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


def wait_port_file(
    path: str, proc: subprocess.Popen[str], timeout: float = 60.0
) -> int:
    """The port a daemon started with `--port-file PATH` wrote, once it has
    (it does so when it serves); raises `LmcdError` if the daemon exits or
    does not write it within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="ascii") as f:
                return int(f.read())
        except FileNotFoundError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LmcdError("the spawned daemon did not start")
        time.sleep(0.05)


@contextmanager
def spawned_daemon(*flags: str, log_level: str = "warning") -> Iterator[int]:
    """Run `lmcd serve FLAGS` on a loopback port of the kernel's choosing
    (`--port 0`, read back through `--port-file`); yields the port once it
    answers. Its log goes to this process's stderr."""
    with tempfile.TemporaryDirectory(prefix="lmcd-spawn-") as tmp:
        port_file = os.path.join(tmp, "port")
        args = serve_command(
            0, "--port-file", port_file, "--log-level", log_level, *flags
        )
        proc = subprocess.Popen(args, text=True)
        try:
            port = wait_port_file(port_file, proc)
            wait_ready(port, proc)
            yield port
        finally:
            stop(proc)
