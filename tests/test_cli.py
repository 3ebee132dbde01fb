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
        (["serve", "--chunk-size", "0"], "--chunk-size must be in 1.."),
        (["serve", "--cpu-buffer-size", "0"], "--cpu-buffer-size must be > 0"),
        (["serve", "--cpu-buffer-size", "-3"], "--cpu-buffer-size must be > 0"),
        (["serve", "--cpu-buffer-size", "inf"], "--cpu-buffer-size must be > 0"),
        (["serve", "--cpu-buffer-size", "nan"], "--cpu-buffer-size must be > 0"),
        (["serve", "--cpu-buffer-size", "1e300"], "at most 1048576 GiB"),
        (["serve", "--port", "70000"], "--port must be in 0..65535"),
        (["serve", "--port", "abc"], "'--port'"),
        (["serve", "--max-workers", "0"], "--max-workers must be in 1.."),
        (["serve", "--lock-ttl", "inf"], "--lock-ttl must be > 0"),
        (["serve", "--segment-mb", "0"], "--segment-mb must be in 1.."),
        (["serve", "--staging-mb", "-1"], "--staging-mb must be in 1.."),
        (["serve", "--prepare-ahead-mb", "-1"], "--prepare-ahead-mb must be in"),
        (["serve", "--worker-timeout", "0"], "--worker-timeout must be > 0"),
        (["serve", "--pool-size", "-1"], "--pool-size must be in 0.."),
        (["serve", "--log-level", "loud"], "--log-level must be one of"),
        (["serve", "--dialect", "bogus"], "bogus"),
        (["serve", "--shm-owners", "root"], "--shm-owners"),
        (["serve", "--port-file", "/nonexistent/dir/port"], "--port-file"),
        (["serve", "--host", "bogus.invalid"], "--host 'bogus.invalid'"),
        (
            ["serve", "--port", "5999", "--metrics-port", "5999"],
            "--metrics-port must differ from --port",
        ),
        (["serve", "--metrics-port", "-1"], "--metrics-port must be in 0..65535"),
        (["serve", "--no-such-flag"], "--no-such-flag"),
        (["inspect", "--timeout", "-1"], "--timeout must be > 0"),
        (["inspect", "--timeout", "inf"], "--timeout must be > 0"),
        (["inspect", "--port", "99999"], "--port must be in 1..65535"),
        (["inspect", "--port", "0"], "--port must be in 1..65535"),
        (["inspect", "--host", "bogus.invalid"], "--host 'bogus.invalid'"),
        (["inspect", "--watch", "0"], "--watch must be > 0"),
        (["inspect", "--watch", "-1"], "--watch must be > 0"),
        (["bench", "--layers", "0"], "--layers must be in 1..4096"),
        (["bench", "--heads", "0"], "--heads must be in 1.."),
        (["bench", "--head-size", "0"], "--head-size must be in 1.."),
        (["bench", "--block-size", "0"], "--block-size must be in 1.."),
        (["bench", "--dtype", "bogus"], "--dtype must be one of"),
        (["bench", "--workload", "bogus"], "--workload must be one of"),
        (["bench", "--clients", "0"], "--clients must be in 1.."),
        (["bench", "--duration", "inf"], "--duration must be > 0"),
        (["bench", "--keys", "0"], "--keys must be in 1.."),
        (["bench", "--chunks", "0"], "--chunks must be in 1.."),
        (["bench", "--rounds", "0"], "--rounds must be in 1.."),
        (["bench", "--warmup", "-1"], "--warmup must be in 0.."),
        (["bench", "--port", "99999"], "--port must be in 1..65535"),
        (["bench", "--host", "bogus.invalid"], "--host 'bogus.invalid'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags: list[str], message: str) -> None:
    result = run_lmcd(*flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("lmcd: error: ")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_bench_shape_leaves_no_shm_file() -> None:
    import os

    before = set(os.listdir("/dev/shm"))
    result = run_lmcd("bench", "--layers", "0", "--workload", "store")
    assert result.returncode == 2
    assert not {f for f in set(os.listdir("/dev/shm")) - before if "lmcd" in f}


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_connection_refused_is_said_at_once(command: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    extra = ["--timeout", "10"] if command == "inspect" else []
    result = run_lmcd(command, "--port", str(port), *extra)
    assert time.monotonic() - started < 8  # not the 10 s timeout (+ start-up)
    assert result.returncode == 1
    assert "connection refused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_refuses_a_shape_the_daemon_cannot_hold(
    server_factory: list[Server],
) -> None:
    s = start_server("--cpu-buffer-size", "0.1", "--segment-mb", "16")
    server_factory.append(s)
    # The default shape makes 32 MiB chunks.
    result = run_lmcd("bench", "--port", str(s.port), "--workload", "store")
    assert result.returncode == 2, result.stderr
    assert "--segment-mb" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_version_and_short_help() -> None:
    from lmcd import __version__

    version = run_lmcd("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"lmcd {__version__}"
    for args in (["-h"], ["serve", "-h"], ["inspect", "-h"], ["bench", "-h"]):
        result = run_lmcd(*args)
        assert result.returncode == 0, args
        assert "Usage" in result.stdout


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


def test_clear_drops_chunks_and_reset_stats_zeroes_counters(
    server_factory: list[Server],
) -> None:
    from lmcd.bench import prefill_lookup_keys
    from lmcd.client import Client
    from lmcd.wire.lmcache03 import RequestType

    s = start_server("--cpu-buffer-size", "0.05", "--segment-mb", "16")
    server_factory.append(s)
    prefill_lookup_keys("127.0.0.1", s.port, 3, model="a")
    prefill_lookup_keys("127.0.0.1", s.port, 2, model="b")
    port = str(s.port)
    # Not on a terminal and no --yes: refused, nothing dropped.
    refused = run_lmcd("clear", "--port", port)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    one = run_lmcd("clear", "--port", port, "--model", "a", "--yes")
    assert one.returncode == 0, one.stderr
    assert "dropped 3 chunks" in one.stdout
    with Client("127.0.0.1", s.port) as client:
        stats = client.stats()
        assert set(stats["models"]) == {"b"}
        # A locked chunk is in use: DROP leaves it.
        hit = {"model_name": "b", "world_size": 1, "worker_id": 0}
        client.call(RequestType.LOOKUP, [{**hit, "chunk_hash": b"hit\0\0\0\0"}], True)
    every = run_lmcd("clear", "--port", port, "-y")
    assert every.returncode == 0, every.stderr
    assert "dropped 1 chunks" in every.stdout
    assert stats["stores"] == 5
    reset = run_lmcd("reset-stats", "--port", port)
    assert reset.returncode == 0, reset.stderr
    with Client("127.0.0.1", s.port) as client:
        after = client.stats()
    assert after["stores"] == after["lookups"] == after["cleared_chunks"] == 0
    assert after["requests"] <= 2  # at most the STATS just asked
    assert after["chunks"] == 1  # gauges stay
    assert after["locked_chunks"] == 1
