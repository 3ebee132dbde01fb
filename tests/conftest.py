"""Fixtures: a live `lmcd serve` subprocess on a loopback port of the
kernel's choosing (`--port 0`, read back from its "listening on" line)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import attrs
import pytest
import zmq

from lmcd.spawn import free_port, serve_command

STARTUP_TIMEOUT = 30.0
# free_port: only for a port that nothing should listen on ("unreachable").
__all__ = ["Server", "free_port", "start_server"]
_LISTENING = re.compile(r"listening on tcp://[^ ]*:(\d+)")
_METRICS = re.compile(r"Metrics on http://[^ ]*:(\d+)/metrics")


@attrs.define
class Server:
    """A running `lmcd serve` and the lines it has logged."""

    proc: subprocess.Popen[str]
    port: int
    lines: list[str] = attrs.field(factory=list)
    pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.lines)

    def mark(self) -> int:
        """A log offset: `log_since(mark)` is what was logged after it."""
        return len(self.lines)

    def log_since(self, mark: int) -> str:
        return "".join(self.lines[mark:])

    @property
    def metrics_port(self) -> int:
        """The bound `--metrics-port` (start with `--metrics-port 0`)."""
        found = _METRICS.search(self.log())
        if found is None:
            raise AssertionError(f"no metrics port logged:\n{self.log()}")
        return int(found.group(1))

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged; log:\n{self.log()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self.close_pipes()

    def close_pipes(self) -> None:
        if self.pump is not None:
            self.pump.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start_server(*args: str) -> Server:
    """`lmcd serve --port 0 ARGS`; returns once it has logged its port."""
    proc = subprocess.Popen(
        serve_command(0, *args),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = Server(proc, 0)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.lines.append(line)

    server.pump = threading.Thread(target=pump, daemon=True)
    server.pump.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while (found := _LISTENING.search(server.log())) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            server.close_pipes()
            raise AssertionError(f"lmcd serve did not start:\n{server.log()}")
        time.sleep(0.02)
    server.port = int(found.group(1))
    return server


def stop_cleanly(s: Server) -> None:
    """SIGINT; the daemon must exit 0 within 5 s (killed and failed if not)."""
    try:
        code = s.stop()
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait()
        s.close_pipes()
        raise
    assert code == 0, s.log()


@pytest.fixture
def server_factory() -> Iterator[list[Server]]:
    """Start servers with `start_server`; each is stopped (and checked) after."""
    servers: list[Server] = []
    yield servers
    for s in servers:
        stop_cleanly(s)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One daemon per test module (start-up imports torch: about a second)."""
    s = start_server("--cpu-buffer-size", "0.25", "--segment-mb", "64")
    yield s
    stop_cleanly(s)


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def client(
    server: Server, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[object]:
    """The real lmcache 0.3.13 client, connected to `server`."""
    from tests.lmcache_client import close_client, open_client

    c = open_client(server.url, zmq_context)
    yield c
    close_client(c)
