"""lmcache 0.5.6's own engine-driven worker code (its shared-memory context,
gather and scatter over paged CPU KV caches) against lmcd's pools, minus the
wire: a shim stands in for the 0.5 codec. Runs where lmcache 0.5 is
installed (`nox -s tests_lmcache05`); skipped elsewhere."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
worker_transfer = pytest.importorskip(
    "lmcache.v1.multiprocess.transfer_context.worker_transfer"
)

import torch  # noqa: E402
import trio  # noqa: E402
from lmcache.v1.multiprocess.custom_types import (  # noqa: E402
    IPCCacheServerKey,
    PrepareRetrieveResponse,
    PrepareStoreResponse,
    RegisterEngineDrivenContextResponse,
)
from lmcache.v1.multiprocess.futures import MessagingFuture  # noqa: E402

from lmcd.enginepool import EnginePools  # noqa: E402
from lmcd.lookups import Sessions  # noqa: E402
from lmcd.storage import StorageManager  # noqa: E402
from lmcd.tokens import TokenHasher  # noqa: E402
from lmcd.wire.types import (  # noqa: E402
    CommitRetrieve,
    CommitStore,
    PoolInfo,
    PoolSlot,
    PreparedSlots,
    PrepareRetrieve,
    PrepareStore,
    RegisterPool,
    TokenSpan,
    UnregisterPool,
)
from lmcd_backends.pinned_cpu import PinnedCpuTier  # noqa: E402

CHUNK, BLOCK, LAYERS, HEADS, HEAD_SIZE, BLOCKS = 32, 16, 3, 4, 8, 40
PER_CHUNK = CHUNK // BLOCK


def done(value: Any) -> MessagingFuture[Any]:
    future: MessagingFuture[Any] = MessagingFuture()
    future.set_result(value)
    return future


def span(key: IPCCacheServerKey) -> TokenSpan:
    return TokenSpan(
        key.model_name,
        key.world_size,
        key.worker_id,
        tuple(key.token_ids),
        key.start,
        key.end,
        key.request_id,
        key.cache_salt,
        max(key.num_kv_readers, 1),
    )


def slots(prepared: PreparedSlots) -> list[dict[str, Any]]:
    return [_slot(s) for s in prepared.slots]


def _slot(s: PoolSlot) -> dict[str, Any]:
    return {
        "offset": s.offset,
        "length": s.length,
        "shape": list(s.shape),
        "dtype": s.dtype,
    }


class Shim:
    """The requests lmcd's 0.5 codec makes of the worker's calls."""

    def __init__(self, pools: EnginePools) -> None:
        self.pools = pools

    def _run(self, request: Any) -> Any:
        pools = self.pools
        return trio.from_thread.run(lambda: pools.run(pools.admit(request)))

    def register_kv_cache_engine_driven_context(self, p: Any) -> MessagingFuture[Any]:
        info = self._run(
            RegisterPool(
                p.instance_id,
                p.model_name,
                p.world_size,
                p.block_size,
                p.num_layers,
                p.hidden_dim_size,
                p.dtype_str,
                p.use_mla,
                p.num_physical_slots,
            )
        )
        assert isinstance(info, PoolInfo)
        return done(RegisterEngineDrivenContextResponse(info.shm_name, info.pool_size))

    def unregister_kv_cache_engine_driven_context(
        self, iid: int
    ) -> MessagingFuture[Any]:
        return done(self._run(UnregisterPool(iid)))

    def prepare_store(self, key: IPCCacheServerKey, iid: int) -> MessagingFuture[Any]:
        r = trio.from_thread.run_sync(
            self.pools.prepare_store, PrepareStore(span(key), iid)
        )
        context = {"slots": slots(r), "chunk_indices": list(r.chunk_indices)}
        return done(PrepareStoreResponse(context))

    def commit_store(
        self, key: IPCCacheServerKey, iid: int, data: bytes
    ) -> MessagingFuture[Any]:
        assert data == b""
        return done(self._run(CommitStore(span(key), iid)))

    def prepare_retrieve(
        self, key: IPCCacheServerKey, iid: int
    ) -> MessagingFuture[Any]:
        r = self._run(PrepareRetrieve(span(key), iid))
        if not r.ok:
            return done(PrepareRetrieveResponse(False, b"", {}))
        return done(PrepareRetrieveResponse(True, b"", {"slots": slots(r)}))

    def commit_retrieve(self, key: IPCCacheServerKey, iid: int) -> MessagingFuture[Any]:
        request = CommitRetrieve(span(key), iid)
        return done(trio.from_thread.run_sync(self.pools.commit_retrieve, request))


def kv_caches(mla: bool, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (
        (BLOCKS, BLOCK, HEADS * HEAD_SIZE)
        if mla
        else (2, BLOCKS, BLOCK, HEADS, HEAD_SIZE)
    )
    return {
        f"model.layers.{i}.self_attn": torch.randn(shape, generator=gen).to(
            torch.bfloat16
        )
        for i in range(LAYERS)
    }


def key(chunks: int, request_id: str) -> IPCCacheServerKey:
    tokens = tuple(range(500, 500 + chunks * CHUNK))
    return IPCCacheServerKey(
        "e2e", 1, 0, tokens, 0, chunks * CHUNK, request_id, "", None, 1
    )


def round_trip(shim: Shim, mla: bool) -> None:
    context = worker_transfer.EngineDrivenTransferContext
    a, b = context(111, shim), context(222, shim)
    kva = kv_caches(mla, 1)
    kvb = {name: torch.zeros_like(t) for name, t in kva.items()}
    for ctx, caches in ((a, kva), (b, kvb)):
        ctx.register(
            caches, "e2e", 1, PER_CHUNK, 30.0, layout_hints={"kv_layout": "NHD"}
        )
    src, dst = [5, 6, 1, 2, 30, 31], [10, 11, 20, 21, 3, 4]
    assert a.submit_store("r", key(3, "r"), kva, [src], None, PER_CHUNK).result()
    # Stored already: the worker is told there is nothing to write.
    assert a.submit_store("r", key(3, "r"), kva, [src], None, PER_CHUNK).result()
    assert b.submit_retrieve("r2", key(3, "r2"), kvb, [dst], None, PER_CHUNK).result()
    for name in kva:
        for s, d in zip(src, dst, strict=True):
            want = kva[name][s] if mla else kva[name][:, s]
            got = kvb[name][d] if mla else kvb[name][:, d]
            assert torch.equal(want, got), (name, s, d)
    # Three of four chunks stored: the retrieve fails as a whole.
    more = [*dst, 7, 8]
    assert not b.submit_retrieve(
        "r3", key(4, "r3"), kvb, [more], None, PER_CHUNK
    ).result()
    for ctx in (a, b):
        ctx.unregister().result()
        ctx.close()


@pytest.mark.parametrize("mla", [False, True])
async def test_lmcache_engine_driven_worker_round_trip(mla: bool) -> None:
    tier = PinnedCpuTier(64 << 20, segment_bytes=64 << 20, pin=False)
    storage = StorageManager(tier=tier, clock=time.monotonic)
    pools = EnginePools(
        storage, Sessions(TokenHasher(CHUNK), time.monotonic), CHUNK, 4 << 20
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(pools.serve)
            await trio.to_thread.run_sync(round_trip, Shim(pools), mla)
            nursery.cancel_scope.cancel()
    stats = storage.statistics()
    assert (stats.chunks, stats.pinned_chunks, stats.locked_chunks) == (3, 0, 0)
    assert pools.instances() == []
