"""STORE, LOOKUP and RETRIEVE end to end through the host path.

A fake vLLM worker (this test) creates random paged KV caches in /dev/shm,
registers them with lmcd, and drives the real lmcache 0.3.13 client.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmcd.shmkv import SharedKVCache
from tests.conftest import Server, start_server
from tests.lmcache_client import call, close_client, key, open_client

BLOCK = 16
PER_CHUNK = 256 // BLOCK
EVENT = b"\x5a" * 64
_ids = itertools.count(10_000)


def random_kv(kind: str, dtype: str = "bfloat16", **kw: Any) -> SharedKVCache:
    kv = SharedKVCache.create(
        kind,  # type: ignore[arg-type]
        num_layers=kw.pop("num_layers", 3),
        num_blocks=kw.pop("num_blocks", 128),
        block_size=BLOCK,
        num_heads=4,
        head_size=32,
        dim=96,
        dtype=dtype,
    )
    gen = torch.Generator().manual_seed(next(_ids))
    for layer in kv.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen).to(layer.dtype))
    return kv


def blocks_of(kv: SharedKVCache, ids: list[int]) -> list[torch.Tensor]:
    if len(kv.shape) == 5:
        return [layer[:, ids].clone() for layer in kv.layers]
    return [layer[ids].clone() for layer in kv.layers]


def register(client: Any, kv: SharedKVCache) -> int:
    instance = next(_ids)
    assert call(client, "REGISTER_KV_CACHE", [instance, kv.register_payload()]) is None
    return instance


@pytest.fixture
def kv_mha() -> Iterator[SharedKVCache]:
    kv = random_kv("mha")
    yield kv
    kv.close()


@pytest.mark.parametrize(
    ("kind", "dtype"), [("mha", "bfloat16"), ("mha", "float16"), ("mla", "bfloat16")]
)
def test_store_lookup_retrieve_bit_exact(
    kind: str, dtype: str, client: Any, server: Server
) -> None:
    with random_kv(kind, dtype) as kv:
        instance = register(client, kv)
        server.wait_for_log(f"Registered KV cache for GPU ID {instance} with 3 layers")
        model = f"{kind}-{dtype}-{instance}"
        keys = [key(i, worker=0, model=model) for i in range(3)]
        src = list(range(0, 3 * PER_CHUNK))
        expected = blocks_of(kv, src)

        handle, ok = call(client, "STORE", [keys, instance, src, EVENT])
        assert (handle, ok) == (EVENT, True)
        server.wait_for_log("Stored 768 tokens")
        nil = [k.no_worker_id_version() for k in keys]
        assert call(client, "LOOKUP", [nil, True]) == [True, True, True]

        dst = list(range(3 * PER_CHUNK, 6 * PER_CHUNK))
        for layer in kv.layers:
            layer.zero_()
        handle, found = call(client, "RETRIEVE", [keys, instance, dst, EVENT])
        assert (handle, found) == (EVENT, [True, True, True])
        got = blocks_of(kv, dst)
        for a, b in zip(expected, got, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert call(client, "UNREGISTER_KV_CACHE", [instance]) is None


def test_store_skips_present_keys_and_partial_retrieve(
    client: Any, kv_mha: SharedKVCache
) -> None:
    instance = register(client, kv_mha)
    keys = [key(i, model=f"p{instance}") for i in range(4)]
    ids = list(range(4 * PER_CHUNK))
    assert call(client, "STORE", [keys[:2], instance, ids, EVENT]) == (EVENT, True)
    assert call(client, "STORE", [keys, instance, ids, EVENT]) == (EVENT, True)
    missing = [keys[0], key(99, model=f"p{instance}"), keys[2]]
    _, found = call(
        client, "RETRIEVE", [missing, instance, ids[: 3 * PER_CHUNK], EVENT]
    )
    assert found == [True, False, False]


def test_two_models_at_once(client: Any) -> None:
    with random_kv("mha") as a, random_kv("mla", "float16") as b:
        ia, ib = register(client, a), register(client, b)
        ka = [key(1, model="model-a"), key(2, model="model-a")]
        kb = [key(1, model="model-b")]
        ids = list(range(2 * PER_CHUNK))
        assert call(client, "STORE", [ka, ia, ids, EVENT])[1]
        assert call(client, "STORE", [kb, ib, ids, EVENT])[1]
        assert call(client, "LOOKUP", [ka, None]) == [True, True]
        assert call(client, "LOOKUP", [kb, None]) == [True]
        # A chunk of another layout is not retrievable into this cache.
        assert call(client, "RETRIEVE", [kb, ia, ids, EVENT])[1] == [False]


def test_tensor_parallel_pair_with_nil_worker_lookup(client: Any) -> None:
    with random_kv("mha") as r0, random_kv("mha") as r1:
        i0, i1 = register(client, r0), register(client, r1)
        ids = list(range(2 * PER_CHUNK))
        k0 = [key(h, worker=0, world=2, model="tp") for h in (1, 2)]
        k1 = [key(h, worker=1, world=2, model="tp") for h in (1, 2)]
        nil = [key(h, worker=None, world=2, model="tp") for h in (1, 2)]
        assert call(client, "STORE", [k0, i0, ids, EVENT])[1]
        assert call(client, "LOOKUP", [nil, True]) == [False, False]
        assert call(client, "STORE", [k1[:1], i1, ids, EVENT])[1]
        assert call(client, "LOOKUP", [nil, True]) == [True, False]
        assert call(client, "STORE", [k1, i1, ids, EVENT])[1]
        assert call(client, "LOOKUP", [nil, True]) == [True, True]
        expected = blocks_of(r1, ids)
        for layer in r1.layers:
            layer.zero_()
        assert call(client, "RETRIEVE", [k1, i1, ids, EVENT])[1] == [True, True]
        for a, b in zip(expected, blocks_of(r1, ids), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("keys", "ids", "why"),
    [
        (2, list(range(PER_CHUNK)), "too few block ids"),
        (1, [0] * (PER_CHUNK - 1) + [128], "block id out of range"),
        (1, [-1] + [0] * (PER_CHUNK - 1), "negative block id"),
    ],
)
def test_bad_copy_requests_fail_at_once(
    keys: int, ids: list[int], why: str, client: Any, kv_mha: SharedKVCache
) -> None:
    instance = register(client, kv_mha)
    ks = [key(i, model=f"bad{instance}") for i in range(keys)]
    assert call(client, "STORE", [ks, instance, ids, EVENT]) == (EVENT, False), why
    assert call(client, "RETRIEVE", [ks, instance, ids, EVENT]) == (
        EVENT,
        [False] * keys,
    ), why
    assert call(client, "LOOKUP", [ks, None]) == [False] * keys


def test_store_with_nil_worker_fails(client: Any, kv_mha: SharedKVCache) -> None:
    instance = register(client, kv_mha)
    ks = [key(1, worker=None)]
    assert call(client, "STORE", [ks, instance, list(range(PER_CHUNK)), EVENT]) == (
        EVENT,
        False,
    )


def _register_ext(client: Any, data: dict[str, Any]) -> int:
    import msgspec

    instance = next(_ids)
    ext = msgspec.msgpack.Ext(2, msgspec.msgpack.encode(data))
    assert call(client, "REGISTER_KV_CACHE", [instance, [ext]]) is None
    return instance


@pytest.mark.parametrize(
    ("change", "logged"),
    [
        ({"path": "/etc/passwd"}, "not under /dev/shm"),
        ({"path": "/dev/shm/../../etc/passwd"}, "not under /dev/shm"),
        ({"path": "/dev/shm/lmcd-does-not-exist"}, "cannot open"),
        ({"shape": [2, 12800, 16, 4, 32]}, "do not fit"),
        ({"shape": [3, 128, 16, 4, 32]}, "neither MHA"),
    ],
)
def test_bad_host_registrations_are_refused(
    change: dict[str, Any],
    logged: str,
    client: Any,
    server: Server,
    kv_mha: SharedKVCache,
) -> None:
    payload = kv_mha.register_payload()[0]
    import msgspec

    data = {**msgspec.msgpack.decode(payload.data), **change}
    instance = _register_ext(client, data)
    server.wait_for_log(logged)
    ks = [key(1, model="refused")]
    assert call(client, "STORE", [ks, instance, list(range(PER_CHUNK)), EVENT]) == (
        EVENT,
        False,
    )


def test_mixed_layer_shapes_are_refused(client: Any, server: Server) -> None:
    with random_kv("mha") as a, random_kv("mha", num_blocks=32) as b:
        instance = next(_ids)
        payload = [a.register_payload()[0], b.register_payload()[0]]
        assert call(client, "REGISTER_KV_CACHE", [instance, payload]) is None
        server.wait_for_log("differ in shape or dtype")


def test_chunk_size_not_multiple_of_block_size(
    server_factory: list[Server], zmq_context: Any
) -> None:
    s = start_server("--chunk-size", "100", "--cpu-buffer-size", "0.1")
    server_factory.append(s)
    c = open_client(s.url, zmq_context)
    try:
        with random_kv("mha") as kv:
            register(c, kv)
            s.wait_for_log("not a multiple of block size")
    finally:
        close_client(c)


def test_store_larger_than_buffer_evicts_and_keeps_serving(
    server_factory: list[Server], zmq_context: Any
) -> None:
    # 3 layers x 2 x 256 tokens x 128 x bf16 = 384 KiB a chunk; 4 MiB holds 10.
    s = start_server("--cpu-buffer-size", str(4 / 1024), "--segment-mb", "4")
    server_factory.append(s)
    c = open_client(s.url, zmq_context)
    try:
        with random_kv("mha", num_blocks=16 * 8) as kv:
            instance = register(c, kv)
            ids = list(range(8 * PER_CHUNK))
            prefixes = [
                [key(p * 100 + i, model="e") for i in range(8)] for p in range(4)
            ]
            for keys in prefixes:
                assert call(c, "STORE", [keys, instance, ids, EVENT]) == (EVENT, True)
            assert call(c, "LOOKUP", [prefixes[0], None]) == [False] * 8
            assert call(c, "LOOKUP", [prefixes[-1], None]) == [True] * 8
            expected = blocks_of(kv, ids)
            for layer in kv.layers:
                layer.zero_()
            assert (
                call(c, "RETRIEVE", [prefixes[-1], instance, ids, EVENT])[1]
                == [True] * 8
            )
            for a, b in zip(expected, blocks_of(kv, ids), strict=True):
                assert torch.equal(a, b)
    finally:
        close_client(c)


def test_unregister_waits_for_in_flight_copies(client: Any, server: Server) -> None:
    from lmcache.v1.multiprocess.protocol import RequestType, get_response_class

    # A copy long enough (32 layers, 32 chunks) to still run when UNREGISTER lands.
    with random_kv("mha", num_layers=32, num_blocks=32 * PER_CHUNK) as kv:
        instance = register(client, kv)
        keys = [key(i, model=f"unreg{instance}") for i in range(32)]
        ids = list(range(32 * PER_CHUNK))
        store = client.submit_request(
            RequestType.STORE,
            [keys, instance, ids, EVENT],
            get_response_class(RequestType.STORE),
        )
        unregister = client.submit_request(
            RequestType.UNREGISTER_KV_CACHE, [instance], None
        )
        assert unregister.result(30) is None
        assert store.query(), "UNREGISTER was answered before the STORE it waited for"
        assert store.result(30) == (EVENT, True)
        assert call(client, "LOOKUP", [keys, None]) == [True] * 32
        server.wait_for_log(f"Unregistered KV cache for GPU ID {instance}")
        # The instance is gone: copies for it now fail at once.
        assert call(client, "STORE", [keys[:1], instance, ids, EVENT]) == (EVENT, False)


def test_file_shrunk_after_registration_fails_the_copy_not_the_daemon(
    client: Any, server: Server
) -> None:
    import os

    kv = random_kv("mha")
    try:
        instance = register(client, kv)
        os.truncate(kv.path, 4096)  # the client breaks its own KV cache
        ks = [key(1, model=f"shrunk{instance}")]
        ids = list(range(PER_CHUNK))
        assert call(client, "STORE", [ks, instance, ids, EVENT]) == (EVENT, False)
        server.wait_for_log("shrank from")
        assert call(client, "NOOP", []) == "OK"
        assert call(client, "UNREGISTER_KV_CACHE", [instance]) is None
    finally:
        kv.layers.clear()  # its pages are gone: never touch them again
        kv.close()
