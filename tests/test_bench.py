"""`lmcd bench` against a live daemon: its JSON carries the promised fields."""

from __future__ import annotations

import json
import subprocess
import sys

from lmcd.wire.lmcache03 import RequestType
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


COUNTERS = {
    "uptime_s",
    "lookups",
    "lookup_hit_chunks",
    "lookup_miss_chunks",
    "stores",
    "stored_chunks",
    "stored_bytes",
    "store_skipped_chunks",
    "retrieves",
    "retrieved_chunks",
    "retrieved_bytes",
    "requests",
    "requests_by_type",
    "requests_by_dialect",
    "connections_by_dialect",  # identities seen, a count
    "cleared_chunks",
    "listener",
    "allocated_bytes",  # lazily prepared memory grows; it is not content
    "preparing_bytes",
    "segments",
}


def _contents(stats: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in stats.items() if k not in COUNTERS}


def test_live_daemon_left_as_it_was(server: Server) -> None:
    """A bench run against a live daemon leaves its chunks, locks, models,
    instances and non-counter statistics as they were, and evicts nothing."""
    from lmcd.bench import prefill_lookup_keys
    from lmcd.client import Client

    prefill_lookup_keys("127.0.0.1", server.port, 5, model="live-model")
    with Client("127.0.0.1", server.port) as client:
        client.call(RequestType.LOOKUP, [key(0)], True)  # one real lock held
        before = client.stats()
    assert before["models"]["live-model"]["chunks"] == 5
    assert before["locked_chunks"] == 1
    result = bench(
        "--port", str(server.port), "--workload", "all", "--duration", "0.3",
        "--keys", "8", "--layers", "2", "--heads", "2", "--head-size", "64",
        "--chunks", "2", "--rounds", "3", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["lookup"]["requests"] > 0
    assert out["store"]["requests"] == 3
    with Client("127.0.0.1", server.port) as client:
        after = client.stats()
        # The live chunks still hit (and their lock is still held).
        assert (
            client.call(RequestType.LOOKUP, [key(i) for i in range(5)], False)
            == [True] * 5
        )
    assert _contents(after) == _contents(before)
    assert after["stores"] > before["stores"]  # the bench did run against it


def key(i: int) -> dict[str, object]:
    return {
        "model_name": "live-model",
        "world_size": 1,
        "worker_id": 0,
        "chunk_hash": b"hit" + i.to_bytes(4, "big"),
    }


def test_default_is_a_private_daemon() -> None:
    result = bench("--workload", "noop", "--duration", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    target = json.loads(result.stdout)["target"]
    assert target.startswith("tcp://127.0.0.1:")
    assert not target.endswith(":5555")


def test_spawn_with_a_target_is_refused() -> None:
    result = bench("--spawn", "--port", "5555")
    assert result.returncode == 2
    assert "--spawn" in result.stderr


def test_a_dead_daemon_is_noticed_within_seconds() -> None:
    """A client waiting on a long request notices at once (not after its
    timeout) that nothing listens any more."""
    import threading
    import time

    import pytest
    import zmq

    from lmcd.client import Client, Unreachable

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # takes requests, never answers
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client("127.0.0.1", port) as client:
            threading.Timer(0.5, lambda: router.close(linger=0)).start()
            started = time.monotonic()
            with pytest.raises(Unreachable, match="stopped answering"):
                client.call(RequestType.NOOP, timeout=120)
            assert time.monotonic() - started < 5
    finally:
        ctx.destroy(linger=0)
