"""STATS, `lmcd inspect` and `/metrics` against a live daemon with traffic."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmcd.client import Client
from lmcd.wire.lmcache03 import RequestType
from tests.conftest import Server, free_port, start_server
from tests.lmcache_client import call, close_client, key, open_client
from tests.test_host_path import EVENT, PER_CHUNK, random_kv, register


def lmcd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def busy() -> Iterator[tuple[Server, int]]:
    """A daemon with 10 chunks of room, after a known sequence of requests."""
    import zmq

    # 3 layers x 2 x 256 x 128 x bf16 = 384 KiB a chunk; 4 MiB holds 10.
    s = start_server(
        "--cpu-buffer-size",
        str(4 / 1024),
        "--segment-mb",
        "4",
        "--metrics-port",
        "0",
    )
    metrics_port = s.metrics_port
    ctx = zmq.Context()
    c = open_client(s.url, ctx)
    kv = random_kv("mha", num_blocks=16 * 8)
    try:
        instance = register(c, kv)
        ids = list(range(8 * PER_CHUNK))
        first = [key(i, model="alpha") for i in range(8)]
        second = [key(100 + i, model="beta") for i in range(4)]
        assert call(c, "STORE", [first, instance, ids, EVENT])[1]  # 8 chunks
        assert call(c, "STORE", [second, instance, ids, EVENT])[1]  # evicts 2
        assert call(c, "LOOKUP", [[*second, key(999)], True]) == [True] * 4 + [False]
        assert call(c, "RETRIEVE", [second, instance, ids, EVENT])[1] == [True] * 4
        yield s, metrics_port
    finally:
        close_client(c)
        kv.close()
        ctx.destroy(linger=0)
        assert s.stop() == 0


def test_stats_count_the_traffic(busy: tuple[Server, int]) -> None:
    s, _ = busy
    with Client("127.0.0.1", s.port) as c:
        stats = c.stats()
    chunk = 3 * 2 * 256 * 128 * 2
    assert stats["chunks"] == 10
    assert stats["tokens"] == 10 * 256
    assert stats["stores"] == 2
    assert stats["stored_chunks"] == 12
    assert stats["stored_bytes"] == 12 * chunk
    assert stats["evicted_chunks"] == 2
    assert stats["lookups"] == 1
    assert (stats["lookup_hit_chunks"], stats["lookup_miss_chunks"]) == (4, 1)
    assert (stats["retrieves"], stats["retrieved_chunks"]) == (1, 4)
    assert stats["retrieved_bytes"] == 4 * chunk
    assert stats["locked_chunks"] == 0  # the retrieve released the lookup's locks
    assert stats["models"] == {
        "alpha": {"chunks": 6, "bytes": 6 * chunk},
        "beta": {"chunks": 4, "bytes": 4 * chunk},
    }
    (instance,) = stats["instances"]
    assert instance["kind"] == "host"
    assert (instance["layout"], instance["layers"], instance["dtype"]) == (
        "mha",
        3,
        "bfloat16",
    )
    assert (instance["block_size"], instance["num_blocks"]) == (16, 128)
    for field in (
        "version",
        "uptime_s",
        "chunk_size",
        "capacity_bytes",
        "used_bytes",
        "failed_requests",
        "malformed_messages",
    ):
        assert field in stats


def test_inspect_json_and_text(busy: tuple[Server, int]) -> None:
    s, _ = busy
    result = lmcd("inspect", "--host", "127.0.0.1", "--port", str(s.port), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["evicted_chunks"] == 2
    text = lmcd("inspect", "--host", "127.0.0.1", "--port", str(s.port))
    assert text.returncode == 0, text.stderr
    for figure in (
        "Memory",
        "Cache",
        "Traffic",
        "Errors",
        "Instances",
        "alpha",
        "beta",
        "80.0%",
        "4 / 1",
        "12 chunks",
    ):
        assert figure in text.stdout, figure


def test_inspect_check_and_unreachable(busy: tuple[Server, int]) -> None:
    s, _ = busy
    ok = lmcd("inspect", "--port", str(s.port), "--host", "127.0.0.1", "--check")
    assert ok.returncode == 0
    started = time.monotonic()
    down = lmcd("inspect", "--port", str(free_port()), "--host", "127.0.0.1", "--check")
    assert down.returncode == 1
    assert time.monotonic() - started < 10
    assert len(down.stderr.strip().splitlines()) == 1
    assert "connection refused at tcp://127.0.0.1:" in down.stderr


def _samples() -> Iterator[dict[str, Any]]:
    yield {**_fake_stats(), "uptime_s": 1.0}
    yield {**_fake_stats(), "uptime_s": 2.0, "requests": 50, "stored_bytes": 2e9}
    yield {**_fake_stats(), "uptime_s": 3.0, "requests": 60, "stored_bytes": 2e9}


def test_inspect_watch_fits_80x24_with_rates_first() -> None:
    from rich.console import Console

    from lmcd.inspect import rates_between, render_compact

    first, second, _ = _samples()
    console = Console(record=True, width=80, height=24)
    console.print(render_compact(second, rates_between(first, second)))
    lines = console.export_text().rstrip("\n").splitlines()
    frame = lines[-24:]
    assert all(len(line) <= 80 for line in lines)
    body = "\n".join(frame)
    assert "requests/s" in body
    assert "50.0" in body
    assert "2.000" in body  # store GB/s
    # The rates come before what is held.
    assert body.index("requests/s") < body.index("chunks")
    assert len([x for x in frame if x.strip()]) <= 12


def test_inspect_watch_piped_prints_a_line_per_interval() -> None:
    import io

    from rich.console import Console

    from lmcd.inspect import watch

    samples = _samples()
    out = io.StringIO()
    console = Console(file=out, width=80)
    assert not console.is_terminal
    watch(lambda: next(samples), 0.01, console, count=2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # a header, then one line per interval
    assert lines[0].split()[:3] == ["time", "req/s", "store"]
    assert lines[1].split()[1:3] == ["50.0", "2.000"]
    assert lines[2].split()[1:3] == ["10.0", "0.000"]


def test_inspect_watch_refuses_a_zero_interval() -> None:
    from rich.console import Console

    from lmcd.inspect import watch

    with pytest.raises(ValueError, match="> 0"):
        watch(_fake_stats, 0.0, Console(), count=1)


def _fake_stats() -> dict[str, Any]:
    zero = dict.fromkeys(
        (
            "capacity_bytes",
            "used_bytes",
            "chunks",
            "tokens",
            "lookups",
            "lookup_hit_chunks",
            "lookup_miss_chunks",
            "stores",
            "stored_chunks",
            "stored_bytes",
            "retrieves",
            "retrieved_chunks",
            "retrieved_bytes",
            "evicted_chunks",
            "locked_chunks",
            "failed_requests",
            "malformed_messages",
            "requests",
        ),
        0,
    )
    return {**zero, "version": "x", "chunk_size": 256, "models": {}, "instances": []}


def test_metrics_agree_with_stats(busy: tuple[Server, int]) -> None:
    s, metrics_port = busy
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    families = {f.name: f for f in text_string_to_metric_families(body.read().decode())}
    with Client("127.0.0.1", s.port) as c:
        stats = c.stats()
    # Counter families drop the _total suffix in the parser's names.
    for name in (
        "stored_chunks",
        "evicted_chunks",
        "lookup_hit_chunks",
        "retrieved_bytes",
    ):
        assert families[f"lmcd_{name}"].samples[0].value == stats[name]
    for name in ("chunks", "used_bytes", "capacity_bytes"):
        assert families[f"lmcd_{name}"].samples[0].value == stats[name]
    # Prometheus unit naming: seconds spelled out.
    assert families["lmcd_uptime_seconds"].samples[0].value > 0
    assert not any(name.endswith("_s") for name in families)
    per_model = {
        x.labels["model"]: x.value for x in families["lmcd_model_chunks"].samples
    }
    assert per_model == {"alpha": 6, "beta": 4}
    health = urllib.request.urlopen(
        f"http://127.0.0.1:{metrics_port}/healthz", timeout=5
    )
    assert health.status == 200


def test_metrics_port_in_use_is_a_clean_error(server: Server) -> None:
    import socket

    with socket.socket() as busy_sock:
        busy_sock.bind(("127.0.0.1", 0))
        busy_sock.listen()
        port = busy_sock.getsockname()[1]
        result = lmcd(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            str(port),
            "--cpu-buffer-size",
            "0.1",
        )
    assert result.returncode == 1
    assert "cannot serve metrics" in result.stderr
    assert "Traceback" not in result.stderr


def test_stats_request_type_is_the_extension_value() -> None:
    assert RequestType.STATS == 1000


# -- the metrics endpoint's HTTP edge ------------------------------------------


async def _http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send one raw HTTP/1.1 request; (status line, headers, body)."""
    import trio

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return status, headers, body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_metrics_refuses_other_methods_with_a_correct_405(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import trio

    from lmcd import metrics

    app = metrics.make_app(lambda: {"models": {}}, lambda: True)
    with caplog.at_level(logging.DEBUG), trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(metrics.serve, app, "127.0.0.1", 0)
            port = int(urls[0].rsplit(":", 1)[1])
            request = (
                f"{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            status, headers, body = await _http(port, request)
            head_status, head_headers, head_body = await _http(
                port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            nursery.cancel_scope.cancel()
    assert status == "HTTP/1.1 405 "
    assert headers["allow"] == "GET, HEAD"
    assert int(headers["content-length"]) == len(body) > 0
    assert head_status == "HTTP/1.1 200 "
    assert int(head_headers["content-length"]) == len(b"ok\n")
    assert head_body == b""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_per_model_series_are_capped_with_other() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from lmcd.metrics import MAX_MODEL_SERIES, StatsCollector

    models = {f"m{i:03d}": {"chunks": i, "bytes": 100 * i} for i in range(1, 51)}
    models["other"] = {"chunks": 1000, "bytes": 1}  # a client's model so named
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(lambda: {"models": models, "instances": []}))
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    chunks = {s.labels["model"]: s.value for s in families["lmcd_model_chunks"].samples}
    nbytes = {s.labels["model"]: s.value for s in families["lmcd_model_bytes"].samples}
    top = {f"m{i:03d}" for i in range(51 - MAX_MODEL_SERIES, 51)}
    assert set(chunks) == set(nbytes) == top | {"other"}
    assert sum(chunks.values()) == sum(u["chunks"] for u in models.values())
    assert sum(nbytes.values()) == sum(u["bytes"] for u in models.values())
    assert chunks["other"] == 1000 + sum(range(1, 51 - MAX_MODEL_SERIES))


def test_few_models_get_no_other_series() -> None:
    from lmcd.metrics import model_series

    assert model_series({"a": {"chunks": 1, "bytes": 2}}, 20) == {"a": (1, 2)}
