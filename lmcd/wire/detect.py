"""Which dialect each connection speaks (sans-IO).

With `--dialect auto` every connection (ZMQ routing identity) starts
unbound. A message that only one enabled dialect could have sent (its type
value with that payload count, and where several fit, payloads that only
one of them decodes) binds the connection for good. A message that fits
several dialects and means the same request in each (an UNREGISTER, say) is
served without binding; one that would mean different things is left
unanswered rather than misread, and counted. Clients that reconnect after a
daemon restart and resume mid-stream (PING, LOOKUP, STORE) are bound the
same way by their first unambiguous message.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs

from lmcd.wire.dialect import Dialect, Message, PayloadError, Unsupported
from lmcd.wire.types import Request

# Identities remembered; the least recently seen is forgotten first (and
# simply detected again should it come back).
MAX_CONNECTIONS = 65_536


@attrs.frozen
class Routed:
    """How to serve one message: with `dialect`, as `request` (None when
    `error` says why it did not decode: reply with `error.reply`)."""

    dialect: Dialect
    request: Request | None
    error: PayloadError | Unsupported | None = None


class Ambiguous(Exception):
    """No dialect could be chosen for a message of an unbound connection:
    `candidates` names the dialects that fit (none, or several that would
    read it differently). The message is not answered."""

    def __init__(self, candidates: Sequence[str]) -> None:
        what = ", ".join(candidates) if candidates else "no enabled dialect"
        super().__init__(f"message fits {what}")
        self.candidates = tuple(candidates)


@attrs.define(slots=True)
class DialectRouter:
    """Binds connections to dialects and decodes their messages."""

    dialects: tuple[Dialect, ...]
    max_connections: int = MAX_CONNECTIONS
    _bound: OrderedDict[bytes, Dialect] = attrs.field(factory=OrderedDict, init=False)
    ambiguous_messages: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if not self.dialects:
            raise ValueError("at least one dialect is needed")

    def route(self, identity: bytes, message: Message) -> Routed:
        """Choose the dialect for `message` and decode it.

        Raises `Ambiguous` when the connection is unbound and no single
        dialect can be chosen.
        """
        if len(self.dialects) == 1:
            return _decode(self.dialects[0], message)
        bound = self._bound
        dialect = bound.get(identity)
        if dialect is None:
            return self._detect(identity, message)
        bound.move_to_end(identity)
        return _decode(dialect, message)

    def dialect_of(self, identity: bytes) -> Dialect | None:
        return self._bound.get(identity)

    def connections(self) -> dict[str, int]:
        """How many remembered connections speak each dialect."""
        counts = {d.name: 0 for d in self.dialects}
        if len(self.dialects) == 1:
            return counts
        for dialect in self._bound.values():
            counts[dialect.name] += 1
        return counts

    def bindings(self) -> list[tuple[bytes, str]]:
        """Every remembered connection and its dialect, most recent last."""
        return [(identity, d.name) for identity, d in self._bound.items()]

    def _detect(self, identity: bytes, message: Message) -> Routed:
        candidates = [d for d in self.dialects if d.plausible(message)]
        if len(candidates) == 1:
            self._bind(identity, candidates[0])
            return _decode(candidates[0], message)
        decoded: list[Routed] = []
        for dialect in candidates:
            routed = _decode(dialect, message)
            if routed.request is not None:
                decoded.append(routed)
        if len(decoded) == 1:
            self._bind(identity, decoded[0].dialect)
            return decoded[0]
        if decoded and all(r.request == decoded[0].request for r in decoded):
            # Every dialect reads it as the same request: serve it without
            # binding (the reply is the same in each; see `_same_reply`).
            first = decoded[0]
            if all(_same_shape(first.dialect, r.dialect, message, r) for r in decoded):
                return first
        self.ambiguous_messages += 1
        raise Ambiguous([d.name for d in candidates])

    def _bind(self, identity: bytes, dialect: Dialect) -> None:
        bound = self._bound
        bound[identity] = dialect
        if len(bound) > self.max_connections:
            bound.popitem(last=False)


def _decode(dialect: Dialect, message: Message) -> Routed:
    try:
        return Routed(dialect, dialect.decode(message))
    except (PayloadError, Unsupported) as e:
        return Routed(dialect, None, e)


def _same_shape(a: Dialect, b: Dialect, message: Message, routed: Routed) -> bool:
    # Both dialects must owe the same failure reply too, or a failed request
    # would be answered in a shape one of the clients cannot read.
    request = routed.request
    return a.failure(message, request) == b.failure(message, request)
