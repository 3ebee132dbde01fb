"""The first-fill benchmark and its control-plane stall probe."""

from __future__ import annotations

import json
import subprocess
import sys

from lmcd.bench import ModelShape, first_fill
from tests.conftest import Server


def test_first_fill_of_a_fresh_daemon_with_the_probe(
    server_factory: list[Server],
) -> None:
    from tests.conftest import start_server

    s = start_server("--cpu-buffer-size", "0.0625", "--segment-mb", "16")
    server_factory.append(s)
    shape = ModelShape(layers=2, heads=2, head_size=64)  # 256 KiB chunks
    fill = first_fill("127.0.0.1", s.port, shape, chunks_per_request=8)
    assert fill.capacity_bytes == 64 << 20
    assert fill.store.requests == 32  # 2 MiB a request fills 64 MiB once
    assert fill.store.bytes + fill.refused_chunks * (256 << 10) == 64 << 20
    assert fill.store.gbps > 0
    assert fill.store.memcpy_gbps > 0
    assert fill.allocated_after_bytes == 64 << 20
    assert fill.probe.requests > 0
    assert 0 < fill.probe.p50_us <= fill.probe.p99_us <= fill.probe.max_ms * 1000


def test_lmcd_bench_spawn_reports_the_first_fill() -> None:
    bench = [sys.executable, "-m", "lmcd", "bench", "--spawn", "--workload", "store"]
    shape = ["--layers", "2", "--heads", "2", "--head-size", "64", "--chunks", "2"]
    result = subprocess.run(
        [*bench, *shape, "--rounds", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    fill = out["first_fill"]
    assert fill["store"]["workload"] == "first-fill store"
    assert fill["store"]["ratio_to_memcpy"] > 0
    assert fill["probe"]["requests"] > 0
    assert out["store"]["gbps"] > 0
