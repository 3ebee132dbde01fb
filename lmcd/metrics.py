"""`--metrics-port`: Prometheus `/metrics` and `/healthz` over HTTP, under Trio.

Served by hypercorn (an ASGI server that runs on Trio) with a two-route ASGI
app; the metric values come from the same statistics as STATS, read when
Prometheus scrapes, so the request path pays nothing for them.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmcd.errors import ConfigError

log = logging.getLogger(__name__)
# hypercorn's own log. Its "Running on ... (CTRL + C to quit)" repeats the
# daemon's "Metrics on" line with advice that does not apply: left out.
_http_log = logging.getLogger("lmcd.metrics.http")
_http_log.addFilter(lambda record: not record.getMessage().startswith("Running on"))

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

COUNTERS = {
    "lookups": "LOOKUP requests",
    "lookup_hit_chunks": "Chunks found by lookups",
    "lookup_miss_chunks": "Chunks not found by lookups",
    "stores": "STORE requests",
    "stored_chunks": "Chunks stored",
    "stored_bytes": "Bytes stored",
    "retrieves": "RETRIEVE requests",
    "retrieved_chunks": "Chunks retrieved",
    "retrieved_bytes": "Bytes retrieved",
    "evicted_chunks": "Chunks evicted to make room",
    "evicted_bytes": "Bytes evicted to make room",
    "lock_expiries": "Lookup locks that expired unreleased",
    "store_refused_chunks": "Chunks not stored for lack of room",
    "failed_requests": "Requests answered with a failure",
    "malformed_messages": "Messages that did not follow the protocol",
    "ambiguous_messages": "Messages of undetected clients left unanswered",
    "released_messages": "Messages held until their client's dialect was known",
    "requests": "Requests received",
    "dropped_replies": "Replies dropped: the client was gone or not reading",
    "oversized_messages": "Messages dropped for their frame count or size",
}
GAUGES = {
    "capacity_bytes": "CPU buffer capacity",
    "used_bytes": "CPU buffer bytes in use",
    "allocated_bytes": "CPU buffer bytes allocated from the OS",
    "chunks": "Chunks visible to lookups",
    "tokens": "Tokens held in visible chunks",
    "locked_chunks": "Chunks held by lookup locks",
    "pinned_chunks": "Chunks being retrieved",
    "reserved_chunks": "Chunks being stored",
    "inflight_requests": "Data-plane requests in progress",
    "held_messages": "Messages held until their client's dialect is known",
    "uptime_s": "Seconds since start",
    "pending_replies": "Replies queued for clients that do not read them",
    "parked_clients": "Clients whose replies are queued",
}
# STATS fields whose metric follows Prometheus' unit naming instead.
METRIC_NAMES = {"uptime_s": "lmcd_uptime_seconds"}
# Per-model series: the largest models by bytes, the rest summed as "other",
# so that clients inventing model names cannot grow the scrape without bound.
MAX_MODEL_SERIES = 20
OTHER_MODELS = "other"


# Per tier (label `tier`: cpu, disk, remote), from STATS' "tiers" map; a
# figure a tier does not have is left out for it.
TIER_COUNTERS = {
    "hits": "Chunks lookups found only in this tier",
    "promotions": "Chunks copied from this tier into the CPU buffer",
    "promotion_failures": "Chunks that failed to read or verify (served as misses)",
    "demotions": "Chunks written to this tier",
    "demotion_failures": "Chunks that failed to be written to this tier",
    "dropped_writes": "Chunks not written: queue full",
    "evicted_before_written": "Chunks evicted from CPU before reaching this tier",
    "deletions": "Chunks deleted from this tier (its LRU order, CLEAR)",
    "read_bytes": "Payload bytes read from this tier",
    "written_bytes": "Payload bytes written to this tier",
    "read_failures": "Reads that failed (I/O error or verification)",
    "verify_failures": "Reads that failed verification",
}
TIER_GAUGES = {
    "capacity_bytes": "Tier capacity (0: unknown)",
    "used_bytes": "Tier bytes in use",
    "chunks": "Chunks held by the tier (0 for a shared cluster: unknown)",
    "queue_depth": "Chunk copies queued or running",
    "healthy": "1 when the tier serves, 0 when not",
}


def _tier_metrics(tiers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    for name, doc in TIER_COUNTERS.items():
        family = CounterMetricFamily(f"lmcd_tier_{name}", doc, labels=["tier"])
        for tier, figures in tiers.items():
            if name in figures:
                family.add_metric([tier], figures[name])
        yield family
    for name, doc in TIER_GAUGES.items():
        gauge = GaugeMetricFamily(f"lmcd_tier_{name}", doc, labels=["tier"])
        for tier, figures in tiers.items():
            if name in figures:
                gauge.add_metric([tier], float(figures[name]))
        yield gauge


class StatsCollector(Collector):
    """Prometheus metrics from a STATS map, computed at scrape time: one
    family per counter and gauge present in the map, and per-model series
    for at most `max_models` models plus "other"."""

    def __init__(
        self, stats: Callable[[], dict[str, Any]], max_models: int = MAX_MODEL_SERIES
    ) -> None:
        self._stats = stats
        self._max_models = max_models

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, doc in COUNTERS.items():
            if name in s:
                yield CounterMetricFamily(f"lmcd_{name}", doc, value=s[name])
        for name, doc in GAUGES.items():
            if name in s:
                metric = METRIC_NAMES.get(name, f"lmcd_{name}")
                yield GaugeMetricFamily(metric, doc, value=s[name])
        chunks = GaugeMetricFamily(
            "lmcd_model_chunks", "Chunks per model", labels=["model"]
        )
        nbytes = GaugeMetricFamily(
            "lmcd_model_bytes", "Bytes per model", labels=["model"]
        )
        for model, (n_chunks, n_bytes) in model_series(
            s["models"], self._max_models
        ).items():
            chunks.add_metric([model], n_chunks)
            nbytes.add_metric([model], n_bytes)
        yield chunks
        yield nbytes
        yield GaugeMetricFamily(
            "lmcd_instances", "Registered KV caches", value=len(s["instances"])
        )
        tiers = s.get("tiers")
        if tiers:
            yield from _tier_metrics(tiers)


def model_series(
    models: dict[str, dict[str, int]], max_models: int
) -> dict[str, tuple[int, int]]:
    """`{label: (chunks, bytes)}`: the `max_models` models holding the most
    bytes under their own names, every other model summed under "other" (a
    model named "other" counts there too)."""
    ranked = sorted(models.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))
    series: dict[str, tuple[int, int]] = {}
    rest = [0, 0]
    for i, (name, usage) in enumerate(ranked):
        if i < max_models and name != OTHER_MODELS:
            series[name] = (usage["chunks"], usage["bytes"])
        else:
            rest[0] += usage["chunks"]
            rest[1] += usage["bytes"]
    if len(ranked) > len(series):
        series[OTHER_MODELS] = (rest[0], rest[1])
    return series


def make_app(
    stats: Callable[[], dict[str, Any]],
    healthy: Callable[[], bool],
    max_models: int = MAX_MODEL_SERIES,
) -> Any:
    """The ASGI app: GET (or HEAD) /metrics and /healthz; other methods get
    405 with an `Allow` header. `/healthz` is 503 while `healthy()` is
    false."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, max_models))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        headers: list[tuple[bytes, bytes]] = []
        if method not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed\n", "text/plain"
            headers.append((b"allow", b"GET, HEAD"))
        elif path == "/metrics":
            status, body = 200, generate_latest(registry)
            ctype = "text/plain; version=0.0.4; charset=utf-8"
        elif path == "/healthz":
            ok = healthy()
            status, body, ctype = (
                (200, b"ok\n", "text/plain")
                if ok
                else (503, b"not serving\n", "text/plain")
            )
        else:
            status, body, ctype = 404, b"not found\n", "text/plain"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype.encode()),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        # HEAD promises the length of the body it does not send; every
        # other answer sends the body whose length it announced.
        await send(
            {"type": "http.response.body", "body": b"" if method == "HEAD" else body}
        )

    return app


async def serve(
    app: Any,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on host:port until cancelled; `started(urls)` once bound.

    Raises `ConfigError` when the port cannot be bound.
    """
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve as hyper_serve

    # Bind here, so that a busy port is a clean error rather than a failure
    # deep inside the HTTP server's task group; hypercorn serves the fd.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
    config = HyperConfig()
    # hypercorn takes ownership of the descriptor and closes it.
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = _http_log
    config.graceful_timeout = 0.5
    await hyper_serve(app, config, task_status=task_status)
