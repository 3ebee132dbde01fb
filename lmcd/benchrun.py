"""`lmcd bench`: run the chosen workloads and print a table or JSON."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import attrs
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

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
from lmcd.client import Client
from lmcd.errors import ConfigError, LmcdError
from lmcd.spawn import spawned_daemon
from lmcd.transfer.layouts import DTYPE_SIZES
from lmcd.wire.lmcache03 import RequestType


@attrs.frozen
class BenchOptions:
    host: str
    port: int
    spawn: bool
    workload: str
    clients: int
    duration: float
    keys: int
    hits: bool
    layers: int
    heads: int
    head_size: int
    dtype: str
    block_size: int
    chunks: int
    rounds: int
    warmup: int
    json: bool


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the workloads of `opts`; prints and returns the results."""
    if opts.dtype not in DTYPE_SIZES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_SIZES)}")
    shape = ModelShape(
        opts.layers, opts.heads, opts.head_size, opts.dtype, opts.block_size
    )
    names = (
        ["noop", "lookup", "store", "retrieve", "cuda"]
        if opts.workload == "all"
        else [opts.workload]
    )
    request_gib = shape.chunk_bytes(256) * opts.chunks / (1 << 30)
    buffer_gib = max(0.25, 2.5 * request_gib)
    if opts.spawn:
        # A fresh daemon: its first fill is measured on its own (`first_fill`),
        # and fills the buffer, so the steady state needs no long warm-up.
        # Its segments hold at least one chunk of the shape asked for.
        segment_mb = max(1024, -(-shape.chunk_bytes(256) // (1 << 20)))
        with spawned_daemon(
            "--cpu-buffer-size",
            f"{buffer_gib:.3f}",
            "--segment-mb",
            str(segment_mb),
        ) as port:
            return _run(opts, shape, names, "127.0.0.1", port, fresh=True)
    with Client(opts.host, opts.port) as client:
        client.check_listening(2.0)
        if {"store", "retrieve"} & set(names):
            check_fits(shape, opts.chunks, client.stats(timeout=2.0), client.url)
    return _run(opts, shape, names, opts.host, opts.port)


def check_fits(shape: ModelShape, chunks: int, stats: dict[str, Any], url: str) -> None:
    """Raise `ConfigError` when the daemon described by `stats` cannot hold
    the chunks of `shape` (too big for a segment, or one request's worth
    not fitting its buffer), naming the flags on both sides."""
    chunk_size = int(stats["chunk_size"])
    if chunk_size % shape.block_size:
        raise ConfigError(
            f"--block-size {shape.block_size} does not divide the daemon's "
            f"chunk size ({chunk_size} tokens, its --chunk-size)"
        )
    chunk = shape.chunk_bytes(chunk_size)
    mib = 1 << 20
    segment = int(stats.get("segment_bytes", stats["capacity_bytes"]))
    if chunk > min(segment, int(stats["capacity_bytes"])):
        raise ConfigError(
            f"--layers/--heads/--head-size/--dtype make {chunk / mib:.1f} MiB "
            f"chunks; {url} holds chunks up to {segment / mib:.1f} MiB (its "
            "--segment-mb) and its --cpu-buffer-size: choose a smaller shape"
        )
    if chunk * chunks > int(stats["capacity_bytes"]):
        raise ConfigError(
            f"--chunks {chunks} of {chunk / mib:.1f} MiB need "
            f"{chunk * chunks / mib:.0f} MiB in {url}'s "
            f"{int(stats['capacity_bytes']) / mib:.0f} MiB buffer: lower --chunks"
        )


def _run(
    opts: BenchOptions,
    shape: ModelShape,
    names: list[str],
    host: str,
    port: int,
    *,
    fresh: bool = False,
) -> dict[str, Any]:
    url = f"tcp://{host}:{port}"
    err = Console(stderr=True)
    results: dict[str, Any] = {"target": url, "clients": opts.clients}
    # Chunks of its own models only, dropped at the end (and, against a
    # live daemon, after each data-plane round), so nothing is left behind.
    model = f"lmcd-bench-{os.getpid()}-{time.time_ns()}"
    try:
        _workloads(opts, shape, names, host, port, model, results, fresh, err)
    finally:
        with Client(host, port) as client, contextlib.suppress(LmcdError):
            # LmcdError: the daemon is gone, and with it what was stored.
            client.check_listening(2.0)
            for suffix in ("lookup", "data"):
                client.drop(f"{model}-{suffix}", timeout=5.0)
    out = {k: attrs.asdict(v) if attrs.has(type(v)) else v for k, v in results.items()}
    for k in ("store", "retrieve"):
        if k in out:
            out[k]["ratio_to_memcpy"] = results[k].ratio
    if isinstance(results.get("first_fill"), FirstFillResult):
        out["first_fill"]["store"]["ratio_to_memcpy"] = results[
            "first_fill"
        ].store.ratio
    if opts.json:
        print(json.dumps(out, indent=2))
    else:
        _print_tables(results)
    return out


def _workloads(
    opts: BenchOptions,
    shape: ModelShape,
    names: list[str],
    host: str,
    port: int,
    model: str,
    results: dict[str, Any],
    fresh: bool,
    err: Console,
) -> None:
    url = f"tcp://{host}:{port}"
    with Progress(console=err, transient=True, disable=opts.json) as progress:
        for name in names:
            task = progress.add_task(name, total=1.0)

            def advance(fraction: float, task: Any = task) -> None:
                progress.update(task, completed=fraction)

            if name == "noop":
                results["noop"] = closed_loop(
                    url,
                    RequestType.NOOP,
                    [],
                    clients=opts.clients,
                    duration=opts.duration,
                    progress=advance,
                )
            elif name == "lookup":
                lookup_model = f"{model}-lookup"
                if opts.hits:
                    prefill_lookup_keys(host, port, opts.keys, model=lookup_model)
                payloads = lookup_payloads(
                    opts.keys, opts.hits, model=lookup_model, lock=False
                )
                results["lookup"] = closed_loop(
                    url,
                    RequestType.LOOKUP,
                    payloads,
                    clients=opts.clients,
                    duration=opts.duration,
                    progress=advance,
                )
            elif name in ("store", "retrieve"):
                if "store" in results or "retrieve" in results:
                    continue  # one run measures both
                if fresh:
                    results["first_fill"] = first_fill(
                        host,
                        port,
                        shape,
                        chunks_per_request=opts.chunks,
                        progress=advance,
                    )
                else:
                    results["first_fill"] = {
                        "skipped": "measured only on a private daemon (--spawn)"
                    }
                store, retrieve = data_plane(
                    host,
                    port,
                    shape,
                    chunks_per_request=opts.chunks,
                    rounds=opts.rounds,
                    warmup=opts.warmup,
                    progress=advance,
                    model=f"{model}-data",
                    drop_each_round=not fresh,
                )
                results["store"], results["retrieve"] = store, retrieve
            elif name == "cuda":
                results["cuda"] = _cuda(opts)
            progress.update(task, completed=1.0)


def _cuda(opts: BenchOptions) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from lmcd.gpucheck import run

    return run(opts.layers, max(opts.chunks, 4), max(opts.rounds, 1), 8.0)


def _print_tables(results: dict[str, Any]) -> None:
    console = Console()
    latency = Table(title=f"Control plane ({results['clients']} clients)")
    for col in ("workload", "requests/s", "p50 µs", "p99 µs", "p99.9 µs"):
        latency.add_column(col, justify="right" if col != "workload" else "left")
    for r in results.values():
        if isinstance(r, LatencyResult):
            latency.add_row(
                r.workload,
                f"{r.rps:,.0f}",
                f"{r.p50_us:,.0f}",
                f"{r.p99_us:,.0f}",
                f"{r.p999_us:,.0f}",
            )
    if latency.row_count:
        console.print(latency)
    data = Table(title="Data plane (host path)")
    for col in ("operation", "GB/s", "memcpy GB/s", "ratio"):
        data.add_column(col, justify="right" if col != "operation" else "left")
    fill = results.get("first_fill")
    rows = [r for r in results.values() if isinstance(r, ThroughputResult)]
    if isinstance(fill, FirstFillResult):
        rows.insert(0, fill.store)
    for r in rows:
        data.add_row(
            r.workload, f"{r.gbps:.2f}", f"{r.memcpy_gbps:.2f}", f"{r.ratio:.0%}"
        )
    if data.row_count:
        console.print(data)
    if isinstance(fill, FirstFillResult):
        p = fill.probe
        console.print(
            f"First fill of {fill.capacity_bytes / (1 << 30):.2f} GiB: "
            f"{fill.refused_chunks} chunks refused, {fill.evicted_chunks} evicted, "
            f"{fill.outruns} outruns; control plane meanwhile: {p.requests} "
            f"round trips, p99 {p.p99_us:,.0f} µs, max {p.max_ms:.1f} ms, "
            f"{p.over_10ms} over 10 ms"
        )
    if "cuda" in results:
        console.print(f"CUDA path: {json.dumps(results['cuda'])}")
