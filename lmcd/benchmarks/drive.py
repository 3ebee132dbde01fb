"""Closed-loop load through the real lmcache client, one process per client.

Every server in the control-plane table (lmcd, the reference, the echo
floor) is driven by this same code and client, so the ratios compare the
servers, not the load generators.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from lmcd.bench import LatencyResult


def _keys(n_keys: int, hits: bool) -> list[Any]:
    from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey

    prefix = b"hit" if hits else b"miss"
    return [
        IPCCacheEngineKey("bench", 1, 0, prefix + i.to_bytes(4, "big"))
        for i in range(n_keys)
    ]


def _client(
    url: str,
    workload: str,
    n_keys: int,
    hits: bool,
    duration: float,
    warmup: float,
    out: Any,
) -> None:
    import zmq
    from lmcache.v1.multiprocess.mq import MessageQueueClient
    from lmcache.v1.multiprocess.protocol import RequestType, get_response_class

    ctx = zmq.Context()
    client = MessageQueueClient(url, ctx)
    rtype = RequestType[workload.upper()]
    payloads: list[Any] = [_keys(n_keys, hits), True] if workload == "lookup" else []
    cls = get_response_class(rtype)
    latencies = []
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        client.submit_request(rtype, payloads, cls).result(10)
        if t0 >= measure_from:
            latencies.append(time.perf_counter() - t0)
    client.close()
    out.put(latencies)


def drive(
    url: str,
    workload: str,
    *,
    clients: int,
    n_keys: int = 0,
    hits: bool = False,
    duration: float = 5.0,
    warmup: float = 1.0,
) -> LatencyResult:
    """`clients` processes, each a closed loop of one request at a time."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client, args=(url, workload, n_keys, hits, duration, warmup, out)
        )
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    latencies: list[float] = []
    for _ in procs:
        latencies.extend(out.get(timeout=duration + warmup + 60))
    for p in procs:
        p.join(10)
    return LatencyResult.from_latencies(workload, clients, duration, latencies)
