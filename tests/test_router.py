"""Per-connection dialect detection, with stand-in dialects."""

from __future__ import annotations

import attrs
import msgspec
import pytest

from lmcd.wire.detect import Ambiguous, DialectRouter
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


OLD = Stub("old", {7: (0, GetChunkSize), 8: (0, Noop), 2: (1, UnregisterKVCache)})
NEW = Stub(
    "new", {21: (0, GetChunkSize), 8: (0, GetChunkSize), 2: (1, UnregisterKVCache)}
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
