"""One `--dialect auto` daemon serving a client of the lmcache 0.3 dialect
and the real lmcache 0.5.6 adapters at the same time, and again after a
restart, when every client resumes on a new connection mid-stream.

The 0.3 side is lmcd's own 0.3-framed client with a host-path KV cache
(lmcache 0.3.13 and 0.5.6 cannot be imported in one process); the 0.5
side is lmcache's real scheduler and worker adapters.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from lmcd.benchmarks.lmcache05 import Scheduler, blocks_equal, zmq_context
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


def test_a_status_query_first_after_a_restart_is_answered_promptly(
    tmp_path: Path,
) -> None:
    """`--dialect auto` detects the 0.4 dialects too, whose END_SESSION has
    the frames of 0.5's query_prefetch_status (`[9, request_id]`). A 0.5
    scheduler whose first message to a restarted daemon is such a query
    (its lookup was acknowledged by the old daemon) is not left waiting for
    its next heartbeat (set to a minute here): the query is held until the
    scheduler's next lookup binds the connection, then answered first, as
    0.5's status query."""
    port = free_port()
    log = tmp_path / "lmcd.log"
    proc = _start(port, log)
    ctx = zmq_context()
    rig = Rig(f"tcp://127.0.0.1:{port}", ctx, model="resume-05")
    try:
        worker = rig.worker(seed=3)
        tokens = prompt(2 * CHUNK)
        assert worker.store(rid("store"), tokens, [1, 2, 3, 4])
        scheduler = Scheduler.start(
            rig.url, ctx, model=rig.model, block_size=BLOCK, timeout=5.0, heartbeat=60.0
        )
        rig.opened.append(scheduler)
        adapter = scheduler.adapter
        assert scheduler.lookup(rid("warm"), tokens) == 2 * CHUNK  # bound, served

        # A lookup the old daemon acknowledges; its status is not asked yet.
        first = rid("first")
        adapter.maybe_submit_lookup_request(first, list(tokens))
        for fut in adapter._unacked_lookups[first].futures.values():
            fut.result(5.0)  # raises TimeoutError if unanswered
        stop(proc)
        proc = _start(port, log)
        assert adapter.is_healthy  # no heartbeat noticed the restart

        # The query is the first message the new daemon sees: held.
        assert adapter.check_lookup_result(first) is None
        time.sleep(0.5)
        assert adapter.check_lookup_result(first) is None
        # The scheduler's next lookup binds the connection to 0.5: the query
        # is answered (0: the new daemon has no such lookup), then the lookup.
        started = time.monotonic()
        second = rid("second")
        adapter.maybe_submit_lookup_request(second, list(tokens))
        while (hit := adapter.check_lookup_result(first)) is None:
            assert time.monotonic() - started < 3.0, "the held query was not served"
            time.sleep(0.01)
        assert hit == 0
        assert adapter.is_healthy
        adapter.cleanup_lookup_result(first)
        while (hit := adapter.check_lookup_result(second)) is None:
            assert time.monotonic() - started < 3.0
            time.sleep(0.01)
        assert hit == 0  # the new daemon is empty
        assert adapter.is_healthy
        with Client("127.0.0.1", port) as probe:
            stats = probe.stats()
        assert stats["released_messages"] == 1
        assert stats["ambiguous_messages"] == 0
        assert stats["held_messages"] == 0
        assert "lmcache-0.4.6" in stats["dialects"]  # auto includes 0.4
    finally:
        rig.close()
        ctx.term()
        stop(proc)
