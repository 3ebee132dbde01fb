"""Inline engine-driven instances (lmcache 0.4.6's pickle transport, decoded
by `lmcd.wire.tensorpickle`): no pool, the chunks travel in the requests
and the results; and the other lmcache 0.4 semantics the handlers serve
(workers that are never reaped, peeking lookups, UNREGISTER_KV_CACHE of an
engine-driven worker)."""

from __future__ import annotations

import os

import attrs
import pytest
import torch
import trio

from lmcd.enginepool import POOL_PREFIX, EnginePools
from lmcd.errors import TransferError
from lmcd.transfer.host import SHM_ROOT
from lmcd.wire.types import (
    ChunkData,
    CommitRetrieve,
    CommitStore,
    PoolInfo,
    PreparedSlots,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    StartLookup,
    TokenSpan,
    UnregisterKVCache,
)
from tests.test_enginepool import (
    CHUNK,
    HIDDEN,
    LAYERS,
    MHA_CHUNK,
    Driver,
    _ids,
    make_pools,
    random_chunks,
    register,
    register_request,
    span,
)

SHAPE = (2, LAYERS, CHUNK, HIDDEN)


def as_chunks(tensors: list[torch.Tensor]) -> tuple[ChunkData, ...]:
    return tuple(
        ChunkData(
            "bfloat16",
            tuple(t.shape),
            t.contiguous().view(torch.uint8).numpy().tobytes(),
        )
        for t in tensors
    )


def pool_files() -> set[str]:
    return {n for n in os.listdir(SHM_ROOT) if n.startswith(POOL_PREFIX)}


async def register_inline(pools: EnginePools, **kw: object) -> int:
    request = register_request(inline=True, pings=False, **kw)
    info = await pools.run(pools.admit(request))
    assert info == PoolInfo("", 0)
    return request.instance_id


async def store(
    pools: EnginePools, wid: int, s: TokenSpan, tensors: list[torch.Tensor]
) -> object:
    assert pools.prepare_store(PrepareStore(s, wid)) == PreparedSlots(())
    return await pools.run(pools.admit(CommitStore(s, wid, chunks=as_chunks(tensors))))


async def test_inline_round_trip_without_a_pool() -> None:
    pools = make_pools(pool_bytes=0)  # pools off: inline needs none
    before = pool_files()
    wid = await register_inline(pools)
    assert pool_files() == before
    tensors = random_chunks(2, SHAPE, seed=4)
    s = span(2)
    assert await store(pools, wid, s, tensors) is True
    keys = pools.sessions.keys(s)
    assert pools.storage.lookup(keys, True) == 2  # a lookup's read locks
    got = await pools.run(pools.admit(PrepareRetrieve(s, wid)))
    assert isinstance(got, PreparedSlots)
    assert got.ok
    assert [bytes(c.data) for c in got.chunks] == [
        bytes(c.data) for c in as_chunks(tensors)
    ]
    assert all(c.shape == SHAPE and c.dtype == "bfloat16" for c in got.chunks)
    # The chunks left in the reply: the retrieve released its locks already.
    assert pools.storage.statistics().locked_chunks == 0
    assert pools.commit_retrieve(CommitRetrieve(s, wid)) is True
    # Stored again: present, nothing to write, still a success.
    assert await store(pools, wid, s, tensors) is True
    assert pools.counters.present_chunks == 2
    assert await pools.unregister(wid)
    pools.close()


async def test_inline_chunks_must_be_the_registered_layout() -> None:
    pools = make_pools()
    wid = await register_inline(pools)
    s = span(1)
    for bad in (
        ChunkData("float16", SHAPE, bytes(MHA_CHUNK)),
        ChunkData("bfloat16", (1, LAYERS, CHUNK, HIDDEN), bytes(MHA_CHUNK // 2)),
        ChunkData("bfloat16", SHAPE, bytes(MHA_CHUNK - 2)),
    ):
        with pytest.raises(TransferError):
            pools.admit(CommitStore(s, wid, chunks=(bad,)))
    with pytest.raises(TransferError, match="without data"):
        pools.admit(CommitStore(s, wid))
    assert pools.storage.lookup(pools.sessions.keys(s), False) == 0
    pools.close()


async def test_a_pool_instance_takes_no_inline_chunks() -> None:
    pools = make_pools()
    worker = await register(pools)
    with pytest.raises(TransferError, match="go through its pool"):
        pools.admit(
            CommitStore(
                span(1), worker.instance_id, chunks=as_chunks(random_chunks(1, SHAPE))
            )
        )
    worker.close()
    pools.close()


async def test_fewer_chunks_than_keys_store_the_prefix_and_say_false() -> None:
    pools = make_pools()
    wid = await register_inline(pools)
    s = span(3)
    assert await store(pools, wid, s, random_chunks(2, SHAPE)) is False
    assert pools.storage.lookup(pools.sessions.keys(s), False) == 2
    pools.close()


async def test_a_partial_inline_retrieve_holds_nothing() -> None:
    pools = make_pools()
    wid = await register_inline(pools)
    s = span(2)
    assert await store(pools, wid, attrs.evolve(s, end=CHUNK), random_chunks(1, SHAPE))
    keys = pools.sessions.keys(s)
    assert pools.storage.lookup(keys, True) == 1
    got = await pools.run(pools.admit(PrepareRetrieve(s, wid)))
    assert got == PreparedSlots((), ok=False)
    stats = pools.storage.statistics()
    assert stats.locked_chunks == 0
    assert stats.pinned_chunks == 0
    pools.close()


async def test_lmcache_04_workers_are_never_reaped() -> None:
    pools = make_pools()
    wid = await register_inline(pools)
    pooled = await register(pools, pings=False)
    now = pools.clock()
    assert pools.silent_instances(now + 10**6, 120, 3600) == []
    # Known again (a re-registration after a heartbeat failure): refreshed.
    again = await pools.run(
        pools.admit(register_request(wid, inline=True, pings=False))
    )
    assert again == PoolInfo("", 0)
    pooled.close()
    pools.close()


async def test_the_handlers_serve_04_semantics() -> None:
    pools = make_pools()
    d = Driver.create(pools)
    wid = next(_ids)
    tensors = random_chunks(2, SHAPE, seed=9)
    s = span(2, request_id="peek")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.handlers.run)
            ok, info = await d.call(register_request(wid, inline=True, pings=False))
            assert ok
            assert info == PoolInfo("", 0)
            assert await d.call(PrepareStore(s, wid)) == (True, PreparedSlots(()))
            assert await d.call(CommitStore(s, wid, chunks=as_chunks(tensors))) == (
                True,
                True,
            )
            assert (await d.call(StartLookup(attrs.evolve(s, worker_id=None))))[0]
            # QUERY_PREFETCH_LOOKUP_HITS peeks; QUERY_PREFETCH_STATUS collects.
            assert await d.call(QueryLookup("peek", peek=True)) == (True, 2)
            assert await d.call(QueryLookup("peek", peek=True)) == (True, 2)
            assert await d.call(QueryLookup("peek")) == (True, 2)
            assert await d.call(QueryLookup("peek")) == (True, 0)
            assert await d.call(QueryLookup("peek", peek=True)) == (True, 0)
            ok, got = await d.call(PrepareRetrieve(s, wid))
            assert isinstance(got, PreparedSlots)
            assert got.ok
            assert len(got.chunks) == 2
            assert await d.call(CommitRetrieve(s, wid)) == (True, True)
            # lmcache 0.4.6 unregisters its non-GPU context with
            # UNREGISTER_KV_CACHE.
            assert pools.registered(wid)
            assert await d.call(UnregisterKVCache(wid)) == (True, None)
            assert not pools.registered(wid)
            nursery.cancel_scope.cancel()
    pools.close()
