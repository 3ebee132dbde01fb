"""Which dialect each connection speaks (sans-IO).

With `--dialect auto` every connection (ZMQ routing identity) starts
unbound. A message that only one enabled dialect could have sent (its type
value with that payload count, and where several fit, payloads that only
one of them decodes) binds the connection for good. A message that fits
several dialects and means the same request in each (an UNREGISTER, say) is
served without binding. Clients that reconnect after a daemon restart and
resume mid-stream (PING, LOOKUP, STORE) are bound the same way by their
first unambiguous message.

A message that several dialects would read differently (lmcache 0.5's
`query_prefetch_status` is 0.4's END_SESSION) is never answered in a
guessed shape. `admit` holds it instead, with every later message of that
connection, until a message binds the connection; then the held messages
are decoded with the bound dialect and handed back, in arrival order, ahead
of the binding message, so the client gets its own dialect's replies in the
order it sent the requests. Holding is bounded per connection and in total
(count and bytes), and each held message has a deadline on the caller's
clock (`expire`): past it, or beyond a bound, a message is dropped
unanswered and counted, as lmcache's own clients then time that one
request out. Replies that come late are harmless: lmcache 0.4 and 0.5
clients keep every request's future until its reply arrives, and a reply
whose future nobody awaits any more is simply consumed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import attrs

from lmcd.wire.dialect import Dialect, Message, PayloadError, Unsupported
from lmcd.wire.types import Request

# Identities remembered; the least recently seen is forgotten first (and
# simply detected again should it come back).
MAX_CONNECTIONS = 65_536

# Held messages of unbound connections. A client binds its connection within
# one heartbeat interval (lmcache 0.5's vLLM adapters ping every 10 s by
# default, 0.4's every few seconds), so a message held longer than two
# intervals waits for nothing; the messages that can be held are small
# control-plane requests (status queries, END_SESSION), so a few per
# connection cover a client's pipelined polls.
HOLD_SECONDS = 25.0
MAX_HELD_PER_CONNECTION = 32
MAX_HELD = 4096
MAX_HELD_BYTES = 8 << 20


@attrs.frozen
class Routed:
    """How to serve one message: with `dialect`, as `request` (None when
    `error` says why it did not decode: reply with `error.reply`)."""

    dialect: Dialect
    request: Request | None
    error: PayloadError | Unsupported | None = None


@attrs.frozen
class Release:
    """One message to serve now: `message`, read as `routed` says."""

    message: Message
    routed: Routed


class Ambiguous(Exception):
    """No dialect could be chosen for a message of an unbound connection:
    `candidates` names the dialects that fit (none, or several that would
    read it differently). The message is not answered."""

    def __init__(self, candidates: Sequence[str], why: str = "") -> None:
        what = ", ".join(candidates) if candidates else "no enabled dialect"
        super().__init__(f"message fits {what}{why}")
        self.candidates = tuple(candidates)


class HoldFull(Ambiguous):
    """An ambiguous message that could not be held (a bound on held
    messages is reached): dropped unanswered."""


@attrs.define(slots=True)
class _Held:
    """An unbound connection's held messages, oldest first: (sequence
    number, message, size)."""

    messages: deque[tuple[int, Message, int]] = attrs.field(factory=deque)


@attrs.define(slots=True)
class DialectRouter:
    """Binds connections to dialects and decodes their messages.

    `admit` is the listener's entry point (it holds what it cannot route
    yet); `route` decides one message alone and never holds.
    """

    dialects: tuple[Dialect, ...]
    max_connections: int = MAX_CONNECTIONS
    hold_seconds: float = HOLD_SECONDS
    max_held_per_connection: int = MAX_HELD_PER_CONNECTION
    max_held: int = MAX_HELD
    max_held_bytes: int = MAX_HELD_BYTES
    _bound: OrderedDict[bytes, Dialect] = attrs.field(factory=OrderedDict, init=False)
    # Unbound connections with their held messages.
    _held: dict[bytes, _Held] = attrs.field(factory=dict, init=False)
    # (deadline, identity, sequence number) of every message held, in
    # arrival order, which is deadline order (one hold for all, a monotonic
    # clock); entries of released messages are skipped when reached.
    _deadlines: deque[tuple[float, bytes, int]] = attrs.field(factory=deque, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _held_count: int = attrs.field(default=0, init=False)
    _held_bytes: int = attrs.field(default=0, init=False)
    ambiguous_messages: int = attrs.field(default=0, init=False)
    """Messages left unanswered for want of a dialect (including held ones
    that were dropped)."""
    held_messages: int = attrs.field(default=0, init=False)
    """Messages ever held."""
    released_messages: int = attrs.field(default=0, init=False)
    """Held messages served once their connection bound."""
    dropped_messages: int = attrs.field(default=0, init=False)
    """Held (or to-be-held) messages dropped past their deadline or a bound."""

    def __attrs_post_init__(self) -> None:
        if not self.dialects:
            raise ValueError("at least one dialect is needed")

    def route(self, identity: bytes, message: Message) -> Routed:
        """Choose the dialect for `message` and decode it, without holding.

        Raises `Ambiguous` when the connection is unbound and no single
        dialect can be chosen.
        """
        routed = self._read_bound(identity, message)
        if routed is not None:
            return routed
        try:
            return self._detect(identity, message)
        except Ambiguous:
            self.ambiguous_messages += 1
            raise

    def _read_bound(self, identity: bytes, message: Message) -> Routed | None:
        """`message` read by its connection's dialect (the only one, or the
        one bound); None while the connection is unbound."""
        if len(self.dialects) == 1:
            return _decode(self.dialects[0], message)
        dialect = self._bound.get(identity)
        if dialect is None:
            return None
        self._bound.move_to_end(identity)
        return _decode(dialect, message)

    def admit(self, identity: bytes, message: Message, now: float) -> list[Release]:
        """What to serve now that `message` arrived at time `now`, in order.

        Usually `[message]` read by its dialect. Empty when `message` is
        held (it fits several dialects that read it differently, or its
        connection already has held messages and it does not bind it).
        When `message` binds its connection, the connection's held
        messages come first, decoded with the bound dialect.

        Raises `Ambiguous` when `message` fits no enabled dialect, and
        `HoldFull` when it would have to be held beyond a bound; either is
        counted and not to be answered. Messages past their deadline are
        dropped first (see `expire`).
        """
        routed = self._read_bound(identity, message)
        if routed is not None:
            return [Release(message, routed)]
        self.expire(now)
        try:
            routed = self._detect(identity, message)
        except Ambiguous as e:
            if not e.candidates:
                self.ambiguous_messages += 1
                raise
            self._hold(identity, message, now, e.candidates)
            return []
        dialect = self._bound.get(identity)
        if identity not in self._held:
            return [Release(message, routed)]
        if dialect is None:
            # Served unbound (every dialect reads it alike), but requests
            # before it wait: it waits too, or replies would come out of order.
            self._hold(identity, message, now, ())
            return []
        held = self._held.pop(identity)
        released = [Release(m, _decode(dialect, m)) for _, m, _ in held.messages]
        self._forget(held)
        self.released_messages += len(released)
        released.append(Release(message, routed))
        return released

    def expire(self, now: float) -> list[tuple[bytes, Message]]:
        """Drop (and return, with their identities) the held messages whose
        deadline is at or before `now`; they stay unanswered."""
        dropped: list[tuple[bytes, Message]] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, identity, seq = deadlines.popleft()
            held = self._held.get(identity)
            if held is None or held.messages[0][0] != seq:
                continue  # released with its connection's binding
            _, m, size = held.messages.popleft()
            self._held_count -= 1
            self._held_bytes -= size
            dropped.append((identity, m))
            if not held.messages:
                del self._held[identity]
        self.dropped_messages += len(dropped)
        self.ambiguous_messages += len(dropped)
        return dropped

    def next_deadline(self) -> float | None:
        """When the oldest held message is dropped (None: none is held)."""
        deadlines = self._deadlines
        while deadlines:
            _, identity, seq = deadlines[0]
            held = self._held.get(identity)
            if held is not None and held.messages[0][0] == seq:
                return deadlines[0][0]
            deadlines.popleft()  # released already
        return None

    @property
    def held(self) -> int:
        """Messages held now."""
        return self._held_count

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
            # binding (the reply is the same in each; see `_same_shape`).
            first = decoded[0]
            if all(_same_shape(first.dialect, r.dialect, message, r) for r in decoded):
                return first
        raise Ambiguous([d.name for d in candidates])

    def _hold(
        self, identity: bytes, message: Message, now: float, candidates: Sequence[str]
    ) -> None:
        size = len(message.uid) + len(message.type_frame)
        size += sum(len(p) for p in message.payloads)
        held = self._held.get(identity)
        if (
            (held is not None and len(held.messages) >= self.max_held_per_connection)
            or self._held_count >= self.max_held
            or self._held_bytes + size > self.max_held_bytes
        ):
            self.dropped_messages += 1
            self.ambiguous_messages += 1
            raise HoldFull(candidates, "; too many messages held, dropped")
        if held is None:
            held = self._held[identity] = _Held()
        self._seq += 1
        held.messages.append((self._seq, message, size))
        self._deadlines.append((now + self.hold_seconds, identity, self._seq))
        if len(self._deadlines) > 2 * self.max_held:
            # Entries of released messages pile up only while clients bind
            # quickly and often: keep those of held messages alone.
            live = {seq for h in self._held.values() for seq, _, _ in h.messages}
            self._deadlines = deque(e for e in self._deadlines if e[2] in live)
        self._held_count += 1
        self._held_bytes += size
        self.held_messages += 1

    def _forget(self, held: _Held) -> None:
        for _, _, size in held.messages:
            self._held_count -= 1
            self._held_bytes -= size

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
