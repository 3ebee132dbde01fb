"""The scheduler's completion seam, on CPU, with fake copies and a mock clock.

A fake copier issues nothing and hands back the real CUDA-path completion
(`EventCompletion`) over a fake event that the test completes or fails, so
commit-after-completion, cancellation and UNREGISTER waiting for a pending
copy run exactly the code the CUDA path runs. Time is virtual
(`autojump_clock`): polling sleeps cost nothing and nothing depends on the
speed of the machine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from lmcd.errors import TransferError
from lmcd.scheduler import Instance, TransferScheduler
from lmcd.storage import StorageManager
from lmcd.transfer.completion import EventCompletion
from lmcd.transfer.layouts import KVLayout
from lmcd.wire.types import CacheKey, CopyResult, Retrieve, Store
from lmcd_backends.pinned_cpu import PinnedCpuTier

CHUNK_TOKENS = 256
LAYOUT = KVLayout("mla", 1, 64, 16, 16, "float16")  # 8 KiB chunks, 16 blocks each
BLOCKS = tuple(range(16))


def key(i: int) -> CacheKey:
    return CacheKey("m", 1, 0, i.to_bytes(4, "big"))


@attrs.define
class FakeKV:
    layout: KVLayout = LAYOUT
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeEvent:
    """A device event: not done until the test says so."""

    done: bool = False
    error: Exception | None = None
    queries: int = 0

    def query(self) -> bool:
        self.queries += 1
        if self.error is not None:
            raise self.error
        return self.done


@attrs.define
class FakeCopier:
    """Issues no copy; each STORE/RETRIEVE completes when its event does."""

    detached: bool = True
    fail_issue: bool = False
    events: list[FakeEvent] = attrs.field(factory=list)
    completions: list[EventCompletion] = attrs.field(factory=list)

    async def store(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Any,
        tokens: int,
        limiter: Any,
        skip: Any = (),
    ) -> EventCompletion:
        await trio.lowlevel.checkpoint()
        if self.fail_issue:
            raise RuntimeError("could not issue the copy")
        event = FakeEvent()
        self.events.append(event)
        completion = EventCompletion(
            event, b"done:" + event_handle, [chunks], detached=self.detached
        )
        self.completions.append(completion)
        return completion

    retrieve = store


@attrs.define
class Rig:
    scheduler: TransferScheduler
    storage: StorageManager
    copier: FakeCopier
    instance: Instance
    nursery: trio.Nursery


@asynccontextmanager
async def rig(*, detached: bool = True) -> AsyncIterator[Rig]:
    tier = PinnedCpuTier(1 << 20, segment_bytes=1 << 20, pin=False)
    storage = StorageManager(tier=tier, clock=trio.current_time)
    scheduler = TransferScheduler(storage, CHUNK_TOKENS)
    copier = FakeCopier(detached=detached)
    instance = Instance(1, "host", FakeKV(), 16, copier=copier)  # type: ignore[arg-type]
    scheduler.attach(instance)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        yield Rig(scheduler, storage, copier, instance, nursery)
        nursery.cancel_scope.cancel()


def store_request(*keys: CacheKey) -> Store:
    return Store(tuple(keys), 1, BLOCKS * len(keys), b"ev")


def retrieve_request(*keys: CacheKey) -> Retrieve:
    return Retrieve(tuple(keys), 1, BLOCKS * len(keys), b"ev")


def stored(storage: StorageManager, *keys: CacheKey) -> int:
    return storage.lookup(list(keys), lock=False)


async def test_detached_store_commits_only_once_its_event_completes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig() as r:
        job = r.scheduler.admit_store(store_request(key(1), key(2)))
        reply = await r.scheduler.run_store(job)
        # The reply carries the copy's event before the copy has finished...
        assert reply == CopyResult(True, b"done:ev")
        await trio.sleep(5)
        # ...and the chunks stay invisible, reserved, until it has.
        assert stored(r.storage, key(1)) == 0
        assert r.storage.statistics().reserved_chunks == 2
        assert r.instance.inflight == 1
        assert r.copier.events[0].queries > 10  # polled, without blocking Trio
        r.copier.events[0].done = True
        await trio.sleep(1)
        assert stored(r.storage, key(1), key(2)) == 2
        assert r.storage.statistics().reserved_chunks == 0
        assert r.instance.inflight == 0
        assert r.copier.completions[0].keep == []  # released


async def test_unregister_waits_for_a_pending_copy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig() as r:
        await r.scheduler.run_store(r.scheduler.admit_store(store_request(key(1))))
        unregistered = trio.Event()

        async def unregister() -> None:
            assert await r.scheduler.unregister(1)
            unregistered.set()

        r.nursery.start_soon(unregister)
        await trio.sleep(60)
        assert not unregistered.is_set()
        assert not r.instance.kv.closed  # the copy may still use the KV cache
        with pytest.raises(TransferError, match="no KV cache"):
            r.scheduler.admit_store(store_request(key(2)))  # closing: no new copies
        r.copier.events[0].done = True
        await unregistered.wait()
        assert r.instance.kv.closed
        assert stored(r.storage, key(1)) == 1


async def test_failed_copy_aborts_its_reservation(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with rig() as r:
        await r.scheduler.run_store(r.scheduler.admit_store(store_request(key(1))))
        r.copier.events[0].error = RuntimeError("device lost")
        with caplog.at_level(logging.WARNING, logger="lmcd.scheduler"):
            await trio.sleep(1)
        stats = r.storage.statistics()
        assert (stats.reserved_chunks, stats.chunks, len(r.storage)) == (0, 0, 0)
        assert stats.tier.used_bytes == 0
        assert r.instance.inflight == 0
        records = [x for x in caplog.records if "failed after its reply" in x.message]
        assert len(records) == 1
        assert not records[0].exc_info
        # The key can be stored again.
        job = r.scheduler.admit_store(store_request(key(1)))
        assert len(job.reservation.entries) == 1


async def test_cancelled_copy_aborts_its_reservation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig() as r:
        await r.scheduler.run_store(r.scheduler.admit_store(store_request(key(1))))
        await trio.sleep(1)
        assert r.storage.statistics().reserved_chunks == 1
    # Leaving the rig cancelled the scheduler, and with it the pending copy.
    stats = r.storage.statistics()
    assert (stats.reserved_chunks, len(r.storage), stats.tier.used_bytes) == (0, 0, 0)
    assert r.instance.inflight == 0


async def test_attached_store_replies_only_after_commit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The host path's shape: the reply waits for the copy.
    async with rig(detached=False) as r:
        replies: list[object] = []

        async def store() -> None:
            job = r.scheduler.admit_store(store_request(key(1)))
            replies.append(await r.scheduler.run_store(job))

        r.nursery.start_soon(store)
        await trio.sleep(5)
        assert replies == []
        assert stored(r.storage, key(1)) == 0
        r.copier.events[0].done = True
        await trio.sleep(1)
        assert replies == [CopyResult(True, b"done:ev")]
        assert stored(r.storage, key(1)) == 1


async def test_attached_copy_failure_is_the_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(detached=False) as r:
        job = r.scheduler.admit_store(store_request(key(1)))
        r.nursery.start_soon(_fail_soon, r)
        with pytest.raises(TransferError, match="store copy failed"):
            await r.scheduler.run_store(job)
        assert len(r.storage) == 0
        assert r.instance.inflight == 0


async def _fail_soon(r: Rig) -> None:
    await trio.sleep(1)
    r.copier.events[0].error = RuntimeError("bad block")


async def test_copy_that_cannot_be_issued_aborts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig() as r:
        r.copier.fail_issue = True
        job = r.scheduler.admit_store(store_request(key(1)))
        with pytest.raises(TransferError, match="could not issue"):
            await r.scheduler.run_store(job)
        assert (len(r.storage), r.instance.inflight) == (0, 0)


async def test_retrieve_keeps_its_pins_until_completion(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig() as r:
        await r.scheduler.run_store(r.scheduler.admit_store(store_request(key(1))))
        r.copier.events[0].done = True
        await trio.sleep(1)
        assert r.storage.lookup([key(1)], lock=True) == 1
        job = r.scheduler.admit_retrieve(retrieve_request(key(1), key(9)))
        reply = await r.scheduler.run_retrieve(job)
        assert reply == CopyResult(False, b"done:ev", 1)
        await trio.sleep(5)
        stats = r.storage.statistics()
        assert (stats.pinned_chunks, stats.locked_chunks) == (1, 1)
        r.copier.events[1].done = True
        await trio.sleep(1)
        stats = r.storage.statistics()
        assert (stats.pinned_chunks, stats.locked_chunks) == (0, 0)
        assert stats.retrieved_chunks == 1


async def test_failed_retrieve_unpins_but_keeps_the_lookup_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig() as r:
        await r.scheduler.run_store(r.scheduler.admit_store(store_request(key(1))))
        r.copier.events[0].done = True
        await trio.sleep(1)
        r.storage.lookup([key(1)], lock=True)
        await r.scheduler.run_retrieve(
            r.scheduler.admit_retrieve(retrieve_request(key(1)))
        )
        r.copier.events[1].error = RuntimeError("device lost")
        await trio.sleep(1)
        stats = r.storage.statistics()
        assert (stats.pinned_chunks, stats.locked_chunks) == (0, 1)
        assert stats.retrieved_chunks == 0
        assert r.instance.inflight == 0


async def test_registration_turns_run_in_arrival_order_whoever_starts_first() -> None:
    """REGISTER/UNREGISTER of one id take effect in the order they arrived
    (their turns), not in the order Trio happens to start their tasks."""
    async with rig() as r:
        first = r.scheduler.take_turn(7)
        second = r.scheduler.take_turn(7)
        other = r.scheduler.take_turn(8)  # another id: never waits on 7's
        ran: list[str] = []

        async def hold(name: str, turn: Any, release: trio.Event) -> None:
            async with r.scheduler.turn(turn):
                ran.append(name)
                await release.wait()

        go_first, go_second, go_other = trio.Event(), trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, "second", second, go_second)
            nursery.start_soon(hold, "other", other, go_other)
            await trio.testing.wait_all_tasks_blocked()
            assert ran == ["other"]  # the second waits for the first
            nursery.start_soon(hold, "first", first, go_first)
            await trio.testing.wait_all_tasks_blocked()
            assert ran == ["other", "first"]
            go_first.set()
            await trio.testing.wait_all_tasks_blocked()
            assert ran == ["other", "first", "second"]
            go_second.set()
            go_other.set()
        # Every turn over: no id's queue is left behind.
        assert r.scheduler.take_turn(7).after is None
