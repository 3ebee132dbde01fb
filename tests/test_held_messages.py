"""The daemon's side of holding (`DialectRouter.admit`): an `auto` daemon
answers a held message once its connection binds, in its client's dialect
and ahead of the binding message, and drops it unanswered (counted) at its
deadline. Trio's autojump clock stands in for the waits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
import trio
import trio.lowlevel
import trio.testing

from lmcd.handlers import Handlers
from lmcd.lookups import LookupJobs, Sessions
from lmcd.scheduler import TransferScheduler
from lmcd.storage import StorageManager
from lmcd.tokens import TokenHasher
from lmcd.wire import lmcache04
from lmcd.wire.detect import DialectRouter
from lmcd.wire.registry import dialects_for
from lmcd_backends.pinned_cpu import PinnedCpuTier

enc = msgspec.msgpack.encode
CHUNK = 16
HOLD = 25.0
# `[9, request_id]`: 0.5's query_prefetch_status, 0.4's END_SESSION.
STATUS = [enc(7), enc(9), enc("req-1")]
# 0.5's heartbeat (`ping`, legacy id 22, with the worker's instance id).
PING_05 = [enc(8), enc(22), enc(12345)]
PING_046 = [enc(8), enc(17)]


@contextlib.asynccontextmanager
async def _running() -> AsyncIterator[tuple[Handlers, list[list[bytes]]]]:
    """Handlers of an `auto` daemon, running, and the replies they send."""
    replies: list[list[bytes]] = []
    handlers = _handlers(replies)
    async with trio.open_nursery() as nursery:
        await nursery.start(handlers.run)
        yield handlers, replies
        nursery.cancel_scope.cancel()


def _handlers(replies: list[list[bytes]]) -> Handlers:
    tier = PinnedCpuTier(1 << 20, segment_bytes=1 << 20, pin=False)
    storage = StorageManager(tier=tier, clock=time.monotonic)
    return Handlers(
        storage,
        TransferScheduler(storage, CHUNK),
        CHUNK,
        replies.append,
        DialectRouter(dialects_for("auto"), hold_seconds=HOLD),
        Sessions(TokenHasher(CHUNK), time.monotonic),
        LookupJobs(time.monotonic),
    )


async def test_a_held_status_query_is_answered_in_05s_shape_when_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _running() as (handlers, replies):
        handlers.on_message(b"s", STATUS)
        await trio.sleep(1)
        assert replies == []
        assert handlers.stats()["held_messages"] == 1
        handlers.on_message(b"s", PING_05)
        await trio.lowlevel.checkpoint()
        # The status query first (0.5's int: no such lookup, 0 tokens),
        # then the heartbeat.
        assert [r[1] for r in replies] == [enc(7), enc(8)]
        assert msgspec.msgpack.decode(replies[0][3]) == 0
        stats = handlers.stats()
        assert stats["held_messages"] == 0
        assert stats["released_messages"] == 1
        assert stats["ambiguous_messages"] == 0
        assert stats["connections_by_dialect"]["lmcache-0.5"] == 1


async def test_a_held_end_session_is_answered_in_046s_shape_when_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _running() as (handlers, replies):
        handlers.on_message(b"w", STATUS)
        await trio.sleep(5)
        handlers.on_message(b"w", PING_046)
        await trio.lowlevel.checkpoint()
        # END_SESSION declares no response: `[uid, type]` and nothing else.
        assert replies[0] == [b"w", enc(7), enc(9)]
        assert [r[1] for r in replies] == [enc(7), enc(8)]
        assert handlers.router.dialect_of(b"w") is lmcache04.DIALECTS[1]


async def test_a_message_held_past_its_deadline_is_dropped_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _running() as (handlers, replies):
        handlers.on_message(b"s", STATUS)
        await trio.sleep(HOLD - 1)
        assert handlers.stats()["held_messages"] == 1
        await trio.sleep(2)  # the expiry task wakes at the deadline
        stats = handlers.stats()
        assert stats["held_messages"] == 0
        assert stats["ambiguous_messages"] == 1
        handlers.on_message(b"s", PING_05)
        await trio.lowlevel.checkpoint()
        assert [r[1] for r in replies] == [enc(8)]  # the query stays unanswered
