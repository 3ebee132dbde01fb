"""What a dialect is: frames in, neutral requests out; neutral results in,
frames out (sans-IO: no trio, zmq or torch).

Every lmcache release line numbers its operations and shapes its payloads
and replies differently, but all of them frame a request the same way:
`[uid, type, payload...]` after the routing identity, one MessagePack value
per frame, and a reply `[uid, type]` plus at most one response frame. A
dialect module supplies the rest: which type values it knows with how many
payloads (`plausible`), how payloads become a neutral request (`decode`),
how a result becomes its reply (`encode`), and what a client is owed when
the request cannot be served (`failure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs
import msgspec

from lmcd.errors import ProtocolError
from lmcd.wire.types import Request

# A uid or int type value is a MessagePack int: at most 9 bytes. A string
# type value (lmcache 0.5's newer operations) is a short name.
MAX_UID_FRAME = 9
MAX_TYPE_FRAME = 64

_int = msgspec.msgpack.Decoder(int)
_op = msgspec.msgpack.Decoder(int | str)


@attrs.frozen
class Message:
    """A message whose uid and type decoded: what every reply must echo.

    `uid` and `type_frame` are the raw frames (replies echo the same bytes);
    `op` is the decoded type value (an int, or a str for lmcache 0.5's
    named operations).
    """

    uid: bytes
    type_frame: bytes
    op: int | str
    payloads: Sequence[bytes]

    def reply(self, value_frame: bytes | None) -> list[bytes]:
        """Reply frames `[uid, type]` plus the response frame, if any."""
        if value_frame is None:
            return [self.uid, self.type_frame]
        return [self.uid, self.type_frame, value_frame]


class PayloadError(ProtocolError):
    """The header decoded but the payloads did not; `reply` (frames after
    the identity, or None for no reply at all) is still owed."""

    def __init__(self, message: str, reply: list[bytes] | None) -> None:
        super().__init__(message)
        self.reply = reply


class Unsupported(ProtocolError):
    """A well-formed request for an operation lmcd does not offer (blend,
    P2P, ...): `reply` is what the dialect's own server would answer (None:
    nothing, as lmcache's server leaves unknown operations unanswered)."""

    def __init__(self, operation: str, reply: list[bytes] | None) -> None:
        super().__init__(f"operation {operation} is not supported")
        self.operation = operation
        self.reply = reply


def parse(frames: Sequence[bytes]) -> Message:
    """Read uid and type from `[uid, type, payload...]`.

    Raises `ProtocolError` when there are fewer than two frames or uid or type
    do not decode: such a message cannot be answered in any dialect.
    """
    if len(frames) < 2:
        raise ProtocolError(f"message has {len(frames)} frames after the identity")
    uid, type_frame = frames[0], frames[1]
    if len(uid) > MAX_UID_FRAME or len(type_frame) > MAX_TYPE_FRAME:
        raise ProtocolError("uid or type frame too long")
    try:
        _int.decode(uid)
        op = _op.decode(type_frame)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable uid or type: {e}") from e
    return Message(uid, type_frame, op, frames[2:])


class Dialect(Protocol):
    """One lmcache release line's request and reply shapes.

    Implementations are stateless (or hold only immutable tables), so one
    instance serves every connection.
    """

    name: str
    """The `--dialect` value that selects it, e.g. "lmcache-0.3"."""

    def plausible(self, message: Message) -> bool:
        """Whether a client of this dialect could have sent `message`: its
        type value is one of the dialect's with the right payload count.
        Cheap; used to bind a new connection to a dialect."""
        ...

    def decode(self, message: Message) -> Request:
        """The neutral request. Raises `PayloadError` (with the failure
        reply owed) when the payloads are malformed or out of bounds, and
        `Unsupported` for an operation lmcd does not offer."""
        ...

    def encode(self, message: Message, request: Request, result: object) -> list[bytes]:
        """Reply frames for `result`, the outcome of serving `request`."""
        ...

    def failure(self, message: Message, request: Request | None) -> list[bytes] | None:
        """Reply frames owed to a request that could not be served (None:
        the dialect's clients expect no reply). `request` is None when its
        payloads did not decode."""
        ...
