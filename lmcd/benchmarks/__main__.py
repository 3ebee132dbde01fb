"""Run the whole benchmark suite and print the report (Markdown).

    nox -s bench                      # prints the report
    nox -s bench -- --write-docs      # and rewrites docs/performance.md
    python -m lmcd.benchmarks [--duration 5] [--out build/performance.md]

docs/performance.md holds published figures: it is written only when asked
(`--write-docs`), so a run on a busy machine never replaces them by chance.

Everything is measured in one run on this machine: lmcd, the reference
server (lmcache 0.3.11), a bare pyzmq echo server, memcpy, and the reference
storage manager, so the ratios are same-run ratios.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmcd.bench import (
    FirstFillResult,
    LatencyResult,
    ModelShape,
    ThroughputResult,
    closed_loop,
    data_plane,
    first_fill,
    lookup_payloads,
    prefill_lookup_keys,
)
from lmcd.benchmarks.drive import drive
from lmcd.benchmarks.storage_cycle import lmcd_cycle, reference_cycle
from lmcd.spawn import free_port, serve_command, stop
from lmcd.wire.lmcache03 import RequestType

LOOKUP_KEYS = 64
CLIENTS = 4
DOCS = Path(__file__).resolve().parents[2] / "docs"


@contextmanager
def process(args: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if ready in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start")
        else:
            raise RuntimeError(f"{args} exited before it was ready")
        # Keep reading, or a full pipe would stall the server mid-benchmark.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield proc
    finally:
        stop(proc)  # SIGINT: lmcd shuts down cleanly, the baselines exit
        if proc.stdout is not None:
            proc.stdout.close()


def lmcd_server(port: int, buffer_gib: float) -> list[str]:
    return serve_command(
        port, "--cpu-buffer-size", str(buffer_gib), "--segment-mb", "256"
    )


def baseline_server(kind: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmcd.benchmarks.servers",
        kind,
        "--port",
        str(port),
        "--prefill",
        str(LOOKUP_KEYS),
    ]


Table = dict[str, dict[str, LatencyResult]]


def control_plane(duration: float) -> tuple[Table, Table]:
    """(real lmcache client table, lean generator table) for every server."""
    real: Table = {}
    lean: Table = {}
    workloads: dict[str, dict[str, Any]] = {
        "noop": {"workload": "noop"},
        "lookup-hit": {"workload": "lookup", "n_keys": LOOKUP_KEYS, "hits": True},
        "lookup-miss": {"workload": "lookup", "n_keys": LOOKUP_KEYS, "hits": False},
    }
    servers = {
        "lmcd": (lmcd_server(0, 0.25), "listening on"),
        "reference": (baseline_server("reference", 0), "ready"),
        "echo": (baseline_server("echo", 0), "ready"),
    }
    for name, (template, ready) in servers.items():
        port = free_port()
        command = [
            str(port) if a == "0" and template[i - 1] == "--port" else a
            for i, a in enumerate(template)
        ]
        url = f"tcp://127.0.0.1:{port}"
        rows = {"noop": workloads["noop"]} if name == "echo" else workloads
        with process(command, ready):
            if name == "lmcd":
                prefill_lookup_keys("127.0.0.1", port, LOOKUP_KEYS)
            real[name] = {
                w: drive(url, clients=CLIENTS, duration=duration, **kw)
                for w, kw in rows.items()
            }
            lean[name] = {}
            for w, kw in rows.items():
                if kw["workload"] == "noop":
                    rtype, payloads = RequestType.NOOP, []
                else:
                    rtype = RequestType.LOOKUP
                    payloads = lookup_payloads(LOOKUP_KEYS, bool(kw["hits"]))
                lean[name][w] = closed_loop(
                    url, rtype, payloads, clients=CLIENTS, duration=duration
                )
    return real, lean


def data_plane_phases(
    shape: ModelShape, buffer_gib: float, rounds: int
) -> tuple[FirstFillResult, ThroughputResult, ThroughputResult]:
    """A fresh daemon: its first fill (with the stall probe), then the
    steady state on the full buffer."""
    port = free_port()
    with process(lmcd_server(port, buffer_gib), "listening on"):
        fill = first_fill("127.0.0.1", port, shape, chunks_per_request=8)
        store, retrieve = data_plane(
            "127.0.0.1", port, shape, chunks_per_request=8, rounds=rounds, warmup=1
        )
    return fill, store, retrieve


def first_fill_section(fill: FirstFillResult, buffer_gib: float) -> list[str]:
    f, p = fill.store, fill.probe
    return [
        "### First fill",
        "",
        f"A fresh daemon (`--cpu-buffer-size {buffer_gib:g} --segment-mb 256`,",
        "default `--prepare-ahead-mb`), once it has prepared that lead, takes",
        "STOREs only, back to back, until its buffer is full once; segments",
        "are prepared (mapped, populated, pinned with CUDA) in worker threads",
        "ahead of the fill. Meanwhile a second client sends a NOOP or a",
        "LOOKUP (8 keys, alternately) every 2 ms and times each round trip:",
        "the control plane's stalls while segments are being allocated.",
        "Chunks evicted during the fill are those the fill stored faster than",
        "segments could be prepared (evicted rather than waited for).",
        "",
        "| first fill | figure | |",
        "| --- | --- | --- |",
        f"| store GB/s (memcpy GB/s) | {f.gbps:.2f} ({f.memcpy_gbps:.2f}) | |",
        f"| ratio to memcpy, target >= 50% | {f.ratio:.0%} | {check(f.ratio >= 0.5)} |",
        f"| prepared when the fill began | "
        f"{fill.allocated_before_bytes / (1 << 30):.2f} of "
        f"{fill.capacity_bytes / (1 << 30):.2f} GiB | |",
        f"| chunks refused / evicted; outruns | {fill.refused_chunks} / "
        f"{fill.evicted_chunks}; {fill.outruns} | |",
        f"| control-plane round trips (p50, p99) | {p.requests:,} "
        f"({p.p50_us:,.0f} µs, {p.p99_us:,.0f} µs) | |",
        f"| longest round trip, target <= 10 ms | {p.max_ms:.1f} ms "
        f"({p.over_10ms} over 10 ms) | {check(p.max_ms <= 10)} |",
    ]


def latency_table(table: Table) -> list[str]:
    lines = [
        "| server | workload | requests/s | p50 µs | p99 µs | p99.9 µs |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for server, rows in table.items():
        for name, r in rows.items():
            lines.append(
                f"| {server} | {name} | {r.rps:,.0f} | {r.p50_us:,.0f} | "
                f"{r.p99_us:,.0f} | {r.p999_us:,.0f} |"
            )
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, GPU: {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def report(args: argparse.Namespace) -> str:
    started = time.time()
    # The in-process storage benchmark first, before any other process runs.
    gc.collect()
    ours = lmcd_cycle(args.cycles)
    gc.collect()
    ref = reference_cycle(args.cycles)
    shape = ModelShape()
    buffer_gib = args.fill_gib
    fill, store, retrieve = data_plane_phases(shape, buffer_gib, args.rounds)
    cp, lean = control_plane(args.duration)

    lm, rf, echo = cp["lmcd"], cp["reference"], cp["echo"]
    lines = [
        "# Performance",
        "",
        "Every figure below comes from one run of `nox -s bench -- --write-docs`",
        "(`python -m lmcd.benchmarks --write-docs`) on one machine; each ratio",
        "compares two figures of that same run. `nox -s bench` prints your",
        "machine's report without touching this page.",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- command: `python -m lmcd.benchmarks --duration {args.duration:g} "
        f"--rounds {args.rounds} --cycles {args.cycles} "
        f"--fill-gib {args.fill_gib:g}` "
        f"({time.time() - started:.0f} s)",
        "",
        "## Control plane",
        "",
        f"{CLIENTS} closed-loop clients, each the real lmcache client",
        "(`MessageQueueClient`, lmcache 0.3.11) in its own process, one request",
        f"in flight each, {args.duration:g} s per row after 1 s of warm-up. LOOKUP",
        f"carries {LOOKUP_KEYS} keys (all present for `hit`, none for `miss`), with",
        "`lock=True` as vLLM sends it. Reference: lmcache 0.3.11's",
        "`MessageQueueServer` + `MPStorageManager` with its `server.py` handlers.",
        'Echo: a bare pyzmq ROUTER answering "OK" (the floor for Python).',
        "",
        *latency_table(cp),
    ]
    lines += [
        "",
        "The same workloads from a lean load generator (`lmcd.bench.closed_loop`:",
        f"{CLIENTS} DEALER sockets driven from one thread, pre-encoded frames), which",
        "leaves more of the machine to the server and so shows more of its cost:",
        "",
        *latency_table(lean),
    ]
    lean_hit = lean["lmcd"]["lookup-hit"].rps / lean["reference"]["lookup-hit"].rps
    lean_noop = lean["lmcd"]["noop"].rps / lean["echo"]["noop"].rps
    hit_ratio = lm["lookup-hit"].rps / rf["lookup-hit"].rps
    miss_ratio = lm["lookup-miss"].rps / rf["lookup-miss"].rps
    noop_ratio = lm["noop"].rps / echo["noop"].rps
    lines += [
        "",
        "| target | figure | |",
        "| --- | --- | --- |",
        f"| LOOKUP x{LOOKUP_KEYS}, {CLIENTS} clients: >= 2x the reference's "
        f"requests/s | {hit_ratio:.2f}x (hits), {miss_ratio:.2f}x (misses) | "
        f"{check(hit_ratio >= 2)} |",
        f"| LOOKUP p99 below the reference's p50 | "
        f"{lm['lookup-hit'].p99_us:,.0f} µs vs {rf['lookup-hit'].p50_us:,.0f} µs | "
        f"{check(lm['lookup-hit'].p99_us < rf['lookup-hit'].p50_us)} |",
        f"| NOOP >= 80% of the bare echo server | {noop_ratio:.0%} | "
        f"{check(noop_ratio >= 0.8)} |",
        "",
        "Reading the two tables: with the real client, four client processes",
        "share the two cores with the server, so the client bounds every",
        f"row (the echo floor itself reaches {echo['noop'].rps:,.0f} requests/s).",
        "The lean generator leaves more CPU to the server: there lmcd answers",
        f"NOOP at {lean_noop:.0%} of the echo server and LOOKUP x{LOOKUP_KEYS} hits at",
        f"{lean_hit:.2f}x the reference.",
        "",
        "## Data plane (host path)",
        "",
        "Steady state: STORE then RETRIEVE over the wire through `/dev/shm` KV",
        "caches of an",
        "8B-class layout (32 layers, 8 KV heads, head size 128, bf16, block 16,",
        f"256-token chunks: {shape.chunk_bytes(256) >> 20} MiB a chunk), 8 chunks",
        f"a request, {args.rounds} timed requests each after the first fill of",
        f"the {buffer_gib:g} GiB buffer (measured on its own below);",
        "next to a single-thread memcpy (`ctypes.memmove`) of the same bytes.",
        "",
        "| operation | GB/s | memcpy GB/s | ratio | target >= 50% |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for t in (store, retrieve):
        lines.append(
            f"| {t.workload} | {t.gbps:.2f} | {t.memcpy_gbps:.2f} | "
            f"{t.ratio:.0%} | {check(t.ratio >= 0.5)} |"
        )
    lines += ["", *first_fill_section(fill, buffer_gib)]
    cycle_ratio = ours.chunk_ops_per_s / ref.chunk_ops_per_s
    lines += [
        "",
        "## Storage manager cycle",
        "",
        "One cycle: reserve+commit 64 chunks, LOOKUP(lock) them, retrieve and",
        "release them (three chunk operations per chunk), in-process, with the",
        "buffer (0.125 GiB, 256 chunks of 512 KiB) full so that every reserve",
        f"evicts; {args.cycles} timed cycles after 8 untimed ones.",
        "",
        "| manager | chunk ops/s |",
        "| --- | ---: |",
        f"| lmcd `StorageManager` | {ours.chunk_ops_per_s:,.0f} |",
        f"| lmcache 0.3.11 `MPStorageManager` | {ref.chunk_ops_per_s:,.0f} |",
        "",
        f"Ratio: {cycle_ratio:.2f}x (target >= 2x: {check(cycle_ratio >= 2)}).",
        "",
    ]
    if args.tiers:
        from lmcd.benchmarks import tiers

        lines += [*tiers.run_section(tiers.Options(directory=args.tiers_dir)), ""]
    lines += [
        "## GPU (CUDA IPC path)",
        "",
        "Measured on a GPU machine by `python3 scripts/gpu_checks.py --markdown",
        "docs/gpu-results.md` (store and retrieve GB/s next to a plain",
        "pinned-memory copy in the same run), then included here.",
    ]
    gpu = DOCS / "gpu-results.md"
    if gpu.exists():
        lines += ["", gpu.read_text().strip()]
    else:
        lines += ["", "It has not run on a GPU yet: no figures."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument(
        "--fill-gib",
        type=float,
        default=4.0,
        help="buffer of the data-plane daemon, filled once from fresh",
    )
    parser.add_argument(
        "--tiers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the disk and remote tiers (lmcd.benchmarks.tiers)",
    )
    parser.add_argument(
        "--tiers-dir", default=None, help="where their disk tiers go (a drive)"
    )
    parser.add_argument(
        "--out", default=None, help="also write the report to this file"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write it to docs/performance.md (the published figures)",
    )
    return parser.parse_args(argv)


def destinations(args: argparse.Namespace) -> list[Path]:
    """The files the report goes to besides stdout: none unless asked."""
    paths = [] if args.out is None else [Path(args.out)]
    if args.write_docs:
        paths.append(DOCS / "performance.md")
    return paths


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    text = report(args)
    print(text)
    for path in destinations(args):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
