"""Engine-driven transfers through daemon-owned shared-memory pools
(lmcd.enginepool), in-process: the worker's side maps the pool file as
lmcache's `EngineDrivenContextShm` does and views slots with the shape and
dtype the daemon hands out."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import mmap
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import msgspec
import pytest
import torch
import trio
import trio.testing

from lmcd import enginepool
from lmcd.enginepool import EnginePools, create_pool_file, remove_stale_pools
from lmcd.errors import RegistrationError, TransferError
from lmcd.handlers import Handlers
from lmcd.lookups import LookupJobs, Sessions
from lmcd.scheduler import TransferScheduler
from lmcd.shmkv import SharedKVCache
from lmcd.storage import StorageManager
from lmcd.tokens import TokenHasher
from lmcd.transfer.host import SHM_ROOT
from lmcd.transfer.layouts import KVLayout
from lmcd.wire.detect import DialectRouter
from lmcd.wire.types import (
    CommitRetrieve,
    CommitStore,
    HostTensorRef,
    Ping,
    PoolInfo,
    PreparedSlots,
    PrepareRetrieve,
    PrepareStore,
    RegisterKVCache,
    RegisterPool,
    Request,
    Retrieve,
    StartLookup,
    Store,
    TokenSpan,
    UnregisterPool,
)
from lmcd_backends.pinned_cpu import PinnedCpuTier
from tests.fakes import ScriptedDialect

CHUNK = 16
LAYERS = 2
HEADS = 2
HEAD_SIZE = 8
HIDDEN = HEADS * HEAD_SIZE
MODEL = "pool-model"
MHA_CHUNK = 2 * LAYERS * CHUNK * HIDDEN * 2  # bytes, bfloat16
SLOT = 4096  # one 4 KiB-aligned slot per chunk here
_ids = itertools.count(7_000)
_requests = itertools.count()


def make_pools(
    pool_bytes: int = 16 * SLOT,
    clock: Callable[[], float] = time.monotonic,
    ttl: float = enginepool.DEFAULT_PREPARE_TTL,
) -> EnginePools:
    tier = PinnedCpuTier(1 << 20, segment_bytes=1 << 20, pin=False)
    storage = StorageManager(tier=tier, clock=clock)
    sessions = Sessions(TokenHasher(CHUNK), clock)
    return EnginePools(storage, sessions, CHUNK, pool_bytes, clock=clock, ttl=ttl)


def register_request(
    instance_id: int | None = None, *, mla: bool = False, **kw: Any
) -> RegisterPool:
    fields: dict[str, Any] = {
        "instance_id": next(_ids) if instance_id is None else instance_id,
        "model_name": MODEL,
        "world_size": 1,
        "block_size": CHUNK,
        "num_layers": LAYERS,
        "hidden": HIDDEN,
        "dtype": "bfloat16",
        "mla": mla,
        "slots_per_chunk": CHUNK,
    }
    fields.update(kw)
    return RegisterPool(**fields)


def span(
    chunks: int,
    start: int = 0,
    *,
    worker_id: int | None = 0,
    request_id: str | None = None,
    first_token: int = 1000,
    model: str = MODEL,
) -> TokenSpan:
    tokens = tuple(range(first_token, first_token + chunks * CHUNK))
    return TokenSpan(
        model,
        1,
        worker_id,
        tokens,
        start * CHUNK,
        chunks * CHUNK,
        request_id if request_id is not None else f"req-{next(_requests)}",
    )


@attrs.define
class Worker:
    """The engine's side: its pool mapped read-write, slots viewed as the
    daemon describes them (lmcache's `_make_tensor_view`)."""

    instance_id: int
    info: PoolInfo
    map: mmap.mmap
    views: list[torch.Tensor] = attrs.field(factory=list)

    def slots(self, prepared: PreparedSlots) -> list[torch.Tensor]:
        out = []
        for slot in prepared.slots:
            dtype = getattr(torch, slot.dtype)
            itemsize = torch.empty((), dtype=dtype).element_size()
            flat = torch.frombuffer(
                self.map, dtype=dtype, count=slot.length // itemsize, offset=slot.offset
            )
            out.append(flat.view(slot.shape))
        self.views.extend(out)
        return out

    def close(self) -> None:
        self.views.clear()
        with contextlib.suppress(BufferError):
            self.map.close()


async def register(pools: EnginePools, **kw: Any) -> Worker:
    request = register_request(**kw)
    info = await pools.run(pools.admit(request))
    assert isinstance(info, PoolInfo)
    fd = os.open(f"{SHM_ROOT}/{info.shm_name.lstrip('/')}", os.O_RDWR)
    try:
        m = mmap.mmap(fd, info.pool_size)
    finally:
        os.close(fd)
    return Worker(request.instance_id, info, m)


@pytest.fixture
async def pools() -> AsyncIterator[EnginePools]:
    p = make_pools()
    yield p
    p.close()


def random_chunks(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(n)]


async def store(
    pools: EnginePools, worker: Worker, s: TokenSpan, chunks: list[torch.Tensor]
) -> PreparedSlots:
    """prepare_store, write the chunks the daemon asks for, commit_store."""
    prepared = pools.prepare_store(PrepareStore(s, worker.instance_id))
    for view, index in zip(worker.slots(prepared), prepared.chunk_indices, strict=True):
        view.copy_(chunks[index])
    if prepared.slots:
        ok = await pools.run(pools.admit(CommitStore(s, worker.instance_id)))
        assert ok is True
    return prepared


async def retrieve(
    pools: EnginePools, worker: Worker, s: TokenSpan
) -> list[torch.Tensor] | None:
    prepared = await pools.run(pools.admit(PrepareRetrieve(s, worker.instance_id)))
    assert isinstance(prepared, PreparedSlots)
    out = (
        [v.clone() for v in worker.slots(prepared)]
        if prepared.ok and prepared.slots
        else None
    )
    pools.commit_retrieve(CommitRetrieve(s, worker.instance_id))
    return out


def exists(path: str) -> bool:
    """Whether `path` exists (a tmpfs stat: it never blocks)."""
    return os.path.exists(path)


def used(pools: EnginePools, worker: Worker) -> int:
    pool = pools._instances[worker.instance_id].pool
    assert pool is not None
    return pool.arena.used


# -- the round trip -----------------------------------------------------------


@pytest.mark.parametrize("mla", [False, True])
async def test_store_then_retrieve_bit_exact_through_the_pool(
    pools: EnginePools, mla: bool
) -> None:
    writer = await register(pools, mla=mla)
    reader = await register(pools, mla=mla)
    assert writer.info.shm_name != reader.info.shm_name  # a pool each
    shape = (LAYERS, CHUNK, HIDDEN) if mla else (2, LAYERS, CHUNK, HIDDEN)
    chunks = random_chunks(3, shape)
    s = span(3)

    prepared = pools.prepare_store(PrepareStore(s, writer.instance_id))
    # The real server's reply shape: 4 KiB-aligned slots, chunk-shaped.
    assert prepared.chunk_indices == (0, 1, 2)
    assert [slot.offset % 4096 for slot in prepared.slots] == [0, 0, 0]
    assert len({slot.offset for slot in prepared.slots}) == 3
    assert {(slot.shape, slot.dtype, slot.length) for slot in prepared.slots} == {
        (shape, "bfloat16", math.prod(shape) * 2)
    }
    for view, i in zip(writer.slots(prepared), prepared.chunk_indices, strict=True):
        view.copy_(chunks[i])
    assert await pools.run(pools.admit(CommitStore(s, writer.instance_id))) is True
    assert used(pools, writer) == 0
    assert pools.storage.statistics().chunks == 3

    # Stored once: the same span again has nothing to write.
    again = pools.prepare_store(PrepareStore(span(3), writer.instance_id))
    assert again == PreparedSlots((), ())

    got = await retrieve(pools, reader, span(3))
    assert got is not None
    assert all(torch.equal(a, b) for a, b in zip(got, chunks, strict=True))
    stats = pools.storage.statistics()
    assert stats.pinned_chunks == 0
    assert used(pools, reader) == 0
    for w in (writer, reader):
        w.close()


async def test_only_missing_chunks_get_slots(pools: EnginePools) -> None:
    worker = await register(pools)
    chunks = random_chunks(4, (2, LAYERS, CHUNK, HIDDEN))
    await store(pools, worker, span(2), chunks)
    prepared = await store(pools, worker, span(4), chunks)
    assert prepared.chunk_indices == (2, 3)
    got = await retrieve(pools, worker, span(4))
    assert got is not None
    assert all(torch.equal(a, b) for a, b in zip(got, chunks, strict=True))
    # A span starting past chunk 0 gets indices relative to its start.
    prepared = pools.prepare_store(PrepareStore(span(5, start=4), worker.instance_id))
    assert prepared.chunk_indices == (0,)
    worker.close()


# -- the same chunks as every other path --------------------------------------


async def test_pool_chunks_are_host_path_chunks_and_back() -> None:
    """A chunk stored through a pool is found by a lookup and retrieved by a
    host-path (lmcache-driven) instance of the same model, and the reverse."""
    pools = make_pools()
    scheduler = TransferScheduler(pools.storage, CHUNK)
    scheduler.peers.append(pools)
    kv = SharedKVCache.create(
        "mha",
        num_layers=LAYERS,
        num_blocks=8,
        block_size=CHUNK,
        num_heads=HEADS,
        head_size=HEAD_SIZE,
    )
    worker: Worker | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            assert not scheduler.serves(MODEL, 1)
            worker = await register(pools)
            # Lookups answer for models only engine-driven workers run.
            assert scheduler.serves(MODEL, 1)
            host_id = next(_ids)
            refs = tuple(
                HostTensorRef(
                    kv.path, i * kv.layers[0].numel() * 2, kv.shape, "bfloat16"
                )
                for i in range(LAYERS)
            )
            host = await scheduler.register(
                RegisterKVCache(host_id, refs, MODEL, 1, refresh=True)
            )
            pool_instance = pools._instances[worker.instance_id]
            assert host.layout.tag == pool_instance.layout.tag
            assert host.layout.chunk_bytes(CHUNK) == pool_instance.chunk_bytes

            # Pool -> storage -> host blocks 3 and 5.
            chunks = random_chunks(2, (2, LAYERS, CHUNK, HIDDEN), seed=1)
            s = span(2)
            await store(pools, worker, s, chunks)
            keys = pools.sessions.keys(s)
            assert pools.storage.lookup(keys, False) == 2
            job = scheduler.admit_retrieve(Retrieve(tuple(keys), host_id, (3, 5), b""))
            assert (await scheduler.run_retrieve(job)).found == 2
            for chunk, block in zip(chunks, (3, 5), strict=True):
                for layer in range(LAYERS):
                    for plane in range(2):
                        got = kv.layers[layer][plane, block].reshape(CHUNK, HIDDEN)
                        assert torch.equal(got, chunk[plane, layer])

            # Host blocks 1 and 2 -> storage -> pool.
            s2 = span(2, first_token=5000)
            keys2 = pools.sessions.keys(s2)
            job2 = scheduler.admit_store(Store(tuple(keys2), host_id, (1, 2), b""))
            assert (await scheduler.run_store(job2)).ok
            got2 = await retrieve(pools, worker, s2)
            assert got2 is not None
            for chunk, block in zip(got2, (1, 2), strict=True):
                for layer in range(LAYERS):
                    for plane in range(2):
                        want = kv.layers[layer][plane, block].reshape(CHUNK, HIDDEN)
                        assert torch.equal(chunk[plane, layer], want)
            nursery.cancel_scope.cancel()
    finally:
        if worker is not None:
            worker.close()
        pools.close()
        kv.close()


def test_layout_tag_matches_a_host_instance_of_the_same_model() -> None:
    host = KVLayout.detect([(2, 8, CHUNK, HEADS, HEAD_SIZE)] * LAYERS, ["bfloat16"] * 2)
    mla_host = KVLayout.detect([(8, CHUNK, 96)] * LAYERS, ["bfloat16"] * 2)
    pools = make_pools()
    layout, shape = pools._layout(register_request())
    assert (layout.tag, shape) == (host.tag, (2, LAYERS, CHUNK, HIDDEN))
    layout, shape = pools._layout(register_request(mla=True, hidden=96))
    assert (layout.tag, shape) == (mla_host.tag, (LAYERS, CHUNK, 96))


# -- room ---------------------------------------------------------------------


async def test_a_full_pool_is_an_honest_failure() -> None:
    pools = make_pools(pool_bytes=2 * SLOT)
    worker = await register(pools)
    chunks = random_chunks(3, (2, LAYERS, CHUNK, HIDDEN))
    s = span(3)
    with trio.fail_after(5):
        # Two slots: the leading two chunks are granted, the third is not.
        prepared = pools.prepare_store(PrepareStore(s, worker.instance_id))
        assert prepared.chunk_indices == (0, 1)
        assert pools.counters.short_chunks == 1
        # Nothing left for another request: a failure, nothing held.
        reserved = pools.storage.statistics().reserved_chunks
        with pytest.raises(TransferError, match="no room"):
            pools.prepare_store(
                PrepareStore(span(1, first_token=9), worker.instance_id)
            )
        assert pools.storage.statistics().reserved_chunks == reserved
        for view, i in zip(worker.slots(prepared), (0, 1), strict=True):
            view.copy_(chunks[i])
        assert await pools.run(pools.admit(CommitStore(s, worker.instance_id)))
        # A retrieve bigger than the pool fails at once and holds nothing.
        await store(pools, worker, span(3, request_id="r2"), chunks)
        s3 = span(3)
        assert pools.storage.lookup(pools.sessions.keys(s3), True) == 3
        with pytest.raises(TransferError, match="no room in pool"):
            pools.admit(PrepareRetrieve(s3, worker.instance_id))
    stats = pools.storage.statistics()
    assert (stats.pinned_chunks, stats.locked_chunks) == (0, 0)
    assert used(pools, worker) == 0
    worker.close()
    pools.close()


async def test_a_partial_retrieve_is_refused_and_holds_nothing(
    pools: EnginePools,
) -> None:
    worker = await register(pools)
    await store(pools, worker, span(2), random_chunks(2, (2, LAYERS, CHUNK, HIDDEN)))
    s = span(3)
    assert pools.storage.lookup(pools.sessions.keys(s), True) == 2
    job = pools.admit(PrepareRetrieve(s, worker.instance_id))
    assert await pools.run(job) == PreparedSlots((), ok=False)
    stats = pools.storage.statistics()
    assert (stats.pinned_chunks, stats.locked_chunks) == (0, 0)
    assert used(pools, worker) == 0
    # The worker commits after a failed prepare too: answered, not an error.
    assert pools.commit_retrieve(CommitRetrieve(s, worker.instance_id)) is False
    worker.close()


# -- prepares never committed -------------------------------------------------


async def test_uncommitted_prepares_are_freed_after_the_ttl(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Time moves only when the test says so: an autojumping clock would
    # jump to the TTL while the retrieve's copy waits in its thread.
    pools = make_pools(clock=trio.current_time, ttl=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pools.serve)
        worker = await register(pools)
        chunks = random_chunks(2, (2, LAYERS, CHUNK, HIDDEN))
        await store(pools, worker, span(2, request_id="kept"), chunks)
        s = span(2, request_id="abandoned", first_token=1)
        pools.prepare_store(PrepareStore(s, worker.instance_id))
        r = span(2, request_id="kept")
        pools.storage.lookup(pools.sessions.keys(r), True)
        await pools.run(pools.admit(PrepareRetrieve(r, worker.instance_id)))
        stats = pools.storage.statistics()
        assert (stats.reserved_chunks, stats.pinned_chunks) == (2, 2)
        assert used(pools, worker) == 4 * SLOT
        mock_clock.jump(29)
        await trio.testing.wait_all_tasks_blocked()
        assert used(pools, worker) == 4 * SLOT
        mock_clock.jump(10)
        await trio.testing.wait_all_tasks_blocked()
        assert used(pools, worker) == 0
        stats = pools.storage.statistics()
        assert (stats.reserved_chunks, stats.pinned_chunks, stats.locked_chunks) == (
            0,
            0,
            0,
        )
        assert pools.counters.expired_prepares == 2
        with pytest.raises(TransferError, match="without a pending prepare_store"):
            pools.admit(CommitStore(s, worker.instance_id))
        worker.close()
        nursery.cancel_scope.cancel()
    assert pools.instances() == []


async def test_preparing_the_same_transfer_again_frees_the_first(
    pools: EnginePools,
) -> None:
    worker = await register(pools)
    s = span(2, request_id="twice")
    pools.prepare_store(PrepareStore(s, worker.instance_id))
    chunks = random_chunks(2, (2, LAYERS, CHUNK, HIDDEN))
    await store(pools, worker, s, chunks)
    assert pools.counters.replaced_prepares == 1
    assert used(pools, worker) == 0
    assert pools.storage.statistics().reserved_chunks == 0
    assert pools.storage.statistics().chunks == 2
    worker.close()


async def test_unregister_frees_everything_and_removes_the_pool(
    pools: EnginePools,
) -> None:
    worker = await register(pools)
    path = f"{SHM_ROOT}/{worker.info.shm_name}"
    chunks = random_chunks(2, (2, LAYERS, CHUNK, HIDDEN))
    await store(pools, worker, span(2, request_id="a"), chunks)
    pools.prepare_store(PrepareStore(span(2, first_token=7), worker.instance_id))
    r = span(2, request_id="a")
    pools.storage.lookup(pools.sessions.keys(r), True)
    await pools.run(pools.admit(PrepareRetrieve(r, worker.instance_id)))
    assert exists(path)
    assert await pools.run(pools.admit(UnregisterPool(worker.instance_id))) is None
    stats = pools.storage.statistics()
    assert (stats.reserved_chunks, stats.pinned_chunks, stats.locked_chunks) == (
        0,
        0,
        0,
    )
    assert stats.chunks == 2  # committed chunks stay in the cache
    assert not exists(path)
    assert not pools.serves(MODEL, 1)
    with pytest.raises(TransferError):
        pools.prepare_store(PrepareStore(span(1), worker.instance_id))
    worker.close()


async def test_unregister_waits_for_a_running_copy(
    pools: EnginePools, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = enginepool.read_slots

    def slow_read(fd: int, copies: Any) -> None:
        entered.set()
        release.wait(10)
        real(fd, copies)

    monkeypatch.setattr(enginepool, "read_slots", slow_read)
    worker = await register(pools)
    pool = pools._instances[worker.instance_id].pool
    assert pool is not None
    chunks = random_chunks(2, (2, LAYERS, CHUNK, HIDDEN))
    s = span(2)
    prepared = pools.prepare_store(PrepareStore(s, worker.instance_id))
    for view, i in zip(worker.slots(prepared), (0, 1), strict=True):
        view.copy_(chunks[i])
    job = pools.admit(CommitStore(s, worker.instance_id))
    results: dict[str, object] = {}

    async def commit() -> None:
        results["commit"] = await pools.run(job)

    async def unregister() -> None:
        results["unregister"] = await pools.run(
            pools.admit(UnregisterPool(worker.instance_id))
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await trio.to_thread.run_sync(entered.wait)
            nursery.start_soon(unregister)
            await trio.sleep(0.2)
            assert "unregister" not in results
            os.fstat(pool.fd)  # still open: the copy reads through it
            assert exists(pool.path)
            release.set()
    assert results == {"commit": True, "unregister": None}
    assert pool.fd == -1
    assert not exists(pool.path)
    keys = pools.sessions.keys(s)
    assert pools.storage.lookup(keys, False) == 2
    worker.close()


async def test_a_transfer_being_copied_cannot_be_committed_or_replaced(
    pools: EnginePools, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = enginepool.write_slots

    def slow_write(fd: int, copies: Any) -> None:
        entered.set()
        release.wait(10)
        real(fd, copies)

    monkeypatch.setattr(enginepool, "write_slots", slow_write)
    worker = await register(pools)
    chunks = random_chunks(2, (2, LAYERS, CHUNK, HIDDEN))
    await store(pools, worker, span(2), chunks)
    s = span(2)
    job = pools.admit(PrepareRetrieve(s, worker.instance_id))
    got: list[object] = []

    async def prepare() -> None:
        got.append(await pools.run(job))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prepare)
            await trio.to_thread.run_sync(entered.wait)
            with pytest.raises(TransferError, match="before its prepare_retrieve"):
                pools.commit_retrieve(CommitRetrieve(s, worker.instance_id))
            with pytest.raises(TransferError, match="being copied"):
                pools.admit(PrepareRetrieve(s, worker.instance_id))
            assert pools.storage.statistics().pinned_chunks == 2
            release.set()
    prepared = got[0]
    assert isinstance(prepared, PreparedSlots)
    views = worker.slots(prepared)
    assert all(torch.equal(a, b) for a, b in zip(views, chunks, strict=True))
    assert pools.commit_retrieve(CommitRetrieve(s, worker.instance_id))
    assert pools.storage.statistics().pinned_chunks == 0
    worker.close()


async def test_a_truncated_pool_fails_the_copy_not_the_daemon(
    pools: EnginePools,
) -> None:
    worker = await register(pools)
    s = span(2)
    pools.prepare_store(PrepareStore(s, worker.instance_id))
    worker.close()
    os.truncate(f"{SHM_ROOT}/{worker.info.shm_name}", 0)
    with pytest.raises(TransferError, match="truncated"):
        await pools.run(pools.admit(CommitStore(s, worker.instance_id)))
    stats = pools.storage.statistics()
    assert (stats.reserved_chunks, stats.chunks) == (0, 0)
    assert pools.counters.failed_copies == 1


# -- bad requests -------------------------------------------------------------


async def test_bad_spans_and_unknown_instances_fail(pools: EnginePools) -> None:
    worker = await register(pools)
    wid = worker.instance_id
    for bad in (span(1, worker_id=None), span(1, model="other-model")):
        with pytest.raises(TransferError):
            pools.prepare_store(PrepareStore(bad, wid))
        with pytest.raises(TransferError):
            pools.admit(PrepareRetrieve(bad, wid))
    unknown = 12345
    with pytest.raises(TransferError, match="no engine-driven pool"):
        pools.prepare_store(PrepareStore(span(1), unknown))
    for request in (
        CommitStore(span(1), unknown),
        PrepareRetrieve(span(1), unknown),
        UnregisterPool(unknown),
    ):
        with pytest.raises(TransferError, match="no engine-driven pool"):
            pools.admit(request)
    with pytest.raises(TransferError):
        pools.commit_retrieve(CommitRetrieve(span(1), unknown))
    with pytest.raises(TransferError, match="without a pending"):
        pools.admit(CommitStore(span(1), wid))
    # A commit naming other tokens than its prepare stores nothing.
    s = span(2, request_id="changed")
    pools.prepare_store(PrepareStore(s, wid))
    other = attrs.evolve(s, token_ids=tuple(range(2 * CHUNK)))
    with pytest.raises(TransferError, match="other tokens"):
        pools.admit(CommitStore(other, wid))
    assert pools.storage.statistics().reserved_chunks == 0
    assert used(pools, worker) == 0
    worker.close()


async def test_registration_checks(pools: EnginePools) -> None:
    for bad in (
        register_request(slots_per_chunk=CHUNK * 2),
        register_request(block_size=5),
        register_request(dtype="complex128"),
        register_request(hidden=1 << 20),  # one chunk bigger than the pool
    ):
        with pytest.raises(RegistrationError):
            pools.admit(bad)
    off = make_pools(pool_bytes=0)
    with pytest.raises(RegistrationError, match="pool-size 0"):
        off.admit(register_request())
    few = make_pools()
    few.max_pools = 1
    first = await register(few)
    with pytest.raises(RegistrationError, match="at most 1"):
        few.admit(register_request())
    first.close()
    few.close()
    # Registering a known instance refreshes it; no second pool.
    worker = await register(pools)
    before = set(os.listdir(SHM_ROOT))
    again = await pools.run(pools.admit(register_request(worker.instance_id)))
    assert again == worker.info
    assert set(os.listdir(SHM_ROOT)) == before
    worker.close()


# -- the pool file ------------------------------------------------------------


async def test_pool_file_is_private_fully_backed_and_removed(
    pools: EnginePools,
) -> None:
    import _posixshmem  # type: ignore[import-not-found]

    worker = await register(pools)
    name = worker.info.shm_name
    # lmcache's client maps `name.lstrip("/")` with shm_open.
    assert name == f"lmcd-pool-{os.getpid()}-{name.rsplit('-', 1)[1]}"
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    os.close(fd)
    st = os.stat(f"{SHM_ROOT}/{name}")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert st.st_size == worker.info.pool_size == pools.pool_bytes
    assert st.st_blocks * 512 >= st.st_size  # backed, not sparse
    worker.close()
    pools.close()
    assert not exists(f"{SHM_ROOT}/{name}")


def test_a_full_tmpfs_is_a_failed_registration(tmp_path: Any) -> None:
    # /dev/shm is tmpfs; fallocate of more than it holds fails at once.
    free = os.statvfs(SHM_ROOT)
    too_big = (free.f_blocks * free.f_frsize // 4096 + 1) * 4096
    before = set(os.listdir(SHM_ROOT))
    with pytest.raises(RegistrationError, match="pool-size"):
        create_pool_file(too_big)
    assert set(os.listdir(SHM_ROOT)) == before


def test_a_squatted_name_is_skipped_not_taken_over(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path)
    monkeypatch.setattr(enginepool, "_names", itertools.count(5))
    squatter = f"{root}/lmcd-pool-{os.getpid()}-5"
    with open(squatter, "wb") as f:
        f.write(b"not yours")
    name, fd = create_pool_file(4096, root=root)
    try:
        assert name == f"lmcd-pool-{os.getpid()}-6"
        with open(squatter, "rb") as f:
            assert f.read() == b"not yours"
    finally:
        os.close(fd)
        enginepool._live_names.discard(name)


async def test_a_replaced_pool_file_is_not_removed(pools: EnginePools) -> None:
    worker = await register(pools)
    worker.close()
    path = f"{SHM_ROOT}/{worker.info.shm_name}"
    os.unlink(path)  # the worker's uid may replace the name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        await pools.unregister(worker.instance_id)
        assert exists(path)
    finally:
        os.unlink(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_pools_of_dead_daemons_are_removed_and_nothing_else(
    tmp_path: Any,
) -> None:
    root = str(tmp_path)
    dead, me = _dead_pid(), os.getpid()

    def touch(name: str) -> str:
        path = f"{root}/{name}"
        with open(path, "wb") as f:
            f.write(b"x")
        return path

    stale = touch(f"lmcd-pool-{dead}-0")
    reused_pid = touch(f"lmcd-pool-{me}-999999")  # ours, not made by us
    live = touch(f"lmcd-pool-{os.getppid()}-0")
    other_owner = touch(f"lmcd-pool-{dead}-1")
    os.chown(other_owner, 65534, 65534)
    locked = touch(f"lmcd-pool-{dead}-2")
    lock_fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # a live daemon in another pid namespace
    os.symlink(stale, f"{root}/lmcd-pool-{dead}-3")
    unrelated = touch(f"lmcd-kv-{dead}-0")
    name, fd = create_pool_file(4096, root=root)  # live, ours
    fcntl.flock(fd, fcntl.LOCK_UN)  # only the live-name set protects it now
    try:
        removed = remove_stale_pools(root)
        assert sorted(removed) == sorted(
            [os.path.basename(stale), os.path.basename(reused_pid)]
        )
        for path in (live, other_owner, locked, unrelated, f"{root}/{name}"):
            assert exists(path), path
        assert os.path.islink(f"{root}/lmcd-pool-{dead}-3")
    finally:
        os.close(lock_fd)
        os.close(fd)
        enginepool._live_names.discard(name)


# -- liveness -----------------------------------------------------------------


async def test_heartbeats_and_reaping(pools: EnginePools) -> None:
    scheduler = TransferScheduler(pools.storage, CHUNK)
    scheduler.peers.append(pools)
    worker = await register(pools)
    wid = worker.instance_id
    instance = pools._instances[wid]
    now = pools.clock()
    assert pools.silent_instances(now + 100, 120, 3600) == []
    assert pools.silent_instances(now + 3601, 120, 3600) == [wid]
    assert scheduler.heartbeat(wid)
    assert instance.pinged
    assert pools.silent_instances(pools.clock() + 121, 120, 3600) == [wid]
    assert await pools.unregister(wid)
    assert not scheduler.heartbeat(wid)
    assert not await pools.unregister(wid)
    worker.close()


# -- through the handlers -----------------------------------------------------


@attrs.define
class Driver:
    """Handlers with pools, fed scripted requests; `call` waits for the reply."""

    pools: EnginePools
    handlers: Handlers
    dialect: ScriptedDialect
    replies: dict[bytes, list[bytes]] = attrs.field(factory=dict)
    arrived: dict[bytes, trio.Event] = attrs.field(factory=dict)
    uids: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))

    @classmethod
    def create(cls, pools: EnginePools) -> Driver:
        scheduler = TransferScheduler(pools.storage, CHUNK)
        scheduler.peers.append(pools)
        dialect = ScriptedDialect()
        driver = cls(pools, None, dialect)  # type: ignore[arg-type]
        driver.handlers = Handlers(
            pools.storage,
            scheduler,
            CHUNK,
            driver.send,
            DialectRouter((dialect,)),
            pools.sessions,
            LookupJobs(time.monotonic),
            pools=pools,
        )
        return driver

    def send(self, frames: list[bytes]) -> None:
        uid = frames[1]
        self.replies[uid] = frames[2:]
        self.arrived.setdefault(uid, trio.Event()).set()

    async def call(self, request: Request) -> tuple[bool, object]:
        uid = msgspec.msgpack.encode(next(self.uids))
        self.dialect.requests[uid] = request
        arrived = self.arrived.setdefault(uid, trio.Event())
        self.handlers.on_message(b"client", [uid, msgspec.msgpack.encode(1)])
        await arrived.wait()
        return self.replies[uid] == [b"ok"], self.dialect.results.get(uid)


async def test_the_handlers_dispatch_every_pool_request() -> None:
    pools = make_pools()
    d = Driver.create(pools)
    wid = next(_ids)
    chunks = random_chunks(2, (2, LAYERS, CHUNK, HIDDEN))
    s = span(2, request_id="h")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.handlers.run)
            ok, info = await d.call(register_request(wid))
            assert ok
            assert isinstance(info, PoolInfo)
            fd = os.open(f"{SHM_ROOT}/{info.shm_name}", os.O_RDWR)
            worker = Worker(wid, info, mmap.mmap(fd, info.pool_size))
            os.close(fd)
            assert await d.call(Ping(wid)) == (True, True)
            assert pools._instances[wid].pinged
            ok, prepared = await d.call(PrepareStore(s, wid))
            assert isinstance(prepared, PreparedSlots)
            for view, i in zip(worker.slots(prepared), (0, 1), strict=True):
                view.copy_(chunks[i])
            assert await d.call(CommitStore(s, wid)) == (True, True)
            # The lookup counts the model as served by the pool's worker.
            assert (await d.call(StartLookup(attrs.evolve(s, worker_id=None))))[0]
            assert d.handlers.jobs.collect("h") == 2
            ok, got = await d.call(PrepareRetrieve(s, wid))
            assert isinstance(got, PreparedSlots)
            assert got.ok
            views = worker.slots(got)
            assert all(torch.equal(a, b) for a, b in zip(views, chunks, strict=True))
            assert await d.call(CommitRetrieve(s, wid)) == (True, True)
            assert pools.storage.statistics().locked_chunks == 0
            assert d.handlers.stats()["requests_by_type"]["PrepareStore"] == 1
            assert await d.call(UnregisterPool(wid)) == (True, None)
            assert not exists(f"{SHM_ROOT}/{info.shm_name}")
            worker.close()
            nursery.cancel_scope.cancel()


async def test_the_handlers_answer_failures() -> None:
    pools = make_pools()
    d = Driver.create(pools)
    wid = next(_ids)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.handlers.run)
            assert (await d.call(register_request(wid)))[0]
            for request in (
                PrepareStore(span(1, worker_id=None), wid),
                CommitStore(span(1), 999),
                PrepareRetrieve(span(1), 999),
                CommitRetrieve(span(1), 999),
                UnregisterPool(999),
                register_request(slots_per_chunk=3),
            ):
                assert await d.call(request) == (False, None), request
            assert d.handlers.counters.failed_requests == 6
            assert await d.call(UnregisterPool(wid)) == (True, None)
            nursery.cancel_scope.cancel()
    pools.close()


async def test_without_pools_the_requests_fail() -> None:
    tier = PinnedCpuTier(1 << 20, segment_bytes=1 << 20, pin=False)
    storage = StorageManager(tier=tier, clock=time.monotonic)
    dialect = ScriptedDialect()
    replies: list[list[bytes]] = []
    handlers = Handlers(
        storage,
        TransferScheduler(storage, CHUNK),
        CHUNK,
        replies.append,
        DialectRouter((dialect,)),
        Sessions(TokenHasher(CHUNK), time.monotonic),
        LookupJobs(time.monotonic),
    )
    uid = msgspec.msgpack.encode(1)
    dialect.requests[uid] = PrepareStore(span(1), 1)
    handlers.on_message(b"c", [uid, msgspec.msgpack.encode(1)])
    assert replies == [[b"c", uid, b"failed"]]


@pytest.fixture
def _no_leftovers() -> Iterator[None]:
    before = {n for n in os.listdir(SHM_ROOT) if n.startswith("lmcd-pool-")}
    yield
    after = {n for n in os.listdir(SHM_ROOT) if n.startswith("lmcd-pool-")}
    assert after <= before


@pytest.mark.usefixtures("_no_leftovers")
async def test_the_daemon_removes_its_pools_at_shutdown() -> None:
    from lmcd.config import Config
    from lmcd.daemon import Daemon

    daemon = Daemon(
        Config(
            host="127.0.0.1", port=0, chunk_size=CHUNK, cpu_buffer_size=0.01, pool_mb=1
        )
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            info = await daemon.pools.run(daemon.pools.admit(register_request()))
            assert isinstance(info, PoolInfo)
            assert exists(f"{SHM_ROOT}/{info.shm_name}")
            assert daemon.handlers.stats()["engine_pools"]["pools"] == 1
            nursery.cancel_scope.cancel()
    assert not exists(f"{SHM_ROOT}/{info.shm_name}")
