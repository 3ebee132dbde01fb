"""A ZMQ ROUTER socket served from the Trio thread.

pyzmq has no Trio integration. The socket's `FD` becomes readable when its
event state *may* have changed and is edge-triggered: after any send or
receive, pending input may not wake us again. So the loop drains while
`EVENTS` says POLLIN, re-checks after every send, and only then waits on
the FD (at most `HEARTBEAT` seconds, so that a lost edge costs a second, not
a hang, and `/healthz` can tell a stalled loop from an idle one). Sends
happen here, on the Trio thread (a ZMQ socket is not thread-safe).

Limits, each enforced here so that one client cannot hurt the others:

- a message keeps at most `MAX_MESSAGE_FRAMES` frames and `max_message_bytes`
  bytes after the identity (`--max-message-mb`, default `MAX_MESSAGE_BYTES`);
  the rest of a larger one is received and dropped part by part, never
  held, and the message is answered with a failure through `on_oversized`
  (ZMQ itself refuses a frame over twice that, at least `MAX_FRAME_BYTES`,
  by disconnecting the peer);
- each client has its own bounded outbox: a reply that meets a full pipe
  (ROUTER_MANDATORY's EAGAIN, for that peer only) parks the client, its
  later replies queue behind it and are retried on a backoff timer (a
  ROUTER's POLLOUT says nothing per peer), and once its queue is full the
  client loses its own replies, counted; other clients are not delayed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
import trio
import zmq

from lmcd.errors import ConfigError
from lmcd.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

# ZMQ disconnects a peer whose single frame exceeds this, or twice the
# message limit if that is more (a backstop for frames the listener would
# drop anyway).
MiB = 1 << 20
MAX_FRAME_BYTES = 64 << 20
# Frames and bytes kept of one message after the routing identity. The
# largest messages of any dialect: lmcache 0.5's REGISTER, 9 frames; a
# STORE carrying a 1M-token prompt's token ids, about 5 MB. The byte limit
# is the default of `--max-message-mb` (lmcache 0.4.6's CPU workers send
# their chunks inside STORE messages: large models need more).
MAX_MESSAGE_FRAMES = 32
MAX_MESSAGE_BYTES = 32 << 20
# Replies ZMQ queues for one peer before a send to it says EAGAIN (ZMQ
# counts messages, not bytes: 1,000 of the largest LOOKUP reply is 64 MiB).
SEND_HWM = 1000
# A parked client's own outbox, on top of ZMQ's queue.
MAX_QUEUED_REPLIES = 1024
MAX_QUEUED_BYTES = 16 << 20
# Retry backoff for parked clients, in seconds.
RETRY_FIRST = 0.001
RETRY_MAX = 0.1
# The longest the loop waits on the FD without looking at the socket.
HEARTBEAT = 1.0
# `/healthz` fails when the loop has made no pass for this long while work
# waits.
STALL_AFTER = 5.0
# Messages handled, and parts of a dropped message discarded, before
# yielding to other tasks.
_BATCH = 256
_DISCARD_SLICE = 16384
# Return freed memory to the OS after dropping a message at least this
# large (glibc keeps freed heap pages otherwise), at most once a second.
_TRIM_BYTES = 8 << 20
_TRIM_PARTS = 65536
_TRIM_INTERVAL = 1.0
# Per-client drop counts kept for STATS.
_MAX_DROP_ENTRIES = 256

OnMessage = Callable[[bytes, list[bytes]], None]
OnOversized = Callable[[bytes, list[bytes], str], None]


@attrs.frozen
class ListenerStatistics:
    """A snapshot of the listener's counters and progress (ages in seconds,
    None when it never happened)."""

    received: int
    sent: int
    dropped_replies: int
    oversized_messages: int
    queued_replies: int
    parked_clients: int
    last_receive_age: float | None
    last_send_age: float | None
    last_pass_age: float | None
    stalled: bool
    drops_by_client: tuple[tuple[str, int], ...]  # the top 10, identity in hex


@attrs.define(slots=True)
class _Peer:
    """A parked client: replies waiting for room in its pipe."""

    queue: deque[Sequence[bytes]] = attrs.field(factory=deque)
    queued_bytes: int = 0
    backoff: float = RETRY_FIRST
    retry_at: float = 0.0


@attrs.define(slots=True)
class _Discard:
    """A message past the limits whose remaining parts are being dropped."""

    identity: bytes
    frames: list[bytes]
    reason: str
    parts: int
    nbytes: int


@attrs.define(slots=True, eq=False)
class Listener:
    """Owns the ROUTER socket; `on_message(identity, frames)` runs inline.

    `on_oversized(identity, kept_frames, reason)` is called for a message
    dropped for its size, with the frames kept before the limit (so that
    uid and type can still be answered); without it such messages are only
    logged and counted. `address` replaces `tcp://host:port` (tests use
    `inproc://`).
    """

    host: str
    port: int
    on_message: OnMessage
    context: zmq.Context[zmq.Socket[bytes]] = attrs.field(factory=zmq.Context)
    on_oversized: OnOversized | None = None
    address: str | None = None
    send_hwm: int = SEND_HWM
    max_queued_replies: int = MAX_QUEUED_REPLIES
    max_queued_bytes: int = MAX_QUEUED_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES
    stall_after: float = STALL_AFTER
    dropped_replies: int = 0
    oversized_messages: int = 0
    endpoint: str = attrs.field(default="", init=False)
    _socket: zmq.Socket[bytes] | None = attrs.field(default=None, init=False)
    _peers: dict[bytes, _Peer] = attrs.field(factory=dict, init=False)
    _drops: dict[bytes, int] = attrs.field(factory=dict, init=False)
    _discard: _Discard | None = attrs.field(default=None, init=False)
    _wait_scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _accepting: bool = attrs.field(default=True, init=False)
    _finishing: trio.Event | None = attrs.field(default=None, init=False)
    _all_sent: trio.Event | None = attrs.field(default=None, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _received: int = attrs.field(default=0, init=False)
    _sent: int = attrs.field(default=0, init=False)
    _seen: tuple[int, int] = attrs.field(default=(0, 0), init=False)
    _last_pass: float | None = attrs.field(default=None, init=False)
    _last_receive: float | None = attrs.field(default=None, init=False)
    _last_send: float | None = attrs.field(default=None, init=False)
    _trim_due: bool = attrs.field(default=False, init=False)
    _last_trim: float = attrs.field(default=float("-inf"), init=False)
    _log_limit: RateLimitedLog = attrs.field(
        factory=lambda: RateLimitedLog(log), init=False
    )

    @property
    def max_frame_bytes(self) -> int:
        """ZMQ's per-frame backstop (`MAXMSGSIZE`)."""
        return max(MAX_FRAME_BYTES, 2 * self.max_message_bytes)

    def bind(self) -> str:
        """Create and bind the socket; returns the bound endpoint (with the
        real port when `port` is 0). Raises `ConfigError` if the address is
        in use or cannot be bound."""
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        sock.setsockopt(zmq.SNDHWM, self.send_hwm)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        address = self.address or f"tcp://{self.host}:{self.port}"
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ConfigError(f"cannot listen on {address}: {e.strerror}") from e
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    async def run(
        self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; `task_status.started(endpoint)` once bound."""
        if self._socket is None:
            self.bind()
        sock = self._socket
        assert sock is not None
        fd = int(cast(int, sock.getsockopt(zmq.FD)))
        task_status.started(self.endpoint)
        self._running = True
        try:
            while True:
                now = trio.current_time()
                self._note_progress(now)
                if self._peers:
                    self._retry_parked(now)
                if self._trim_due and now - self._last_trim >= _TRIM_INTERVAL:
                    self._trim(now)
                if self._discard is not None:
                    if not self._discard_some(sock):
                        await trio.lowlevel.checkpoint()
                        continue
                    self._finish_discard(now)
                handled = self._receive_batch(sock)
                if handled >= _BATCH or self._discard is not None:
                    await trio.lowlevel.checkpoint()
                    continue
                if self._finishing is not None:
                    # Everything the socket held has been read: stop here.
                    self._accepting = False
                    self._finishing.set()
                    self._finishing = None
                if self._accepting and _events(sock) & _POLLIN:
                    await trio.lowlevel.checkpoint()
                    continue
                deadline = now + HEARTBEAT
                for peer in self._peers.values():
                    deadline = min(deadline, peer.retry_at)
                with trio.CancelScope(deadline=deadline) as scope:
                    self._wait_scope = scope
                    await _wait_readable(fd)
                self._wait_scope = None
        finally:
            self._wait_scope = None
            self._running = False
            if self._finishing is not None:
                self._finishing.set()

    def _receive_batch(self, sock: zmq.Socket[bytes]) -> int:
        handled = 0
        while self._accepting and _events(sock) & _POLLIN:
            try:
                frames, nbytes, more = _recv_message(sock, self.max_message_bytes)
            except zmq.Again:
                break
            self._received += 1
            handled += 1
            if more is not None:
                # frames: those kept, before the one that crossed a limit.
                self._discard = _Discard(
                    frames[0],
                    frames[1:],
                    f"over lmcd's limit of {MAX_MESSAGE_FRAMES} frames (fixed) or "
                    f"{self.max_message_bytes / MiB:g} MiB per message "
                    "(--max-message-mb)",
                    len(frames),
                    nbytes,
                )
                if more:
                    return handled
                self._finish_discard(trio.current_time())
                continue
            try:
                self.on_message(frames[0], frames[1:])
            except Exception:
                # The handlers answer their own failures; this is the last
                # line that keeps a bug from killing the listener.
                self._log_limit.error("message handler failed", exc_info=True)
            if handled >= _BATCH:
                break
        return handled

    def _discard_some(self, sock: zmq.Socket[bytes]) -> bool:
        """Drop up to `_DISCARD_SLICE` parts of the message being discarded;
        True once its last part is gone."""
        d = self._discard
        assert d is not None
        for _ in range(_DISCARD_SLICE):
            # Received without copying and released at once: only ZMQ's own
            # buffer, already allocated, is touched.
            frame = _Base.recv(sock, _NOBLOCK, False)
            d.parts += 1
            d.nbytes += len(frame)
            if not frame.more:
                return True
        return False

    def _finish_discard(self, now: float) -> None:
        d = self._discard
        assert d is not None
        self._discard = None
        self.oversized_messages += 1
        if d.nbytes >= _TRIM_BYTES or d.parts >= _TRIM_PARTS:
            self._trim_due = True
            if now - self._last_trim >= _TRIM_INTERVAL:
                self._trim(now)
        reason = f"{d.parts} frames, {d.nbytes} bytes: {d.reason}"
        if self.on_oversized is None:
            self._log_limit.warning("Dropped a message (%s)", reason)
            return
        try:
            self.on_oversized(d.identity, d.frames, reason)
        except Exception:
            self._log_limit.error("oversized-message handler failed", exc_info=True)

    def _trim(self, now: float) -> None:
        self._trim_due = False
        self._last_trim = now
        _malloc_trim()

    def _note_progress(self, now: float) -> None:
        self._last_pass = now
        counts = (self._received, self._sent)
        if counts != self._seen:
            if counts[0] != self._seen[0]:
                self._last_receive = now
            if counts[1] != self._seen[1]:
                self._last_send = now
            self._seen = counts

    # -- shutdown ----------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Bound and receiving requests."""
        return self._socket is not None and self._accepting and self._running

    def stop_accepting(self) -> None:
        """Receive no more requests; replies still go out."""
        self._accepting = False

    async def finish_input(self) -> None:
        """Receive (and hand to `on_message`) what the socket already holds,
        then stop receiving; replies still go out. Returns once stopped."""
        if not self._running or not self._accepting:
            self._accepting = False
            return
        if self._finishing is None:
            self._finishing = trio.Event()
        event = self._finishing
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        await event.wait()

    async def wait_sent(self) -> None:
        """Return once no reply is waiting in a parked client's outbox."""
        while self._peers:
            if self._all_sent is None:
                self._all_sent = trio.Event()
            await self._all_sent.wait()

    # -- replies -----------------------------------------------------------------

    def send(self, frames: Sequence[bytes]) -> None:
        """Send a reply `[identity, ...]` now, or queue it behind the earlier
        replies of a parked client; Trio thread only. Never raises: a reply
        that cannot be sent is dropped and counted."""
        identity = frames[0]
        peer = self._peers.get(identity) if self._peers else None
        if peer is not None:
            self._enqueue(identity, peer, frames)
            return
        sock = self._socket
        if sock is None:
            self.dropped_replies += 1
            return
        try:
            _send_frames(sock, frames)
            self._sent += 1
        except zmq.Again:
            self._park(identity, frames)
        except zmq.ZMQError as e:
            self._send_failed(e, 1)
        self._kick()

    def _park(self, identity: bytes, frames: Sequence[bytes]) -> None:
        peer = _Peer(retry_at=trio.current_time() + RETRY_FIRST)
        self._peers[identity] = peer
        self._enqueue(identity, peer, frames)
        scope = self._wait_scope
        if scope is not None and peer.retry_at < scope.deadline:
            scope.deadline = peer.retry_at

    def _enqueue(self, identity: bytes, peer: _Peer, frames: Sequence[bytes]) -> None:
        size = sum(len(f) for f in frames)
        if (
            len(peer.queue) >= self.max_queued_replies
            or peer.queued_bytes + size > self.max_queued_bytes
        ):
            self.dropped_replies += 1
            count = self._drops.get(identity, 0) + 1
            if count == 1 and len(self._drops) >= _MAX_DROP_ENTRIES:
                del self._drops[min(self._drops, key=self._drops.__getitem__)]
            self._drops[identity] = count
            self._log_limit.warning(
                "Client %s does not read its replies: %d queued; dropped one "
                "(%d dropped for it so far)",
                identity.hex(),
                len(peer.queue),
                count,
            )
            return
        peer.queue.append(frames)
        peer.queued_bytes += size

    def _retry_parked(self, now: float) -> None:
        sock = self._socket
        for identity, peer in list(self._peers.items()):
            if peer.retry_at > now:
                continue
            queue = peer.queue
            while queue and sock is not None:
                frames = queue[0]
                try:
                    _send_frames(sock, frames)
                except zmq.Again:
                    peer.backoff = min(peer.backoff * 2, RETRY_MAX)
                    peer.retry_at = now + peer.backoff
                    break
                except zmq.ZMQError as e:
                    self._send_failed(e, len(queue))
                    queue.clear()
                    break
                queue.popleft()
                peer.queued_bytes -= sum(len(f) for f in frames)
                peer.backoff = RETRY_FIRST
                self._sent += 1
            if not queue:
                del self._peers[identity]
        if not self._peers and self._all_sent is not None:
            self._all_sent.set()
            self._all_sent = None

    def _send_failed(self, e: zmq.ZMQError, replies: int) -> None:
        self.dropped_replies += replies
        if e.errno == errno.EHOSTUNREACH:
            # The peer went away; there is no one left to answer.
            log.debug("%d replies to a disconnected client dropped", replies)
        else:
            self._log_limit.error("cannot send a reply: %s", e)

    def _kick(self) -> None:
        # A send may have consumed the FD's edge while input is pending:
        # make the waiting loop look again.
        if self._wait_scope is None or self._socket is None:
            return
        if _events(self._socket) & _POLLIN:
            self._wait_scope.cancel()

    @property
    def pending_replies(self) -> int:
        """Replies waiting in parked clients' outboxes."""
        return sum(len(p.queue) for p in self._peers.values())

    # -- health ------------------------------------------------------------------

    def stalled(self) -> bool:
        """True when the loop has made no pass for `stall_after` seconds while
        work waits (input on the socket, replies queued, a message being
        dropped). Trio thread only."""
        sock = self._socket
        if not self._running or sock is None or self._last_pass is None:
            return False
        if trio.current_time() - self._last_pass <= self.stall_after:
            return False
        waiting = bool(self._peers) or self._discard is not None
        if self._accepting and _events(sock) & _POLLIN:
            waiting = True
            # Reading EVENTS may have consumed the FD's edge.
            self._kick()
        return waiting

    def healthy(self) -> bool:
        """Serving, and not stalled."""
        return self.serving and not self.stalled()

    def statistics(self) -> ListenerStatistics:
        """Counters and progress ages (Trio thread only)."""
        now = trio.current_time()

        def age(t: float | None) -> float | None:
            return None if t is None else now - t

        top = sorted(self._drops.items(), key=lambda kv: -kv[1])[:10]
        return ListenerStatistics(
            received=self._received,
            sent=self._sent,
            dropped_replies=self.dropped_replies,
            oversized_messages=self.oversized_messages,
            queued_replies=self.pending_replies,
            parked_clients=len(self._peers),
            last_receive_age=age(self._last_receive),
            last_send_age=age(self._last_send),
            last_pass_age=age(self._last_pass),
            stalled=self.stalled(),
            drops_by_client=tuple((k.hex(), v) for k, v in top),
        )

    def close(self) -> None:
        """Close the socket (replies ZMQ still holds get `LINGER` ms to leave)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self.context.term()


# The hot path calls pyzmq's Cython socket methods directly, with plain int
# flags: the Python "sugar" layer (keyword handling, IntFlag arithmetic)
# costs more than the send itself for small frames (measured: 7.1 -> 4.0 us
# for a 4-frame reply and its receipt).
_Base: Any = zmq.backend.Socket
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
_COPY_LIMIT = 65536  # larger frames are sent without a copy
_wait_readable = trio.lowlevel.wait_readable


def _events(sock: zmq.Socket[bytes]) -> int:
    return int(_Base.get(sock, _EVENTS))


def _recv_message(
    sock: zmq.Socket[bytes], max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[list[bytes], int, bool | None]:
    """`(frames, nbytes, more)` for one message: all its frames and their
    size after the identity, `more` None; or, past a limit, the frames
    before the one that crossed it, the bytes received after the identity
    (that frame included) and whether parts remain to be dropped. Raises
    `zmq.Again` if no message waits."""
    # Frame objects carry `more` and their size without a copy or a
    # getsockopt(RCVMORE) round trip; only frames within the limits are
    # copied into bytes.
    frame = _Base.recv(sock, _NOBLOCK, False)
    frames = [frame.bytes]
    total = 0
    while frame.more:
        frame = _Base.recv(sock, _NOBLOCK, False)
        total += len(frame)
        if len(frames) > MAX_MESSAGE_FRAMES or total > max_bytes:
            return frames, total, bool(frame.more)
        frames.append(frame.bytes)
    return frames, total, None


def _send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
    """Send a multipart message; raises `zmq.Again` at the high-water mark
    (ROUTER sockets check this before the first frame, so no part is sent)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        copy = len(frame) < _COPY_LIMIT
        _Base.send(sock, frame, _MORE if i < last else _NOBLOCK, copy)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_malloc_trim_fn = _load_malloc_trim()


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise)."""
    if _malloc_trim_fn is not None:
        _malloc_trim_fn(0)
