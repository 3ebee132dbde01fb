"""A RETRIEVE of chunks being promoted from a lower tier, into a host-path KV
cache, copies each leading run of chunks that has arrived while the later
ones are still on their way, and still replies once with exactly what a
RETRIEVE admitted after them all would get: the leading chunks found (a
failed or late promotion ends them), with every lock given back.

Handlers over a real storage manager and tiering, a disk tier held in
memory whose reads the test holds chunk by chunk, and a copier that records
what it is asked to copy (the host path's shape: done when it returns)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing

from lmcd.handlers import Handlers
from lmcd.lookups import LookupJobs, Sessions
from lmcd.scheduler import Instance, TransferScheduler
from lmcd.storage import State, StorageManager
from lmcd.tiering import Policy, Tiering, object_id
from lmcd.tokens import TokenHasher
from lmcd.transfer.completion import Finished
from lmcd.transfer.layouts import KVLayout
from lmcd.wire.detect import DialectRouter
from lmcd.wire.types import (
    CacheKey,
    CopyResult,
    QueryLookup,
    Request,
    Retrieve,
    RetrieveSpan,
    StartLookup,
    TokenSpan,
)
from lmcd_backends.pinned_cpu import PinnedCpuTier
from tests.fakes import FakeClock, ScriptedDialect
from tests.tierkit import MemoryTier

CHUNK = 256  # tokens
PER = 16  # blocks per chunk (16 tokens each)
LAYOUT = KVLayout("mla", 1, 8 * PER, 16, 16, "float16")  # 8 KiB chunks
NBYTES = LAYOUT.chunk_bytes(CHUNK)
INSTANCE = 1
TIMEOUT = 30


def key(i: int) -> CacheKey:
    return CacheKey("m", 1, 0, i.to_bytes(8, "big"))


def slot(i: int) -> tuple[int, ...]:
    """The block ids chunk `i` of a request is copied into."""
    return tuple(range(i * PER, (i + 1) * PER))


@attrs.define
class FakeKV:
    layout: KVLayout = LAYOUT

    def close(self) -> None:
        pass


@attrs.define
class RecordingCopier:
    """Copies nothing; records each RETRIEVE's chunks as (block ids, the
    first byte of the chunk's buffer, first token written), in order."""

    copied: list[tuple[tuple[int, ...], int, int]] = attrs.field(factory=list)
    calls: int = 0

    async def retrieve(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Any,
        chunk_tokens: int,
        limiter: Any,
        skip: Any = (),
    ) -> Finished:
        self.calls += 1
        for i, (ids, buf) in enumerate(chunks):
            first = skip[i] if skip else 0
            self.copied.append((tuple(ids), int(buf[0]), first))
        await trio.lowlevel.checkpoint()
        return Finished()

    store = retrieve


@attrs.define
class Served:
    def serves(self, model_name: str, world_size: int) -> bool:
        return True

    def touch(self, instance_id: int) -> bool:
        return False


@attrs.define
class Rig:
    storage: StorageManager
    tiers: Tiering
    disk: MemoryTier
    sessions: Sessions
    copier: RecordingCopier
    dialect: ScriptedDialect
    handlers: Handlers
    nursery: trio.Nursery
    replies: dict[bytes, trio.Event] = attrs.field(factory=dict)
    uids: Any = attrs.field(factory=lambda: itertools.count(1))

    def send(self, request: Request) -> trio.Event:
        """Hand `request` over; the event is set once it is answered."""
        uid = msgspec.msgpack.encode(next(self.uids))
        self.dialect.requests[uid] = request
        done = self.replies.setdefault(uid, trio.Event())
        self.handlers.on_message(b"c", [uid, msgspec.msgpack.encode(1)])
        return done

    def result(self, done: trio.Event) -> object:
        uid = next(u for u, e in self.replies.items() if e is done)
        return self.dialect.results.get(uid, "failed")

    async def call(self, request: Request) -> object:
        done = self.send(request)
        await done.wait()
        return self.result(done)

    async def on_disk_only(self, keys: list[CacheKey]) -> None:
        """Store `keys` (chunk i's bytes all i + 1), let them be written to
        the disk tier, and drop them from CPU."""
        res = self.storage.reserve(keys, NBYTES, LAYOUT.tag)
        for i, entry in enumerate(res.entries):
            self.storage.buffer(entry)[:] = i + 1
        self.storage.commit(res)
        while self.tiers.busy:  # noqa: ASYNC110 - polls the tiers' progress
            await trio.sleep(0.001)
        assert all(self.tiers.on_disk(k) for k in keys)
        self.storage.clear()

    def oid(self, k: CacheKey) -> Any:
        return object_id(k, LAYOUT.tag, NBYTES)

    def hold(self, k: CacheKey) -> trio.Event:
        gate = self.disk.held[self.oid(k)] = trio.Event()
        return gate

    def locks(self, keys: list[CacheKey]) -> list[int | None]:
        out: list[int | None] = []
        for k in keys:
            e = self.storage.get(k)
            out.append(None if e is None or e.state is not State.COMMITTED else e.locks)
        return out

    async def copied(self, n: int) -> None:
        """Until `n` chunks have been copied."""
        while len(self.copier.copied) < n:  # noqa: ASYNC110 - polls the copies
            await trio.sleep(0.001)


@asynccontextmanager
async def rig(promotion_timeout: float = 10) -> AsyncIterator[Rig]:
    cpu = PinnedCpuTier(16 * NBYTES, segment_bytes=16 * NBYTES, pin=False)
    storage = StorageManager(cpu, FakeClock())
    disk = MemoryTier("disk")
    tiers = Tiering(
        storage,
        disk,
        policy=Policy.WRITE_THROUGH,
        promotion_timeout=promotion_timeout,
        layouts=lambda: [(None, None, LAYOUT.tag, NBYTES)],
    )
    storage.on_commit = tiers.on_commit
    sessions = Sessions(TokenHasher(CHUNK), time.monotonic)
    scheduler = TransferScheduler(storage, CHUNK)
    scheduler.peers.append(Served())
    copier = RecordingCopier()
    instance = Instance(INSTANCE, "host", FakeKV(), PER, copier=copier)  # type: ignore[arg-type]
    scheduler.attach(instance)
    dialect = ScriptedDialect()
    replies: dict[bytes, trio.Event] = {}
    handlers = Handlers(
        storage,
        scheduler,
        CHUNK,
        lambda frames: replies.setdefault(frames[1], trio.Event()).set(),
        DialectRouter((dialect,)),  # type: ignore[arg-type]
        sessions,
        LookupJobs(time.monotonic),
        tiers=tiers,
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(tiers.run)
            await nursery.start(scheduler.run)
            await nursery.start(handlers.run)
            yield Rig(
                storage,
                tiers,
                disk,
                sessions,
                copier,
                dialect,
                handlers,
                nursery,
                replies,
            )
            nursery.cancel_scope.cancel()


def retrieve(keys: list[CacheKey], skip: int = 0) -> Retrieve:
    ids = tuple(b for i in range(len(keys)) for b in slot(i))
    return Retrieve(tuple(keys), INSTANCE, ids, b"ev", skip_tokens=skip)


async def test_leading_chunks_are_copied_while_later_ones_are_promoted() -> None:
    keys = [key(i) for i in range(6)]
    async with rig() as r:
        await r.on_disk_only(keys)
        gate = r.hold(keys[3])
        done = r.send(retrieve(keys))
        # Chunks 0-2 arrive and are copied while chunk 3 is held...
        await r.copied(3)
        assert not done.is_set()
        assert [c[:2] for c in r.copier.copied] == [(slot(i), i + 1) for i in range(3)]
        gate.set()
        await done.wait()
        # ... and the reply is the one a single copy would get.
        assert r.result(done) == CopyResult(True, None, 6)
        assert [c[:2] for c in r.copier.copied] == [(slot(i), i + 1) for i in range(6)]
        assert r.copier.calls >= 2
        assert r.locks(keys) == [0] * 6
        stats = r.storage.statistics()
        assert (stats.retrieves, stats.retrieved_chunks) == (1, 6)
        assert stats.retrieve_miss_chunks == 0


async def test_a_failed_middle_promotion_ends_the_prefix() -> None:
    keys = [key(i) for i in range(5)]
    async with rig() as r:
        await r.on_disk_only(keys)
        r.disk.fail.add(r.oid(keys[2]))
        gate = r.hold(keys[3])
        done = r.send(retrieve(keys))
        await r.copied(2)
        gate.set()
        await done.wait()
        assert r.result(done) == CopyResult(False, None, 2)
        # Chunks 3 and 4 arrived but come after the gap: not copied.
        assert [c[:2] for c in r.copier.copied] == [(slot(0), 1), (slot(1), 2)]
        while r.tiers.busy:  # noqa: ASYNC110
            await trio.sleep(0.001)
        assert r.locks(keys) == [0, 0, None, 0, 0]
        stats = r.storage.statistics()
        assert (stats.retrieves, stats.retrieve_miss_chunks) == (1, 3)


async def test_a_promotion_past_the_timeout_ends_the_prefix(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = [key(i) for i in range(3)]
    async with rig(promotion_timeout=2) as r:
        await r.on_disk_only(keys)
        gate = r.hold(keys[1])
        started = trio.current_time()
        assert await r.call(retrieve(keys)) == CopyResult(False, None, 1)
        assert 2 <= trio.current_time() - started < 3
        gate.set()
        while r.tiers.busy:  # noqa: ASYNC110
            await trio.sleep(0.001)
        # The late chunk commits without the retrieve's lock.
        assert r.locks(keys) == [0, 0, 0]


async def test_skipped_tokens_are_counted_from_the_request_in_every_part() -> None:
    keys = [key(i) for i in range(4)]
    async with rig() as r:
        await r.on_disk_only(keys)
        gate = r.hold(keys[2])
        done = r.send(retrieve(keys, skip=CHUNK + 44))
        await r.copied(1)
        gate.set()
        await done.wait()
        assert r.result(done) == CopyResult(True, None, 4)
        # Chunk 0 is skipped whole, chunk 1 from token 44, the rest whole.
        assert r.copier.copied == [(slot(1), 2, 44), (slot(2), 3, 0), (slot(3), 4, 0)]


@pytest.mark.parametrize("fail", [False, True])
async def test_token_addressed_retrieve_gives_back_every_lock(fail: bool) -> None:
    tokens = tuple(range(4 * CHUNK))
    span = TokenSpan("m", 1, 0, tokens, 0, len(tokens), "r1")
    async with rig() as r:
        keys: list[CacheKey] = list(r.sessions.keys(span))
        await r.on_disk_only(keys)
        if fail:
            r.disk.fail.add(r.oid(keys[1]))
        gate = r.hold(keys[2])
        assert await r.call(StartLookup(span)) is None
        ids = tuple(b for i in range(4) for b in slot(i))
        done = r.send(RetrieveSpan(span, INSTANCE, (ids,), b"ev"))
        await r.copied(1)
        if fail:
            # The gap ends the prefix: answered without waiting for chunk 2.
            await done.wait()
        assert done.is_set() == fail
        gate.set()
        await done.wait()
        found = 1 if fail else 4
        assert r.result(done) == CopyResult(not fail, None, found)
        assert await r.call(QueryLookup("r1", wait=5)) == found
        while r.tiers.busy:  # noqa: ASYNC110
            await trio.sleep(0.001)
        expected = [0, None, 0, 0] if fail else [0] * 4
        assert r.locks(keys) == expected
        assert len(r.copier.copied) == found


async def test_an_instance_gone_between_parts_fails_the_retrieve_and_frees_locks() -> (
    None
):
    tokens = tuple(range(3 * CHUNK))
    span = TokenSpan("m", 1, 0, tokens, 0, len(tokens), "r2")
    async with rig() as r:
        keys: list[CacheKey] = list(r.sessions.keys(span))
        await r.on_disk_only(keys)
        gate = r.hold(keys[1])
        assert await r.call(StartLookup(span)) is None
        ids = tuple(b for i in range(3) for b in slot(i))
        done = r.send(RetrieveSpan(span, INSTANCE, (ids,), b"ev"))
        await r.copied(1)
        await r.handlers.scheduler.unregister(INSTANCE)
        gate.set()
        await done.wait()
        assert r.result(done) == "failed"
        while r.tiers.busy:  # noqa: ASYNC110
            await trio.sleep(0.001)
        assert r.locks(keys) == [0, 0, 0]
