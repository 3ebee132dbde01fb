"""Control-plane requests from the real lmcache 0.3.13 client to `lmcd serve`."""

from __future__ import annotations

import json
from typing import Any

import zmq

from tests.conftest import Server, start_server
from tests.lmcache_client import call, close_client, key, open_client
from tests.test_wire import VECTORS, frames


def test_get_chunk_size_default(client: Any) -> None:
    assert call(client, "GET_CHUNK_SIZE", []) == 256


def test_get_chunk_size_configured(
    server_factory: list[Server], zmq_context: Any
) -> None:
    s = start_server("--chunk-size", "512", "--cpu-buffer-size", "0.1")
    server_factory.append(s)
    c = open_client(s.url, zmq_context)
    try:
        assert call(c, "GET_CHUNK_SIZE", []) == 512
    finally:
        close_client(c)


def test_noop(client: Any) -> None:
    assert call(client, "NOOP", []) == "OK"


def test_lookup_on_empty_cache_is_all_false(client: Any) -> None:
    keys = [key(i, worker=None, world=2) for i in range(4)]
    assert call(client, "LOOKUP", [keys, True]) == [False] * 4
    assert call(client, "LOOKUP", [[key(1, worker=1, world=2)], None]) == [False]
    assert call(client, "LOOKUP", [[], True]) == []


def test_clear_and_unregister_unknown(client: Any, server: Server) -> None:
    assert call(client, "CLEAR", []) is None
    assert call(client, "UNREGISTER_KV_CACHE", [4242]) is None
    server.wait_for_log("No KV cache found for GPU ID 4242")
    assert call(client, "NOOP", []) == "OK"


def test_store_and_retrieve_for_unregistered_instance_fail_honestly(
    client: Any,
) -> None:
    handle = b"\xaa" * 64
    assert call(client, "STORE", [[key(1)], 99, list(range(16)), handle]) == (
        handle,
        False,
    )
    assert call(
        client, "RETRIEVE", [[key(1), key(2)], 99, list(range(32)), handle]
    ) == (
        handle,
        [False, False],
    )


def test_register_without_gpu_is_answered_and_logged(
    server: Server, zmq_context: Any
) -> None:
    """The captured REGISTER frames carry fake CUDA handles: answered, logged."""
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.url)
    for v in VECTORS:
        if v["request"] == "REGISTER_KV_CACHE":
            sock.send_multipart(frames(v["client_frames_hex"]))
            assert sock.poll(10_000), "REGISTER was not answered"
            assert sock.recv_multipart() == frames(v["reply_frames_hex"])
    server.wait_for_log("REGISTER_KV_CACHE for GPU ID")
    server.wait_for_log(") failed: ")
    sock.close(linger=0)


def test_scheduler_adapter_against_lmcd(server: Server, zmq_context: Any) -> None:
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        LMCacheMPSchedulerAdapter,
    )

    adapter = LMCacheMPSchedulerAdapter(
        server.url,
        zmq_context,
        model_name="Qwen/Qwen3-14B",
        world_size=2,
        kv_rank=0,
        vllm_block_size=16,
    )
    try:
        assert adapter.chunk_size == 256
        hashes = [bytes([i]) * 32 for i in range(64)]  # 4 chunks of 16 blocks
        adapter.maybe_submit_lookup_request("req-1", hashes)
        result = None
        for _ in range(500):
            result = adapter.check_lookup_result("req-1")
            if result is not None:
                break
            import time

            time.sleep(0.01)
        assert result == 0
    finally:
        close_client(adapter.mq_client)


def test_stats_extension(server: Server, zmq_context: Any) -> None:
    import msgspec

    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.url)
    sock.send_multipart([msgspec.msgpack.encode(1), msgspec.msgpack.encode(1000)])
    assert sock.poll(10_000)
    _, _, body = sock.recv_multipart()
    stats = msgspec.msgpack.decode(body)
    assert stats["chunk_size"] == 256
    assert stats["capacity_bytes"] == int(0.25 * (1 << 30))
    json.dumps(stats)
    sock.close(linger=0)
