"""`lmcd.tiering` against a storage manager with real host memory and copy
tiers held in memory (or a real `DiskTier`): promotion, locks, timeouts,
demotion policy, the remote queue, registrations across restarts."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import trio
import trio.lowlevel
import trio.testing

from lmcd.errors import RegistrationError
from lmcd.storage import State, StorageManager
from lmcd.tiering import (
    LocalLookup,
    Policy,
    Registrations,
    Tiering,
    decode_object_key,
    decode_registration,
    encode_registration,
    object_id,
    object_key,
)
from lmcd.wire.types import (
    CacheKey,
    CudaTensorRef,
    EngineGroup,
    HostTensorRef,
    LayoutHints,
    RegisterKVCache,
    TokenKey,
)
from lmcd_backends.disk import DiskTier
from lmcd_backends.pinned_cpu import PinnedCpuTier
from tests.fakes import FakeClock
from tests.tierkit import MemoryTier

CHUNK = 64 << 10
LAYOUT = "mha:bfloat16:2x128"


def k(i: int, worker: int | None = 0, world: int = 1) -> CacheKey:
    return CacheKey("m", world, worker, i.to_bytes(8, "big"))


def data(i: int) -> bytes:
    return (i.to_bytes(8, "big") * (CHUNK // 8))[:CHUNK]


@attrs.define
class Rig:
    storage: StorageManager
    tiers: Tiering
    clock: FakeClock

    def store(self, keys: list[CacheKey]) -> None:
        res = self.storage.reserve(keys, CHUNK, LAYOUT)
        for entry in res.entries:
            buf: Any = self.storage.buffer(entry)
            buf[:CHUNK] = torch.frombuffer(
                bytearray(data(_index(entry.key))), dtype=torch.uint8
            )
        self.storage.commit(res)

    def content(self, key: CacheKey) -> bytes:
        entry = self.storage.get(key)
        assert entry is not None
        buf: Any = self.storage.buffer(entry)
        return bytes(buf[:CHUNK].numpy())

    async def quiet(self) -> None:
        while self.tiers.busy:  # noqa: ASYNC110 - polls another task's progress
            await trio.sleep(0.001)


def _index(key: CacheKey) -> int:
    return int.from_bytes(key.chunk_hash, "big")


@asynccontextmanager
async def rig(
    chunks: int = 8,
    disk: Any = None,
    remote: Any = None,
    **kwargs: Any,
) -> AsyncIterator[Rig]:
    clock = FakeClock()
    cpu = PinnedCpuTier(chunks * CHUNK, segment_bytes=chunks * CHUNK, pin=False)
    storage = StorageManager(cpu, clock)
    kwargs.setdefault("layouts", lambda: [(None, None, LAYOUT, CHUNK)])
    tiers = Tiering(storage, disk, remote, **kwargs)
    storage.on_commit = tiers.on_commit
    async with trio.open_nursery() as nursery:
        await nursery.start(tiers.run)
        yield Rig(storage, tiers, clock)
        nursery.cancel_scope.cancel()


def entry_locks(r: Rig, key: CacheKey) -> int | None:
    entry = r.storage.get(key)
    return None if entry is None or entry.state is not State.COMMITTED else entry.locks


# -- keys -----------------------------------------------------------------------


def test_object_keys_round_trip_and_differ_by_kind() -> None:
    a = CacheKey("m", 2, 1, b"h")
    b = TokenKey("m", 2, 1, b"h", salt="s")
    assert decode_object_key(object_key(a)) == a
    assert decode_object_key(object_key(b)) == b
    assert object_key(a) != object_key(TokenKey("m", 2, 1, b"h"))
    assert decode_object_key(b"junk") is None
    assert decode_object_key(object_key(CacheKey("m", 2, None, b"h"))) is None
    assert object_id(a, "L", 5).nbytes == 5


# -- promotion ------------------------------------------------------------------


async def test_locked_lookup_promotes_disk_chunks_with_its_locks() -> None:
    disk = MemoryTier("disk")
    keys = [k(i) for i in range(4)]
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        r.store(keys)
        await r.quiet()
        assert all(r.tiers.on_disk(key) for key in keys)
        r.storage.clear()
        local = r.tiers.lookup(keys, lock=True, readers=2)
        assert local.hits == 4
        assert len(local.promotions) == 4
        assert await r.tiers.settle(keys, local, True, 2) == 4
        for key in keys:
            assert entry_locks(r, key) == 2
            assert r.content(key) == data(_index(key))
        assert r.tiers.statistics()["disk"]["promotions"] == 4


async def test_failed_promotion_cuts_the_prefix_and_gives_back_later_locks() -> None:
    disk = MemoryTier("disk")
    keys = [k(i) for i in range(4)]
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        r.store(keys)
        await r.quiet()
        r.storage.clear()
        r.store([keys[3]])  # key 3 is back in CPU, key 1 will not read
        disk.fail.add(object_id(keys[1], LAYOUT, CHUNK))
        local = r.tiers.lookup(keys, lock=True)
        assert local.hits == 4
        assert await r.tiers.settle(keys, local, True) == 1
        assert entry_locks(r, keys[0]) == 1  # the retrieve gives this one back
        assert entry_locks(r, keys[1]) is None  # a miss, never wrong data
        assert entry_locks(r, keys[2]) == 0  # promoted, lock given back
        assert entry_locks(r, keys[3]) == 0  # CPU hit past the cut: given back
        assert not r.tiers.on_disk(keys[1])
        assert r.tiers.lookup(keys, lock=False).hits == 1


async def test_retrieve_waits_for_promotion_and_leaks_no_lock() -> None:
    disk = MemoryTier("disk")
    keys = [k(i) for i in range(3)]
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        r.store(keys)
        await r.quiet()
        r.storage.clear()
        disk.gate = trio.Event()
        promotions = r.tiers.before_retrieve(keys)
        assert len(promotions) == 3
        assert r.storage.pin(keys, CHUNK, LAYOUT).entries == ()  # not yet in CPU
        disk.gate.set()
        assert await r.tiers.wait(promotions) == 3
        pin = r.storage.pin(keys, CHUNK, LAYOUT)
        r.tiers.after_retrieve(promotions)
        assert len(pin.entries) == 3
        r.storage.unpin(pin, completed=True)
        assert [entry_locks(r, key) for key in keys] == [0, 0, 0]


async def test_promotion_wait_is_bounded_and_late_commits_take_no_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = MemoryTier("disk")
    keys = [k(i) for i in range(2)]
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH, promotion_timeout=2) as r:
        r.store(keys)
        await r.quiet()
        r.storage.clear()
        disk.gate = trio.Event()
        local = r.tiers.lookup(keys, lock=True)
        started = trio.current_time()
        with trio.fail_after(60):
            assert await r.tiers.settle(keys, local, True) == 0
        assert 2 <= trio.current_time() - started < 3
        disk.gate.set()
        await r.quiet()
        assert [entry_locks(r, key) for key in keys] == [0, 0]


async def test_lookup_without_lock_counts_disk_chunks_and_promotes_nothing() -> None:
    disk = MemoryTier("disk")
    keys = [k(i) for i in range(3)]
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        r.store(keys)
        await r.quiet()
        r.storage.clear()
        local = r.tiers.lookup(keys, lock=False)
        assert local == LocalLookup(3, (), False)
        assert disk.calls.get("get_into", 0) == 0


async def test_nil_worker_lookup_promotes_every_rank() -> None:
    disk = MemoryTier("disk")
    ranks = [k(7, worker=w, world=2) for w in range(2)]
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        r.store(ranks)
        await r.quiet()
        r.storage.clear()
        r.store([ranks[0]])
        nil = [k(7, worker=None, world=2)]
        local = r.tiers.lookup(nil, lock=True)
        assert local.hits == 1
        assert len(local.promotions) == 1
        assert await r.tiers.settle(nil, local, True) == 1
        assert [entry_locks(r, key) for key in ranks] == [1, 1]


# -- demotion -------------------------------------------------------------------


async def test_write_back_starts_at_the_high_water_mark() -> None:
    disk = MemoryTier("disk")
    async with rig(disk=disk) as r:
        r.store([k(i) for i in range(6)])  # 75% of 8 chunks
        await r.quiet()
        assert r.tiers.disk_chunks == 0
        r.store([k(6)])  # 87.5%
        await r.quiet()
        assert r.tiers.disk_chunks == 7
        # Eviction now finds chunks that are on disk: nothing is lost.
        for i in range(7, 20):
            r.store([k(i)])
            await r.quiet()
        stats = r.tiers.statistics()["disk"]
        assert stats["evicted_before_written"] == 0
        assert r.storage.statistics().evicted_chunks >= 10
        assert r.tiers.lookup([k(i) for i in range(20)], lock=False).hits == 20


async def test_demotion_keeps_the_eviction_order() -> None:
    disk = MemoryTier("disk")
    async with rig(disk=disk, high_water=0.9) as r:
        r.store([k(i) for i in range(7)])  # below the mark: stays in CPU only
        await r.quiet()
        assert r.tiers.disk_chunks == 0
        r.tiers.lookup([k(0)], lock=False)  # k(0) is now the most recent
        r.store([k(7)])  # full: everything is demoted
        await r.quiet()
        r.store([k(8)])  # evicts the least recently used (now on disk)
        assert r.storage.get(k(1)) is None
        assert r.storage.get(k(0)) is not None


async def test_background_copies_never_pin_more_than_a_quarter_of_the_buffer() -> None:
    disk = MemoryTier("disk")
    disk.put_gate = trio.Event()  # a disk that does not finish writing
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        r.store([k(i) for i in range(8)])  # a full buffer to write at once
        await trio.sleep(0.01)
        held = [e for e in r.storage.entries() if e.holds]
        assert 0 < len(held) <= 2
        for i in range(8, 40):
            r.store([k(i)])  # never refused: evictable chunks remain
            await trio.lowlevel.checkpoint()
        assert r.storage.statistics().store_refused_chunks == 0
        disk.put_gate.set()


async def test_chunks_being_written_down_are_never_evicted_under_the_copy() -> None:
    disk = MemoryTier("disk")
    disk.put_gate = trio.Event()
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        for i in range(30):
            r.store([k(i)])  # evicts, but never a chunk being written
            await trio.lowlevel.checkpoint()
        disk.put_gate.set()
        await r.quiet()
        assert disk.objects
        for oid, raw in disk.objects.items():
            key = decode_object_key(oid.key)
            assert key is not None
            assert raw == data(_index(key))


async def test_disk_capacity_deletes_least_recently_used_chunks(tmp_path: Path) -> None:
    from lmcd_backends.disk.format import file_size

    size = file_size(object_id(k(0), LAYOUT, CHUNK))
    disk = DiskTier(tmp_path / "d", 5 * size, threads=2)
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        for i in range(30):
            r.store([k(i)])
            await r.quiet()
            assert disk.usage().used_bytes <= 5 * size
        stats = r.tiers.statistics()["disk"]
        assert stats["chunks"] == 5
        assert stats["deletions"] == 25
        assert all(r.tiers.on_disk(k(i)) for i in range(25, 30))


async def test_clear_forgets_disk_chunks_and_deletes_them() -> None:
    disk = MemoryTier("disk")
    async with rig(disk=disk, policy=Policy.WRITE_THROUGH) as r:
        r.store([k(i) for i in range(3)])
        await r.quiet()
        r.storage.clear()
        assert r.tiers.clear() == 3
        await trio.sleep(0.01)
        assert not disk.objects
        assert r.tiers.lookup([k(0)], lock=True).hits == 0


async def test_restart_seeds_the_index_from_the_disk(tmp_path: Path) -> None:
    keys = [k(i) for i in range(5)]
    async with rig(
        disk=DiskTier(tmp_path / "d", 1 << 30), policy=Policy.WRITE_THROUGH
    ) as r:
        r.store(keys)
        await r.quiet()
    async with rig(disk=DiskTier(tmp_path / "d", 1 << 30)) as r:
        assert r.tiers.disk_chunks == 5
        local = r.tiers.lookup(keys, lock=True)
        assert await r.tiers.settle(keys, local, True) == 5
        assert all(r.content(key) == data(i) for i, key in enumerate(keys))


# -- remote ---------------------------------------------------------------------


async def test_remote_hits_after_a_local_miss_are_promoted_and_queued_for_disk() -> (
    None
):
    remote = MemoryTier("remote")
    disk = MemoryTier("disk")
    keys = [k(i) for i in range(4)]
    for i, key in enumerate(keys):
        remote.objects[object_id(key, LAYOUT, CHUNK)] = data(i)
    async with rig(disk=disk, remote=remote, policy=Policy.WRITE_THROUGH) as r:
        r.store(keys[:1])
        await r.quiet()
        local = r.tiers.lookup(keys, lock=True)
        assert (local.hits, local.remote) == (1, True)
        assert await r.tiers.settle(keys, local, True) == 4
        assert remote.calls["contains"] == 1  # one batch for every miss
        assert [r.content(key) for key in keys] == [data(i) for i in range(4)]
        assert [entry_locks(r, key) for key in keys] == [1, 1, 1, 1]
        await r.quiet()
        assert all(r.tiers.on_disk(key) for key in keys)
        assert r.tiers.statistics()["remote"]["promotions"] == 3


async def test_stored_chunks_are_written_through_to_the_remote_tier() -> None:
    remote = MemoryTier("remote")
    async with rig(remote=remote) as r:
        r.store([k(i) for i in range(3)])
        while len(remote.objects) < 3:  # noqa: ASYNC110
            await trio.sleep(0.001)
        assert remote.objects[object_id(k(2), LAYOUT, CHUNK)] == data(2)
        # Local eviction never deletes from the shared tier.
        r.store([k(i) for i in range(3, 20)])
        await trio.sleep(0.05)
        assert object_id(k(0), LAYOUT, CHUNK) in remote.objects


async def test_a_stuck_remote_tier_drops_writes_and_never_blocks_stores() -> None:
    remote = MemoryTier("remote")
    remote.put_gate = trio.Event()
    async with rig(remote=remote, remote_queue=4) as r:
        for i in range(40):
            r.store([k(i)])
            await trio.lowlevel.checkpoint()
        stats = r.tiers.statistics()["remote"]
        assert stats["dropped_writes"] >= 40 - 4 - 2 * 8
        assert r.storage.statistics().store_refused_chunks == 0
        remote.put_gate.set()


# -- registrations --------------------------------------------------------------


def test_registrations_round_trip() -> None:
    request = RegisterKVCache(
        7,
        (
            HostTensorRef("/dev/shm/lmcd-x", 4096, (2, 3), "bfloat16"),
            CudaTensorRef(
                (0, b"h", 3, 0, b"r", 0, b"e", True), "float16", (1, 2), 0, None
            ),
        ),
        model_name="m",
        world_size=2,
        groups=(EngineGroup(0, (0, 1), 16),),
        refresh=True,
        engine="vllm",
        hints=LayoutHints("NHD"),
    )
    assert decode_registration(encode_registration(request)) == request
    with pytest.raises(ValueError, match="not a saved registration"):
        decode_registration({"layers": []})


async def test_registrations_are_saved_restored_and_dropped_when_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = RegisterKVCache(1, (HostTensorRef("/dev/shm/lmcd-a", 0, (1,), "uint8"),))
    gone = RegisterKVCache(2, (HostTensorRef("/dev/shm/lmcd-b", 0, (1,), "uint8"),))
    saved = Registrations(str(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(saved.run)
        saved.changed(1, good)
        saved.changed(2, gone)
        saved.changed(3, good)
        saved.changed(3, None)
        nursery.cancel_scope.cancel()
    assert os.stat(saved.path).st_mode & 0o777 == 0o600
    again = Registrations(str(tmp_path))
    opened: list[int] = []

    async def register(request: RegisterKVCache) -> None:
        if request.instance_id == 2:
            raise RegistrationError("no such file")
        opened.append(request.instance_id)
        again.changed(request.instance_id, request)

    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        assert await again.restore(register) == (1, 1)
        nursery.cancel_scope.cancel()
    assert opened == [1]
    assert "GPU ID 2 dropped: no such file" in caplog.text
    assert [r.instance_id for r in Registrations(str(tmp_path)).load()] == [1]


def test_unreadable_registrations_start_empty(tmp_path: Path) -> None:
    (tmp_path / "registrations.msgpack").write_bytes(b"\xc1garbage")
    assert Registrations(str(tmp_path)).load() == []
