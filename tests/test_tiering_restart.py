"""`lmcd serve --disk-path` across restarts, as a process: a clean stop, and
a kill -9 in the middle of heavy disk writes. The client is the real lmcache
0.3.13 one on the host path, and it never registers again."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from lmcd.client import Client
from lmcd.wire.lmcache03 import RequestType
from tests.conftest import Server, start_server, stop_cleanly
from tests.lmcache_client import call, close_client, open_client
from tests.tierkit import (
    CHUNK_BYTES,
    EVENT,
    blocks_of,
    chunk_ids,
    disk_files,
    fill,
    keys,
    make_kv,
    same,
)

INSTANCE = 777


def flags(path: Path, *extra: str) -> list[str]:
    return [
        "--cpu-buffer-size",
        str(8 * CHUNK_BYTES / (1 << 30)),
        "--segment-mb",
        str(8 * CHUNK_BYTES >> 20),
        "--disk-path",
        str(path),
        "--disk-size",
        "0.1",
        *extra,
    ]


def stats(port: int) -> dict[str, Any]:
    with Client("127.0.0.1", port) as c:
        return dict(c.call(RequestType.STATS, timeout=10))


def wait_for(what: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def check(
    client: Any, kv: Any, ks: list[Any], expected: list[list[torch.Tensor]]
) -> list[bool]:
    """LOOKUP(lock) and RETRIEVE each key alone into slot 1; every chunk
    reported found must be bit-exact. Returns the found flags."""
    served = []
    for k, want in zip(ks, expected, strict=True):
        call(client, "LOOKUP", [[k], True])
        _, found = call(client, "RETRIEVE", [[k], INSTANCE, chunk_ids(1), EVENT])
        if found[0]:
            assert same(blocks_of(kv, chunk_ids(1)), want)
        served.append(bool(found[0]))
    return served


def test_a_restarted_daemon_serves_its_disk_to_a_client_that_never_registers_again(
    tmp_path: Path, context: Any
) -> None:
    path = tmp_path / "disk"
    first = start_server(*flags(path, "--disk-policy", "write-through"))
    port = first.port
    second: Server | None = None
    with make_kv() as kv:
        client = open_client(first.url, context)
        try:
            assert (
                call(client, "REGISTER_KV_CACHE", [INSTANCE, kv.register_payload()])
                is None
            )
            ks = keys(12, "restart-03")
            expected = []
            for k in ks:
                expected.append(fill(kv, chunk_ids(0)))
                assert call(client, "STORE", [[k], INSTANCE, chunk_ids(0), EVENT])[1]
            wait_for(lambda: stats(port)["tiers"]["disk"]["demotions"] == 12)
            stop_cleanly(first)
            second = start_server("--port", str(port), *flags(path))
            assert second.port == port
            second.wait_for_log("Reopened 1 saved registrations (0 dropped)")
            # The same client, never registering again, gets every chunk
            # back from disk (8 fit in the CPU buffer at once).
            assert check(client, kv, ks, expected) == [True] * 12
            disk = stats(port)["tiers"]["disk"]
            assert disk["recovered_chunks"] == 12
            assert disk["promotions"] == 12
        finally:
            close_client(client)
            if second is not None:
                stop_cleanly(second)


def test_kill_9_during_heavy_writes_then_every_chunk_served_is_bit_exact(
    tmp_path: Path, context: Any
) -> None:
    from lmcache.v1.multiprocess.protocol import RequestType as LmcacheType
    from lmcache.v1.multiprocess.protocol import get_response_class

    path = tmp_path / "disk"
    n = 40
    first = start_server(
        *flags(path, "--disk-policy", "write-through", "--disk-threads", "1"),
        "--cpu-buffer-size",
        str(n * CHUNK_BYTES / (1 << 30)),
        "--segment-mb",
        str(n * CHUNK_BYTES >> 20),
    )
    port = first.port
    second: Server | None = None
    with make_kv(n * 16) as kv:
        client = open_client(first.url, context)
        try:
            payload = [INSTANCE, kv.register_payload()]
            assert call(client, "REGISTER_KV_CACHE", payload) is None
            wait_for((path / "registrations.msgpack").exists)
            ks = keys(n, "kill-9")
            expected = [fill(kv, chunk_ids(i)) for i in range(n)]
            store = LmcacheType.STORE
            futures = [
                client.submit_request(
                    store,
                    [[k], INSTANCE, chunk_ids(i), EVENT],
                    get_response_class(store),
                )
                for i, k in enumerate(ks)
            ]
            assert all(f.result(30)[1] for f in futures)
            before = stats(port)["tiers"]["disk"]
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            # Killed with writes still queued or running.
            assert before["dirty_chunks"] + before["queue_depth"] > 0, before
            second = start_server("--port", str(port), *flags(path))
            second.wait_for_log("Reopened 1 saved registrations")
            kv.layers[0].zero_()
            served = check(client, kv, ks, expected)
            # Some writes had finished, others were cut: whatever is served
            # is whole (checked in `check`), the rest are misses.
            assert sum(served) >= max(1, before["demotions"])  # each finished write
            assert not [p for p in disk_files(path) if p.suffix == ".tmp"]
        finally:
            close_client(client)
            if first.proc.poll() is None:
                first.proc.kill()
                first.proc.wait()
            first.close_pipes()
            if second is not None:
                stop_cleanly(second)
