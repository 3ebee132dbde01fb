"""What only lmcd is asked: a daemon restart under connected 0.4 clients,
pickles that would run code, and one daemon detecting every dialect that
serves a lmcache 0.3.13, a 0.4.x and a 0.5.6 client at once."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from lmcd.benchmarks.lmcache05 import LMCD, blocks_equal
from lmcd.client import Client
from lmcd.shmkv import SharedKVCache
from lmcd.wire.lmcache03 import RequestType as T03
from lmcd.wire.lmcache04 import NAMES, ORDER
from tests.lmcache04.conftest import DIALECT, EVERY, lmcd_options
from tests.lmcache04.rig import (
    CHUNK,
    DATA,
    VERSION,
    Rig,
    key,
    prompt,
    rid,
    start_server,
    stop_and_restart,
    untouched,
)
from tests.peers import run as peers

TYPES = {n: i for i, n in enumerate(ORDER[VERSION], 1)}  # type: ignore[index]
enc = msgspec.msgpack.encode


def _wait(what: str, condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.mark.parametrize("dialect", [DIALECT, EVERY], ids=["chosen", "detected"])
def test_a_daemon_restart_under_connected_clients_recovers(
    dialect: str, context: Any, tmp_path: Path
) -> None:
    """lmcd stops and starts again on the same port: the clients' heartbeats
    fail (degraded: nothing is sent but pings), then succeed on the new
    daemon, whose connections they bind (when it detects dialects); the
    worker registers again
    and caching resumes."""
    options = lmcd_options(dialect)
    server = start_server(LMCD, options, tmp_path)
    rig = Rig(server.url, context, model=f"restart-{dialect}")
    try:
        a = rig.worker(DATA, seed=6, heartbeat=0.3, timeout=3.0)
        scheduler = rig.scheduler(heartbeat=0.3, timeout=3.0)
        before = prompt(2 * CHUNK)
        assert a.store(rid("before"), before, [1, 2, 3, 4])
        assert scheduler.wait_stored(before, 2 * CHUNK) == 2 * CHUNK

        def both_down() -> bool:
            return not a.healthy and not scheduler.adapter.is_healthy

        stop_and_restart(server, options, down=both_down)
        _wait("the worker to recover", lambda: a.healthy)
        _wait("the scheduler to recover", lambda: scheduler.adapter.is_healthy)
        # A new daemon: what was stored before is gone; the worker is
        # registered again, so it stores and another worker retrieves.
        assert scheduler.lookup(rid("gone"), before) == 0
        after = prompt(2 * CHUNK)
        assert a.store(rid("after"), after, [5, 6, 7, 8])
        assert scheduler.wait_stored(after, 2 * CHUNK) == 2 * CHUNK
        load = rid("load")
        assert scheduler.lookup(load, after) == 2 * CHUNK
        b = rig.worker(DATA)
        assert b.retrieve(load, after, [9, 10, 11, 12])
        assert blocks_equal(a.kv, [5, 6, 7, 8], b.kv, [9, 10, 11, 12])
        assert "Registered engine-driven worker" in server.log_tail(20_000)
    finally:
        rig.close()
        assert server.stop() == 0, server.log_tail()


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.path}",))


def test_pickles_that_would_run_code_are_refused_and_lmcd_keeps_serving(
    lmcd_server: Any, context: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker))
    rig = Rig(lmcd_server.url, context, model="pickles")
    try:
        a = rig.worker(DATA, seed=7)
        tokens = prompt(2 * CHUNK)
        k = key(rig.model, tokens, rid("evil"))
        instance = a.adapter.instance_id
        with Client("127.0.0.1", lmcd_server.port) as raw:
            assert raw.call(TYPES["GET_CHUNK_SIZE"]) == CHUNK  # type: ignore[arg-type]
            # A tensor wrapper of REGISTER_KV_CACHE (every 0.4 release).
            payloads: list[Any] = [instance + 1, [msgspec.msgpack.Ext(1, evil)]]
            payloads += ["m", 1, "vllm", {}]
            if VERSION == "0.4.7":
                payloads.append([])
            assert raw.call(TYPES["REGISTER_KV_CACHE"], *payloads) is None  # type: ignore[arg-type]
            # COMMIT_STORE's data: 0.4.6 reads it (safely), 0.4.7 refuses it.
            for data in (evil, pickle.dumps([_Evil(marker)])):
                reply = raw.call(TYPES["COMMIT_STORE"], k, instance, data)  # type: ignore[arg-type]
                assert reply is False
        assert not marker.exists()
        # Each refusal was logged, naming what the pickle asked for.
        log = lmcd_server.log_tail(50_000)
        assert "posix.system" in log or "COMMIT_STORE with data" in log
        # Still serving, the worker's own requests included.
        assert a.store(rid("store"), tokens, [1, 2, 3, 4])
        assert rig.scheduler().wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
    finally:
        rig.close()


def test_one_daemon_serves_03_04_and_05_clients_at_once(
    lmcd_mixed_server: Any, context: Any
) -> None:
    """lmcache 0.3.13's frames (lmcd's own client and a shared-memory KV
    cache, as `lmcd bench` drives the 0.3 dialect), the real 0.4.x adapters
    and lmcache 0.5.6's frames, interleaved on one daemon detecting every
    dialect."""
    rig = Rig(lmcd_mixed_server.url, context, model="mixed-04")
    c03 = Client("127.0.0.1", lmcd_mixed_server.port)
    c05 = Client("127.0.0.1", lmcd_mixed_server.port)
    kv = SharedKVCache.create(
        "mha", num_layers=2, num_blocks=16, block_size=8, num_heads=2, head_size=8
    )
    try:
        # 0.3.13 registers a shared-memory KV cache; 0.5.6 starts as its
        # adapters do; the 0.4 worker registers.
        instance03 = 90_000 + os.getpid()
        assert c03.call(T03.GET_CHUNK_SIZE) == CHUNK
        assert c05.call(21) == CHUNK  # type: ignore[arg-type]  # get_chunk_size
        a = rig.worker(DATA, seed=8)
        assert (
            c03.call(T03.REGISTER_KV_CACHE, instance03, kv.register_payload()) is None
        )
        assert c05.call(32) == []  # type: ignore[arg-type]  # get_experimental
        gen = torch.Generator().manual_seed(11)
        for layer in kv.layers:
            layer.copy_(torch.randn(layer.shape, generator=gen).to(layer.dtype))
        expected = [layer[:, [0, 1, 2, 3]].clone() for layer in kv.layers]

        # Interleaved: 0.3 stores, 0.4 stores, 0.5 pings, 0.3 looks up and
        # retrieves into other blocks, 0.4 looks up and retrieves.
        keys = [
            {"model_name": "mixed-03", "world_size": 1, "worker_id": 0, "chunk_hash": h}
            for h in (b"\x01" * 32, b"\x02" * 32)
        ]
        event = b"\x5a" * 64
        assert c03.call(T03.STORE, keys, instance03, [0, 1, 2, 3], event) == [
            event,
            True,
        ]
        tokens = prompt(2 * CHUNK)
        assert a.store(rid("store"), tokens, [3, 4, 9, 10])
        assert c05.call(22, None) is True  # type: ignore[arg-type]  # ping(nil)
        nil = [{**k, "worker_id": None} for k in keys]
        assert c03.call(T03.LOOKUP, nil, True) == [True, True]
        handle, found = c03.call(T03.RETRIEVE, keys, instance03, [4, 5, 6, 7], event)
        assert (handle, found) == (event, [True, True])
        for want, layer in zip(expected, kv.layers, strict=True):
            assert torch.equal(
                want.view(torch.uint8), layer[:, [4, 5, 6, 7]].view(torch.uint8)
            )
        scheduler = rig.scheduler()
        assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
        load = rid("load")
        assert scheduler.lookup(load, tokens) == 2 * CHUNK
        b = rig.worker(DATA)
        assert b.retrieve(load, tokens, [12, 5, 7, 1])
        assert blocks_equal(a.kv, [3, 4, 9, 10], b.kv, [12, 5, 7, 1])
        assert untouched(b.kv, [12, 5, 7, 1])
        assert c05.call(24) == "OK"  # type: ignore[arg-type]  # noop

        stats = c03.stats()
        connections = stats["connections_by_dialect"]
        assert connections["lmcache-0.3"] >= 1
        assert connections["lmcache-0.5"] == 1
        assert connections[NAMES[VERSION]] >= 3  # type: ignore[index]
        assert stats["ambiguous_messages"] == 0
        assert c03.call(T03.UNREGISTER_KV_CACHE, instance03) is None
    finally:
        rig.close()
        c03.close()
        c05.close()
        kv.close()


@pytest.mark.skipif(
    not (peers.available("lmcache03") and peers.available("lmcache05")),
    reason="needs the lmcache 0.3.13 and 0.5.6 environments (tests.peers.run)",
)
def test_one_auto_daemon_serves_real_0313_04_and_056_clients_at_once(
    lmcd_mixed_server: Any, context: Any, tmp_path: Path
) -> None:
    """`--dialect auto`: the real lmcache 0.3.13 client and the real 0.5.6
    adapters (each from its own environment, in a subprocess) and the real
    0.4.x adapters (here) store, look up and retrieve at the same time, each
    round bytes-equal, none misread or left waiting."""
    server = lmcd_mixed_server
    with Client("127.0.0.1", server.port) as probe:
        before = probe.stats()
    running = [
        peers.start(name, server.url, tmp_path) for name in ("lmcache03", "lmcache05")
    ]
    rig = Rig(server.url, context, model="auto-04")
    try:
        peers.wait_ready(running, tmp_path)
        a = rig.worker(DATA, seed=12)
        scheduler = rig.scheduler()
        b = rig.worker(DATA)
        (tmp_path / "go").touch()
        rounds = 0
        deadline = time.monotonic() + 3.0
        while rounds < 3 or time.monotonic() < deadline:
            tokens = prompt(2 * CHUNK)
            assert a.store(rid("store"), tokens, [1, 2, 3, 4])
            assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
            load = rid("load")
            assert scheduler.lookup(load, tokens) == 2 * CHUNK
            assert b.retrieve(load, tokens, [5, 6, 7, 8])
            assert blocks_equal(a.kv, [1, 2, 3, 4], b.kv, [5, 6, 7, 8])
            rounds += 1
        done = peers.finish(running, tmp_path)
        assert min(done.values()) >= peers.MIN_ROUNDS
        with Client("127.0.0.1", server.port) as probe:
            stats = probe.stats()
        connections = stats["connections_by_dialect"]
        assert connections["lmcache-0.3"] >= 1
        assert connections["lmcache-0.5"] >= 3
        assert connections[NAMES[VERSION]] >= 3  # type: ignore[index]
        assert stats["ambiguous_messages"] == before["ambiguous_messages"]
        assert stats["held_messages"] == 0
        assert "lmcache-0.4.6" in stats["dialects"]  # auto, not a named list
    finally:
        peers.kill(running)
        rig.close()
