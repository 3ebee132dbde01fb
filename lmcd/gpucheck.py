"""Every GPU check in one run (< 5 minutes on one GPU): correctness and bandwidth.

    python3 scripts/gpu_checks.py [--layers 32] [--chunks 32] [--iters 4] [--json OUT]
    lmcd bench --workload cuda

1. Starts `lmcd serve` (a subprocess) with a pinned CPU buffer.
2. Spawns a separate "vLLM worker" process that allocates paged KV caches on
   the GPU (MHA bf16 8B-class by default, and an MLA cache), wraps them in
   lmcache's real `CudaIPCWrapper`, registers them, and stores, looks up and
   retrieves through the real client's CUDA futures.
3. Checks that retrieved blocks (into other block ids, after zeroing) are
   bit-exact, and times store and retrieve in GB/s next to a plain
   GPU <-> pinned-memory copy of the same bytes measured in the same run.

Needs CUDA, torch, msgspec, pyzmq and `lmcache==0.3.13` (installed --no-deps).
Exits 0 when every check passes; prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

from lmcd.spawn import spawned_daemon

BLOCK = 16
CHUNK = 256


def pinned_baseline(nbytes: int, iters: int) -> dict[str, float]:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out: dict[str, float] = {}
    for name, (dst, s) in {"d2h": (host, src), "h2d": (src, host)}.items():
        dst.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        out[name] = nbytes * iters / (time.perf_counter() - t0) / 1e9
    return out


def worker(url: str, args: dict[str, Any], results: Any) -> None:  # noqa: PLR0915
    """The fake vLLM worker: its own process, its own CUDA context."""
    import torch
    import zmq
    from lmcache.v1.multiprocess.custom_types import CudaIPCWrapper, IPCCacheEngineKey
    from lmcache.v1.multiprocess.mq import MessageQueueClient
    from lmcache.v1.multiprocess.protocol import RequestType, get_response_class

    torch.cuda.init()
    dev = torch.device("cuda:0")
    per_chunk = CHUNK // BLOCK
    n_chunks, iters, layers = args["chunks"], args["iters"], args["layers"]
    num_blocks = 2 * n_chunks * per_chunk
    client = MessageQueueClient(url, zmq.Context())
    report: dict[str, Any] = {"checks": {}}

    def call(name: str, payloads: list[Any], cuda: bool = False) -> Any:
        rtype = RequestType[name]
        f = client.submit_request(rtype, payloads, get_response_class(rtype))
        return f.to_cuda_future().result() if cuda else f.result(120)

    def event() -> bytes:
        ev = torch.cuda.Event(interprocess=True)
        ev.record()
        return bytes(ev.ipc_handle())

    layouts = {
        "mha-bf16": ((2, num_blocks, BLOCK, 8, 128), layers),
        "mla-bf16": ((num_blocks, BLOCK, 576), max(2, layers // 4)),
    }
    for name, (shape, n_layers) in layouts.items():
        kvs = [
            torch.randn(shape, device=dev).to(torch.bfloat16) for _ in range(n_layers)
        ]
        instance = os.getpid() * 10 + len(report["checks"])
        call("REGISTER_KV_CACHE", [instance, [CudaIPCWrapper(t) for t in kvs]])
        src = list(range(n_chunks * per_chunk))
        dst = list(range(n_chunks * per_chunk, 2 * n_chunks * per_chunk))

        def blocks(
            ids: list[int], kvs: list[Any] = kvs, shape: Any = shape
        ) -> list[Any]:
            return [
                t[:, ids].clone() if len(shape) == 5 else t[ids].clone() for t in kvs
            ]

        keys_for = [
            [
                IPCCacheEngineKey(name, 1, 0, f"{it}-{i}".encode())
                for i in range(n_chunks)
            ]
            for it in range(iters + 1)
        ]
        expected = blocks(src)
        chunk_bytes = sum(t.numel() * t.element_size() for t in kvs) // num_blocks
        nbytes = chunk_bytes * per_chunk * n_chunks
        store_s, retrieve_s = [], []
        ok = True
        for it, keys in enumerate(keys_for):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, stored = call("STORE", [keys, instance, src, event()], cuda=True)
            t1 = time.perf_counter()
            ok &= bool(stored)
            nil = [k.no_worker_id_version() for k in keys]
            deadline = time.monotonic() + 30
            while call("LOOKUP", [nil, True]) != [True] * n_chunks:
                if time.monotonic() > deadline:
                    ok = False
                    break
                time.sleep(0.001)
            for t in kvs:
                (t[:, dst] if len(shape) == 5 else t[dst]).zero_()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            _, found = call("RETRIEVE", [keys, instance, dst, event()], cuda=True)
            t3 = time.perf_counter()
            ok &= found == [True] * n_chunks
            got = blocks(dst)
            ok &= all(
                torch.equal(a.view(torch.int16), b.view(torch.int16))
                for a, b in zip(expected, got, strict=True)
            )
            if it:  # the first round warms up
                store_s.append(t1 - t0)
                retrieve_s.append(t3 - t2)
        call("UNREGISTER_KV_CACHE", [instance])
        report["checks"][name] = {
            "bit_exact_and_found": ok,
            "bytes_per_request": nbytes,
            "store_GBps": nbytes * len(store_s) / sum(store_s) / 1e9,
            "retrieve_GBps": nbytes * len(retrieve_s) / sum(retrieve_s) / 1e9,
        }
        del kvs, expected
        torch.cuda.empty_cache()
    report["pinned_copy_GBps"] = pinned_baseline(
        report["checks"]["mha-bf16"]["bytes_per_request"], args["iters"]
    )
    client.close()
    results.put(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--buffer-gb", type=float, default=24.0)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument(
        "--markdown",
        help="also write a table here (docs/gpu-results.md is included in "
        "docs/performance.md by `nox -s bench`)",
    )
    args = parser.parse_args(argv)
    report = run(args.layers, args.chunks, args.iters, args.buffer_gb)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    if args.markdown and "checks" in report:
        with open(args.markdown, "w") as f:
            f.write(markdown(report, args))
    return 0 if report.get("passed", True) else 1


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    """The report as a table for docs/gpu-results.md."""
    base = report["pinned_copy_GBps"]
    lines = [
        f"Device: {report['device']}; command: `python3 scripts/gpu_checks.py "
        f"--layers {args.layers} --chunks {args.chunks} --iters {args.iters}`.",
        f"Plain pinned copy of the same bytes, same run: {base['d2h']:.1f} GB/s "
        f"GPU->CPU, {base['h2d']:.1f} GB/s CPU->GPU.",
        "",
        "| layout | bit-exact | store GB/s | retrieve GB/s |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, c in report["checks"].items():
        lines.append(
            f"| {name} | {'yes' if c['bit_exact_and_found'] else 'NO'} | "
            f"{c['store_GBps']:.1f} | {c['retrieve_GBps']:.1f} |"
        )
    lines += [
        "",
        f"MHA store: {report['store_vs_pinned_copy']:.0%} of the pinned copy; "
        f"retrieve: {report['retrieve_vs_pinned_copy']:.0%} (target >= 80%).",
    ]
    return "\n".join(lines) + "\n"


def run(layers: int, chunks: int, iters: int, buffer_gb: float) -> dict[str, Any]:
    """Run every check; the report (a JSON-able dict) says what passed."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    args = argparse.Namespace(
        layers=layers, chunks=chunks, iters=iters, buffer_gb=buffer_gb
    )
    flags = ("--cpu-buffer-size", str(args.buffer_gb), "--max-workers", "2")
    with spawned_daemon(*flags, log_level="info") as port:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        proc = ctx.Process(
            target=worker, args=(f"tcp://127.0.0.1:{port}", vars(args), results)
        )
        proc.start()
        report: dict[str, Any] = results.get(timeout=240)
        proc.join(30)
    report["device"] = torch.cuda.get_device_name(0)
    base = report["pinned_copy_GBps"]
    mha = report["checks"]["mha-bf16"]
    report["store_vs_pinned_copy"] = mha["store_GBps"] / base["d2h"]
    report["retrieve_vs_pinned_copy"] = mha["retrieve_GBps"] / base["h2d"]
    report["passed"] = all(c["bit_exact_and_found"] for c in report["checks"].values())
    return report


if __name__ == "__main__":
    sys.exit(main())
