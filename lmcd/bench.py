"""Load generators behind `lmcd bench` and the benchmark suite.

Control plane: a closed loop over C DEALER sockets driven from one thread
(each socket keeps one request in flight and sends the next as soon as its
reply arrives), so the generator itself adds as little as possible.
Data plane: STORE and RETRIEVE through the host path with a model-shaped
shared-memory KV cache, timed per request, and a single-thread memcpy of
the same bytes as the baseline. First fill: STOREs only into a fresh
daemon until its buffer is full, while a second client measures the
control plane's round trips (the stall probe).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import msgspec
import zmq

from lmcd.errors import LmcdError
from lmcd.wire.lmcache03 import RequestType

_enc = msgspec.msgpack.encode
Progress = Callable[[float], None]


@attrs.frozen
class LatencyResult:
    workload: str
    clients: int
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    p999_us: float

    @classmethod
    def from_latencies(
        cls, workload: str, clients: int, seconds: float, latencies: list[float]
    ) -> LatencyResult:
        """Summarize per-request latencies (seconds) measured over `seconds`."""
        latencies = sorted(latencies)
        return cls(
            workload=workload,
            clients=clients,
            requests=len(latencies),
            seconds=seconds,
            rps=len(latencies) / seconds,
            p50_us=percentile(latencies, 0.50) * 1e6,
            p99_us=percentile(latencies, 0.99) * 1e6,
            p999_us=percentile(latencies, 0.999) * 1e6,
        )


@attrs.frozen
class ThroughputResult:
    workload: str
    chunks_per_request: int
    requests: int
    bytes: int
    seconds: float
    gbps: float
    memcpy_gbps: float

    @property
    def ratio(self) -> float:
        return self.gbps / self.memcpy_gbps if self.memcpy_gbps else 0.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[max(index, 0)]


def lookup_payloads(
    n_keys: int,
    hits: bool,
    model: str = "bench",
    worker: int | None = 0,
    lock: bool = True,
) -> list[bytes]:
    """LOOKUP payload frames for `n_keys` keys of rank `worker` (None: every
    rank), stored by `prefill_lookup_keys` when `hits`; `lock=False` leaves
    no lock behind (as `lmcd bench` does against a live daemon)."""
    prefix = b"hit" if hits else b"miss"
    keys = [
        {
            "model_name": model,
            "world_size": 1,
            "worker_id": worker,
            "chunk_hash": prefix + i.to_bytes(4, "big"),
        }
        for i in range(n_keys)
    ]
    return [_enc(keys), _enc(lock)]


def closed_loop(
    url: str,
    rtype: RequestType,
    payloads: Sequence[bytes],
    *,
    clients: int,
    duration: float,
    warmup: float = 0.5,
    progress: Progress | None = None,
) -> LatencyResult:
    """Run `clients` closed loops of one request type for `duration` s."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socks = []
    try:
        for _ in range(clients):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(url)
            socks.append(s)
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        type_frame = _enc(int(rtype))
        uids = itertools.count()
        sent_at: dict[zmq.Socket[bytes], float] = {}

        def send(s: zmq.Socket[bytes]) -> None:
            s.send_multipart([_enc(next(uids)), type_frame, *payloads])
            sent_at[s] = time.perf_counter()

        for s in socks:
            send(s)
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + duration
        latencies: list[float] = []
        last_progress = start
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            events = poller.poll(1000)
            if not events:
                raise TimeoutError(f"no reply from {url} within 1 s")
            for s, _ in events:
                s.recv_multipart()
                done = time.perf_counter()
                if done >= measure_from:
                    latencies.append(done - sent_at[s])
                send(s)
            if progress is not None and now - last_progress > 0.1:
                progress(min(1.0, (now - start) / (end - start)))
                last_progress = now
        # Let in-flight replies arrive so the daemon is not left sending.
        for s in socks:
            s.poll(1000)
        return LatencyResult.from_latencies(
            rtype.name.lower(), clients, duration, latencies
        )
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


def memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    """Single-thread memcpy bandwidth over `nbytes` (pre-faulted buffers)."""
    src = (ctypes.c_char * nbytes)()
    dst = (ctypes.c_char * nbytes)()
    ctypes.memset(src, 1, nbytes)
    ctypes.memmove(dst, src, nbytes)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ctypes.memmove(dst, src, nbytes)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


@attrs.frozen
class ModelShape:
    """A KV-cache layout for the data-plane benchmark (8B-class by default)."""

    layers: int = 32
    heads: int = 8
    head_size: int = 128
    dtype: str = "bfloat16"
    block_size: int = 16

    def chunk_bytes(self, chunk_size: int) -> int:
        from lmcd.transfer.layouts import DTYPE_SIZES

        return (
            2
            * self.layers
            * chunk_size
            * self.heads
            * self.head_size
            * (DTYPE_SIZES[self.dtype])
        )


@attrs.frozen
class _BenchKV:
    """A registered host KV cache with room for two requests' chunks."""

    client: Any
    instance: int
    src: list[int]
    dst: list[int]
    nbytes: int  # per request
    chunks_per_request: int

    def keys(self, model: str, r: int) -> list[dict[str, Any]]:
        return [
            {
                "model_name": model,
                "world_size": 1,
                "worker_id": 0,
                "chunk_hash": r.to_bytes(4, "big") + i.to_bytes(4, "big"),
            }
            for i in range(self.chunks_per_request)
        ]


@contextlib.contextmanager
def _bench_kv(
    host: str, port: int, shape: ModelShape, chunks_per_request: int
) -> Iterator[_BenchKV]:
    from lmcd.client import Client
    from lmcd.shmkv import SharedKVCache

    with Client(host, port) as client:
        chunk_size = int(client.call(RequestType.GET_CHUNK_SIZE))
        per_chunk = chunk_size // shape.block_size
        blocks = 2 * chunks_per_request * per_chunk
        kv = SharedKVCache.create(
            "mha",
            num_layers=shape.layers,
            num_blocks=blocks,
            block_size=shape.block_size,
            num_heads=shape.heads,
            head_size=shape.head_size,
            dtype=shape.dtype,
            name="bench",
            # One file per layer, as lmcache 0.5's cpu_shm workers share
            # theirs: the kernel serializes writes into one file, so this
            # is what lets a retrieve write layers in parallel.
            file_per_layer=True,
        )
        try:
            for layer in kv.layers:
                layer.view(-1).view(dtype=_int_view(layer)).random_()
            instance = 0x1EAD0000 + time.time_ns() % 10_000
            client.call(RequestType.REGISTER_KV_CACHE, instance, kv.register_payload())
            yield _BenchKV(
                client=client,
                instance=instance,
                src=list(range(chunks_per_request * per_chunk)),
                dst=list(range(chunks_per_request * per_chunk, blocks)),
                nbytes=shape.chunk_bytes(chunk_size) * chunks_per_request,
                chunks_per_request=chunks_per_request,
            )
            client.call(RequestType.UNREGISTER_KV_CACHE, instance)
        finally:
            kv.close()


def data_plane(
    host: str,
    port: int,
    shape: ModelShape,
    *,
    chunks_per_request: int = 8,
    rounds: int = 6,
    warmup: int = 1,
    progress: Progress | None = None,
    model: str | None = None,
    drop_each_round: bool = False,
) -> tuple[ThroughputResult, ThroughputResult]:
    """Time host-path STORE then RETRIEVE of `chunks_per_request` chunks per
    request over `rounds` requests each, after `warmup` untimed rounds (set
    it to cover the daemon's buffer once, so that the first fill, measured
    by `first_fill`, is not timed here). Keys belong to `model` (default: a
    new name). `drop_each_round`: DROP that model's chunks after each round
    (untimed), so that no more than one request's worth is ever held and a
    live daemon's own chunks are never evicted."""
    event = b"\0" * 64
    store_t, retrieve_t = [], []
    total = rounds + warmup
    model = f"bench-{time.time_ns()}" if model is None else model
    with _bench_kv(host, port, shape, chunks_per_request) as b:
        client, instance, nbytes = b.client, b.instance, b.nbytes
        for r in range(total):
            keys = b.keys(model, r)
            t0 = time.perf_counter()
            _, ok = client.call(
                RequestType.STORE, keys, instance, b.src, event, timeout=120
            )
            t1 = time.perf_counter()
            if not ok:
                raise LmcdError("STORE refused chunks: is the buffer too small?")
            client.call(RequestType.LOOKUP, keys, False)
            t2 = time.perf_counter()
            _, found = client.call(
                RequestType.RETRIEVE, keys, instance, b.dst, event, timeout=120
            )
            t3 = time.perf_counter()
            if found != [True] * chunks_per_request:
                raise LmcdError("RETRIEVE missed chunks it had just stored")
            if drop_each_round:
                client.drop(model)
            if r >= warmup:
                store_t.append(t1 - t0)
                retrieve_t.append(t3 - t2)
            if progress is not None:
                progress((r + 1) / total)
    base = memcpy_gbps(nbytes)
    results = tuple(
        ThroughputResult(
            workload=name,
            chunks_per_request=chunks_per_request,
            requests=len(times),
            bytes=nbytes * len(times),
            seconds=sum(times),
            gbps=nbytes * len(times) / sum(times) / 1e9,
            memcpy_gbps=base,
        )
        for name, times in (("store", store_t), ("retrieve", retrieve_t))
    )
    return results[0], results[1]


# -- first fill and the control-plane stall probe ------------------------------


@attrs.frozen
class ProbeResult:
    """Control-plane round trips measured by a second client."""

    requests: int
    p50_us: float
    p99_us: float
    max_ms: float
    over_10ms: int  # round trips slower than 10 ms (the stall goal)


class ControlProbe:
    """A second client that sends a NOOP or LOOKUP (alternately) every
    `interval` seconds, one at a time, and times each round trip, in a
    thread, while in a `with`. Paced rather than closed-loop, so that the
    probe itself takes little CPU from what it observes; a stall shows as
    one long round trip."""

    def __init__(self, url: str, n_keys: int = 8, interval: float = 0.002) -> None:
        self.url = url
        self.interval = interval
        self._payloads = lookup_payloads(n_keys, hits=False)
        self._latencies: list[float] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> ControlProbe:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise RuntimeError(f"control probe failed: {self._error}")

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.url)
            self._loop(sock)
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()
            sock.close(linger=0)
            ctx.term()

    def _loop(self, sock: zmq.Socket[bytes]) -> None:
        frames = [
            [_enc(int(RequestType.NOOP))],
            [_enc(int(RequestType.LOOKUP)), *self._payloads],
        ]
        next_at = time.perf_counter()
        for uid in itertools.count():
            if uid == 1:
                self._ready.set()  # connected and answered once
            if self._stop.wait(max(0.0, next_at - time.perf_counter())):
                return
            t0 = time.perf_counter()
            next_at = t0 + self.interval
            sock.send_multipart([_enc(uid), *frames[uid % 2]])
            if not sock.poll(30_000):
                raise TimeoutError("no reply within 30 s")
            sock.recv_multipart()
            if uid:
                self._latencies.append(time.perf_counter() - t0)

    def result(self) -> ProbeResult:
        lat = sorted(self._latencies)
        return ProbeResult(
            requests=len(lat),
            p50_us=percentile(lat, 0.50) * 1e6,
            p99_us=percentile(lat, 0.99) * 1e6,
            max_ms=(lat[-1] if lat else 0.0) * 1e3,
            over_10ms=sum(1 for x in lat if x > 0.010),
        )


@attrs.frozen
class FirstFillResult:
    """STOREs into a fresh daemon until its buffer is full, once."""

    store: ThroughputResult
    refused_chunks: int
    evicted_chunks: int
    allocated_before_bytes: int  # prepared when the fill began
    allocated_after_bytes: int
    capacity_bytes: int
    outruns: int  # times the fill caught up with segment preparation
    probe: ProbeResult


def _settled(client: Any, timeout: float = 60.0) -> int:
    """Wait until the daemon prepares no segment (its lead is ready, as
    when vLLM connects minutes after start-up); returns its allocated bytes."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats(10)
        if not stats.get("preparing_bytes") or time.monotonic() > deadline:
            return int(stats["allocated_bytes"])
        time.sleep(0.05)


def first_fill(
    host: str,
    port: int,
    shape: ModelShape,
    *,
    chunks_per_request: int = 8,
    progress: Progress | None = None,
) -> FirstFillResult:
    """Time host-path STOREs (no RETRIEVE in between) that fill a fresh
    daemon's buffer once, while `ControlProbe` times NOOP/LOOKUP round
    trips from a second client. The fill starts once the daemon has
    prepared its lead (`--prepare-ahead-mb`). Refused chunks are counted, not retried;
    GB/s counts only chunks stored. The memcpy baseline (the same bytes per
    request) is measured before and after the fill; the better one counts."""
    from lmcd.client import Client

    event = b"\0" * 64
    times: list[float] = []
    refused = 0
    tag = "bench-fill-" + str(time.time_ns())
    with Client(host, port) as stats_client:
        before = stats_client.stats(10)
    with _bench_kv(host, port, shape, chunks_per_request) as b:
        rounds = max(1, int(before["capacity_bytes"]) // b.nbytes)
        allocated_before = _settled(b.client)
        base_before = memcpy_gbps(b.nbytes)
        with ControlProbe(f"tcp://{host}:{port}") as probe:
            for r in range(rounds):
                keys = b.keys(tag, r)
                t0 = time.perf_counter()
                _, ok = b.client.call(
                    RequestType.STORE, keys, b.instance, b.src, event, timeout=120
                )
                times.append(time.perf_counter() - t0)
                if not ok:
                    # Which chunks were refused is not in the reply: count
                    # them from a LOOKUP (the stored ones are a prefix).
                    found = b.client.call(RequestType.LOOKUP, keys, False)
                    refused += found.count(False)
                if progress is not None:
                    progress((r + 1) / rounds)
        after = b.client.stats(10)
        nbytes = b.nbytes
    chunk_bytes = nbytes // chunks_per_request
    stored = nbytes * rounds - refused * chunk_bytes
    store = ThroughputResult(
        workload="first-fill store",
        chunks_per_request=chunks_per_request,
        requests=rounds,
        bytes=stored,
        seconds=sum(times),
        gbps=stored / sum(times) / 1e9,
        # The better of two baselines, before and after the fill: the
        # ratio is then the lower, under a machine's passing noise.
        memcpy_gbps=max(base_before, memcpy_gbps(nbytes)),
    )
    return FirstFillResult(
        store=store,
        refused_chunks=refused,
        evicted_chunks=int(after["evicted_chunks"]) - int(before["evicted_chunks"]),
        allocated_before_bytes=allocated_before,
        allocated_after_bytes=int(after["allocated_bytes"]),
        capacity_bytes=int(after["capacity_bytes"]),
        outruns=int(after.get("buffer_outruns", 0)),
        probe=probe.result(),
    )


def _int_view(t: Any) -> Any:
    import torch

    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        t.element_size()
    ]


def prefill_lookup_keys(
    host: str, port: int, n_keys: int, model: str = "bench"
) -> None:
    """Store `n_keys` tiny chunks so that `lookup_payloads(hits=True)` hits."""
    from lmcd.client import Client
    from lmcd.shmkv import SharedKVCache

    with Client(host, port) as client:
        chunk_size = int(client.call(RequestType.GET_CHUNK_SIZE))
        kv = SharedKVCache.create(
            "mla",
            num_layers=1,
            num_blocks=chunk_size // 16,
            block_size=16,
            dim=16,
            dtype="float16",
            name="prefill",
        )
        try:
            instance = 0x5EED0000 + n_keys
            client.call(RequestType.REGISTER_KV_CACHE, instance, kv.register_payload())
            keys = [
                {
                    "model_name": model,
                    "world_size": 1,
                    "worker_id": 0,
                    "chunk_hash": b"hit" + i.to_bytes(4, "big"),
                }
                for i in range(n_keys)
            ]
            ids = list(range(chunk_size // 16))
            for key in keys:
                client.call(RequestType.STORE, [key], instance, ids, b"\0" * 64)
            client.call(RequestType.UNREGISTER_KV_CACHE, instance)
        finally:
            kv.close()
