"""One `--dialect auto` daemon serving a client of the lmcache 0.3 dialect
and the real lmcache 0.5.6 adapters at the same time, and again after a
restart, when every client resumes on a new connection mid-stream.

The 0.3 side is lmcd's own 0.3-framed client with a host-path KV cache
(lmcache 0.3.13 and 0.5.6 cannot be imported in one process); the 0.5
side is lmcache's real scheduler and worker adapters.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from lmcd.benchmarks.lmcache05 import blocks_equal, zmq_context
from lmcd.client import Client
from lmcd.shmkv import SharedKVCache
from lmcd.spawn import free_port, serve_command, stop, wait_ready
from lmcd.wire.lmcache03 import RequestType
from tests.lmcache05.helpers import CHUNK, Rig, prompt, rid

BLOCK = 8  # tokens per block; a 0.3 chunk is CHUNK tokens = 2 blocks
EVENT = b"\x01" * 64


def _start(port: int, log: Path) -> subprocess.Popen[str]:
    with log.open("a") as out:
        proc = subprocess.Popen(
            serve_command(
                port, "--chunk-size", str(CHUNK), "--cpu-buffer-size", "0.25"
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    wait_ready(port, proc)
    return proc


def _key(i: int) -> dict[str, Any]:
    return {
        "model_name": "mixed-03",
        "world_size": 1,
        "worker_id": 0,
        "chunk_hash": i.to_bytes(8, "big"),
    }


def _old_client_round_trip(client: Client, kv: SharedKVCache, instance: int) -> None:
    """0.3: register, store two chunks, lookup with lock, retrieve elsewhere."""
    assert client.call(RequestType.GET_CHUNK_SIZE) == CHUNK
    assert (
        client.call(RequestType.REGISTER_KV_CACHE, instance, kv.register_payload())
        is None
    )
    keys = [_key(100 + instance), _key(200 + instance)]
    assert client.call(RequestType.STORE, keys, instance, [1, 2, 3, 4], EVENT) == [
        EVENT,
        True,
    ]
    assert client.call(RequestType.LOOKUP, keys, True) == [True, True]
    assert client.call(RequestType.RETRIEVE, keys, instance, [5, 6, 7, 8], EVENT) == [
        EVENT,
        [True, True],
    ]
    for layer in kv.layers:
        assert torch.equal(layer[:, 1:5], layer[:, 5:9])


def test_a_03_client_and_056_adapters_share_one_daemon(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "lmcd.log"
    proc = _start(port, log)
    ctx = zmq_context()
    rig = Rig(f"tcp://127.0.0.1:{port}", ctx, model="mixed-05")
    kv = SharedKVCache.create(
        "mha",
        num_layers=2,
        num_blocks=16,
        block_size=BLOCK,
        num_heads=2,
        head_size=8,
        dtype="bfloat16",
        name="mixed",
    )
    try:
        for layer in kv.layers:
            layer.copy_(torch.randn(layer.shape).to(layer.dtype))
        with Client("127.0.0.1", port) as old:
            # Interleaved: a 0.5 worker stores while the 0.3 client works.
            new = rig.worker(seed=7)
            tokens = prompt(2 * CHUNK)
            assert new.store(rid("store"), tokens, [1, 2, 3, 4])
            _old_client_round_trip(old, kv, 31_001)
            scheduler = rig.scheduler()
            load = rid("load")
            assert scheduler.lookup(load, tokens) == 2 * CHUNK
            reader = rig.worker()
            assert reader.retrieve(load, tokens, [5, 6, 7, 8])
            assert blocks_equal(new.kv, [1, 2, 3, 4], reader.kv, [5, 6, 7, 8])
            stats = old.stats()
            assert stats["connections_by_dialect"]["lmcache-0.3"] >= 1
            assert stats["connections_by_dialect"]["lmcache-0.5"] >= 3
            assert stats["ambiguous_messages"] == 0

            # Restart the daemon under both: each client reconnects with a
            # new identity and resumes mid-stream (no GET_CHUNK_SIZE first).
            stop(proc)
            proc = _start(port, log)
            # 0.3: a LOOKUP is its first message to the new daemon, which is
            # empty: misses, in 0.3's shape (a list of bools, not a 0.5 ack).
            keys = [_key(100 + 31_001), _key(200 + 31_001)]
            assert old.call(RequestType.LOOKUP, keys, True, timeout=15) == [
                False,
                False,
            ]
            # 0.5: the scheduler resumes with a lookup of its own.
            assert scheduler.lookup(rid("after"), tokens) == 0
            stats = old.stats()
            assert stats["ambiguous_messages"] == 0
            assert stats["connections_by_dialect"]["lmcache-0.3"] >= 1
            assert stats["connections_by_dialect"]["lmcache-0.5"] >= 1
    finally:
        rig.close()
        kv.close()
        ctx.term()
        stop(proc)
