"""`lmcd serve` flags, errors and shutdown, as a user meets them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import Server, start_server


def run_lmcd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chunk-size", "0"], "--chunk-size must be > 0"),
        (["--cpu-buffer-size", "0"], "--cpu-buffer-size must be > 0"),
        (["--cpu-buffer-size", "-3"], "--cpu-buffer-size must be > 0"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--max-workers", "0"], "--max-workers must be >= 1"),
        (["--log-level", "loud"], "--log-level must be one of"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags: list[str], message: str) -> None:
    result = run_lmcd("serve", *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_exits_1_naming_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_lmcd("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert f"tcp://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_daemon_with_exit_0(
    sig: signal.Signals, server_factory: list[Server]
) -> None:
    s = start_server("--cpu-buffer-size", "0.1")
    started = time.monotonic()
    assert s.stop(sig, timeout=5) == 0
    assert time.monotonic() - started < 5
    assert "shutting down" in s.log()


def test_ready_line_names_the_address(server: Server) -> None:
    line = next(x for x in server.lines if "listening on" in x)
    assert f"tcp://127.0.0.1:{server.port}" in line
    assert " INFO " in line  # timestamped, levelled log format


def test_help_lists_the_reference_flags() -> None:
    result = run_lmcd("serve", "--help")
    assert result.returncode == 0
    for flag in (
        "--host",
        "--port",
        "--chunk-size",
        "--cpu-buffer-size",
        "--max-workers",
        "--disable-lazy-alloc",
    ):
        assert flag in result.stdout


def test_disable_lazy_alloc_takes_the_whole_buffer_at_start(
    server_factory: list[Server],
) -> None:
    from lmcd.client import Client

    s = start_server(
        "--cpu-buffer-size", "0.05", "--segment-mb", "16", "--disable-lazy-alloc"
    )
    server_factory.append(s)
    with Client("127.0.0.1", s.port) as client:
        stats = client.stats()
    capacity = int(0.05 * (1 << 30)) // 4096 * 4096  # whole pages
    assert stats["allocated_bytes"] == stats["capacity_bytes"] == capacity
    assert stats["segments"] == 4
    assert stats["used_bytes"] == 0
