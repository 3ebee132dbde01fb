"""Per-connection dialect detection, with stand-in dialects."""

from __future__ import annotations

import attrs
import msgspec
import pytest

from lmcd.wire.detect import Ambiguous, DialectRouter, HoldFull, Release
from lmcd.wire.dialect import Message, PayloadError, parse
from lmcd.wire.types import GetChunkSize, Noop, Request, UnregisterKVCache


@attrs.define
class Stub:
    """A dialect with a table {type value: (payload count, request maker)}."""

    name: str
    table: dict[int, tuple[int, type]]
    failure_frame: bytes | None = None

    def plausible(self, message: Message) -> bool:
        entry = self.table.get(message.op)  # type: ignore[arg-type]
        return entry is not None and entry[0] == len(message.payloads)

    def decode(self, message: Message) -> Request:
        if not self.plausible(message):
            raise PayloadError("no", None)
        cls = self.table[message.op][1]  # type: ignore[index]
        if cls is UnregisterKVCache:
            return UnregisterKVCache(msgspec.msgpack.decode(message.payloads[0]))
        return cls()  # type: ignore[no-any-return]

    def encode(self, message: Message, request: Request, result: object) -> list[bytes]:
        return message.reply(None)

    def failure(self, message: Message, request: Request | None) -> list[bytes] | None:
        return message.reply(self.failure_frame)


OLD = Stub(
    "old", {7: (0, GetChunkSize), 8: (0, Noop), 9: (1, Noop), 2: (1, UnregisterKVCache)}
)
NEW = Stub(
    "new",
    {
        21: (0, GetChunkSize),
        8: (0, GetChunkSize),
        9: (1, GetChunkSize),
        2: (1, UnregisterKVCache),
    },
)


def msg(op: int, *payloads: object) -> Message:
    enc = msgspec.msgpack.encode
    return parse([enc(1), enc(op), *(enc(p) for p in payloads)])


def test_first_unambiguous_message_binds_the_connection() -> None:
    router = DialectRouter((OLD, NEW))
    assert router.route(b"a", msg(21)).dialect is NEW
    assert router.dialect_of(b"a") is NEW
    # From now on 8 is read as NEW's operation, not OLD's NOOP.
    assert isinstance(router.route(b"a", msg(8)).request, GetChunkSize)
    assert router.connections() == {"old": 0, "new": 1}


def test_a_message_read_differently_by_two_dialects_is_not_answered() -> None:
    router = DialectRouter((OLD, NEW))
    with pytest.raises(Ambiguous):
        router.route(b"b", msg(8))
    assert router.dialect_of(b"b") is None
    assert router.ambiguous_messages == 1


def test_the_same_request_in_every_dialect_is_served_without_binding() -> None:
    router = DialectRouter((OLD, NEW))
    routed = router.route(b"c", msg(2, 42))
    assert routed.request == UnregisterKVCache(42)
    assert router.dialect_of(b"c") is None


def test_same_request_but_different_failure_replies_is_ambiguous() -> None:
    new = attrs.evolve(NEW, failure_frame=b"\xc2")
    router = DialectRouter((OLD, new))
    with pytest.raises(Ambiguous):
        router.route(b"d", msg(2, 42))


def test_a_single_dialect_needs_no_detection() -> None:
    router = DialectRouter((OLD,))
    routed = router.route(b"e", msg(99))
    assert routed.request is None
    assert routed.error is not None


def test_remembered_connections_are_bounded() -> None:
    router = DialectRouter((OLD, NEW), max_connections=2)
    for identity in (b"1", b"2", b"3"):
        router.route(identity, msg(7))
    assert router.dialect_of(b"1") is None
    assert router.connections() == {"old": 2, "new": 0}


# -- holding what cannot be routed yet (`admit`) ------------------------------------


def served(releases: list[Release]) -> list[tuple[bytes, str, Request | None]]:
    return [(r.message.uid, r.routed.dialect.name, r.routed.request) for r in releases]


def umsg(uid: int, op: int, *payloads: object) -> Message:
    enc = msgspec.msgpack.encode
    return parse([enc(uid), enc(op), *(enc(p) for p in payloads)])


def test_an_ambiguous_message_is_held_then_served_with_the_bound_dialect() -> None:
    router = DialectRouter((OLD, NEW))
    assert router.admit(b"a", umsg(1, 8), now=0.0) == []
    assert router.held == 1
    assert router.dialect_of(b"a") is None
    # The next message binds the connection to NEW: the held 8 is NEW's
    # GET_CHUNK_SIZE (not OLD's NOOP), served first, in arrival order.
    out = router.admit(b"a", umsg(2, 21), now=1.0)
    enc = msgspec.msgpack.encode
    assert served(out) == [
        (enc(1), "new", GetChunkSize()),
        (enc(2), "new", GetChunkSize()),
    ]
    assert router.held == 0
    assert router.released_messages == 1
    assert router.ambiguous_messages == 0


def test_later_messages_wait_behind_held_ones_even_when_readable() -> None:
    """A request every dialect reads alike is served unbound, except behind a
    held one: it waits, so replies keep the order of the requests."""
    router = DialectRouter((OLD, NEW))
    enc = msgspec.msgpack.encode
    assert router.admit(b"a", umsg(1, 8), 0.0) == []
    assert router.admit(b"a", umsg(2, 2, 42), 0.0) == []
    assert router.admit(b"a", umsg(3, 8), 0.0) == []
    out = router.admit(b"a", umsg(4, 7), 0.5)  # OLD's GET_CHUNK_SIZE binds
    assert served(out) == [
        (enc(1), "old", Noop()),
        (enc(2), "old", UnregisterKVCache(42)),
        (enc(3), "old", Noop()),
        (enc(4), "old", GetChunkSize()),
    ]
    # Another connection is not held back by this one's.
    assert router.admit(b"b", umsg(1, 8), 0.5) == []
    assert served(router.admit(b"c", umsg(1, 2, 7), 0.5)) == [
        (enc(1), "old", UnregisterKVCache(7))
    ]


def test_held_messages_are_dropped_at_their_deadline() -> None:
    router = DialectRouter((OLD, NEW), hold_seconds=10.0)
    router.admit(b"a", umsg(1, 8), 0.0)
    router.admit(b"b", umsg(1, 8), 4.0)
    router.admit(b"a", umsg(2, 8), 6.0)
    assert router.next_deadline() == 10.0
    assert router.expire(9.9) == []
    dropped = router.expire(10.0)
    assert [(i, m.uid) for i, m in dropped] == [(b"a", umsg(1, 8).uid)]
    assert router.next_deadline() == 14.0
    assert router.held == 2
    # The binding message releases only what is still held.
    out = router.admit(b"a", umsg(3, 21), 15.0)
    assert [r.message.uid for r in out] == [umsg(2, 8).uid, umsg(3, 21).uid]
    assert router.held == 0  # b's was dropped on the way (deadline 14)
    # So b's binding message releases nothing.
    assert [r.message.uid for r in router.admit(b"b", umsg(2, 7), 16.0)] == [
        umsg(2, 7).uid
    ]
    assert router.dropped_messages == 2
    assert router.ambiguous_messages == 2
    assert router.held == 0
    assert router.next_deadline() is None


def test_a_released_connections_deadlines_are_forgotten() -> None:
    router = DialectRouter((OLD, NEW), hold_seconds=10.0)
    router.admit(b"a", umsg(1, 8), 0.0)
    router.admit(b"b", umsg(1, 8), 1.0)
    router.admit(b"a", umsg(2, 21), 2.0)
    assert router.next_deadline() == 11.0
    assert [i for i, _ in router.expire(20.0)] == [b"b"]
    assert router.dropped_messages == 1


def test_holding_is_bounded_per_connection() -> None:
    router = DialectRouter((OLD, NEW), max_held_per_connection=3)
    for uid in range(3):
        assert router.admit(b"a", umsg(uid, 8), 0.0) == []
    with pytest.raises(HoldFull):
        router.admit(b"a", umsg(3, 8), 0.0)
    assert router.held == 3
    assert router.dropped_messages == 1
    # Other connections still hold; the full one still binds and releases.
    assert router.admit(b"b", umsg(0, 8), 0.0) == []
    assert len(router.admit(b"a", umsg(4, 21), 0.0)) == 4


def test_holding_is_bounded_in_total_count_and_bytes() -> None:
    router = DialectRouter((OLD, NEW), max_held=4)
    for identity in (b"1", b"2", b"3", b"4"):
        router.admit(identity, umsg(1, 8), 0.0)
    with pytest.raises(HoldFull):
        router.admit(b"5", umsg(1, 8), 0.0)
    small = DialectRouter((OLD, NEW), max_held_bytes=10)
    small.admit(b"1", umsg(1, 8), 0.0)  # 2 bytes of header
    with pytest.raises(HoldFull):
        small.admit(b"2", umsg(1, 9, "x" * 20), 0.0)
    assert small.held == 1


def test_what_no_dialect_reads_is_not_held() -> None:
    router = DialectRouter((OLD, NEW))
    with pytest.raises(Ambiguous) as e:
        router.admit(b"a", umsg(1, 99), 0.0)
    assert not isinstance(e.value, HoldFull)
    assert router.held == 0


def test_deadline_entries_of_released_messages_do_not_pile_up() -> None:
    router = DialectRouter((OLD, NEW), max_held=4)
    for n in range(100):
        identity = n.to_bytes(2, "big")
        router.admit(identity, umsg(1, 8), 0.0)
        router.admit(identity, umsg(2, 21), 0.0)
    assert len(router._deadlines) <= 2 * 4
    assert router.next_deadline() is None
