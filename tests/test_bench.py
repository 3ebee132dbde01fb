"""`lmcd bench` against a live daemon: its JSON carries the promised fields."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Server, free_port


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcd", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_control_and_data_plane_json(server: Server) -> None:
    result = bench(
        "--port",
        str(server.port),
        "--workload",
        "all",
        "--duration",
        "0.3",
        "--keys",
        "8",
        "--layers",
        "2",
        "--heads",
        "2",
        "--head-size",
        "64",
        "--chunks",
        "2",
        "--rounds",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for name in ("noop", "lookup"):
        row = out[name]
        assert row["requests"] > 0
        assert row["rps"] > 0
        assert 0 < row["p50_us"] <= row["p99_us"] <= row["p999_us"]
    for name in ("store", "retrieve"):
        row = out[name]
        assert row["gbps"] > 0
        assert row["memcpy_gbps"] > 0
        assert row["bytes"] == 2 * 2 * (2 * 2 * 256 * 128 * 2)
        assert row["ratio_to_memcpy"] > 0
    assert out["cuda"] == {"skipped": "no CUDA device"} or "passed" in out["cuda"]


def test_table_output(server: Server) -> None:
    result = bench(
        "--port", str(server.port), "--workload", "noop", "--duration", "0.2"
    )
    assert result.returncode == 0, result.stderr
    assert "requests/s" in result.stdout
    assert "noop" in result.stdout


def test_no_daemon_is_a_one_line_error() -> None:
    result = bench("--port", str(free_port()), "--workload", "noop")
    assert result.returncode == 1
    assert "connection refused at tcp://127.0.0.1:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_workload() -> None:
    result = bench("--workload", "everything")
    assert result.returncode == 2
    assert "--workload must be one of" in result.stderr


def test_spawn_starts_and_stops_its_own_daemon() -> None:
    result = bench("--spawn", "--workload", "noop", "--duration", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["noop"]["requests"] > 0
    assert out["target"].startswith("tcp://127.0.0.1:")
