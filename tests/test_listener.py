"""The listener in-process, over `inproc://` sockets: a message is in the
ROUTER's queue as soon as `send` returns (no I/O thread), and pipe limits are
exact, so these tests need no sleeps; timed behaviour runs on Trio's
autojump clock."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing
import zmq

import lmcd.listener as listener_module
from lmcd.listener import (
    HEARTBEAT,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_FRAMES,
    STALL_AFTER,
    Listener,
)
from lmcd.metrics import make_app

enc = msgspec.msgpack.encode
_names = itertools.count()
Context = zmq.Context[zmq.Socket[bytes]]


def address() -> str:
    return f"inproc://lmcd-listener-test-{next(_names)}"


@attrs.define
class Env:
    """One context, the listener and client sockets on it; all closed after
    the test (the listener's close also terminates the context)."""

    ctx: Context = attrs.field(factory=zmq.Context)
    addr: str = attrs.field(factory=address)
    sockets: list[Any] = attrs.field(factory=list)
    listener: Listener | None = None

    def dealer(self, identity: bytes | None = None, rcvhwm: int = 1000) -> Any:
        sock = self.ctx.socket(zmq.DEALER)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)  # before connect, or it is ignored
        sock.connect(self.addr)
        self.sockets.append(sock)
        return sock

    def make_listener(self, on_message: Any, **kw: Any) -> Listener:
        self.listener = Listener(
            "", 0, on_message, context=self.ctx, address=self.addr, **kw
        )
        return self.listener

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        if self.listener is not None:
            self.listener.close()
        else:
            self.ctx.term()


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


async def recv(sock: Any, timeout_ms: int = 10_000) -> list[bytes]:
    """The next message on `sock`, waited for in a thread (not the loop's)."""

    def wait() -> list[bytes]:
        assert sock.poll(timeout_ms), "no reply"
        return list(sock.recv_multipart())

    return await trio.to_thread.run_sync(wait)


# -- limits per message ---------------------------------------------------------


async def test_message_over_the_frame_cap_is_dropped_and_the_next_served(
    env: Env,
) -> None:
    served: list[list[bytes]] = []
    dropped: list[tuple[bytes, list[bytes], str]] = []
    noop_seen = trio.Event()

    def on_message(identity: bytes, frames: list[bytes]) -> None:
        served.append(frames)
        noop_seen.set()

    listener = env.make_listener(
        on_message,
        on_oversized=lambda i, f, why: dropped.append((i, f, why)),
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            sock = env.dealer(b"client")
            # 100,000 parts: several discard slices, with checkpoints between.
            sock.send_multipart([enc(1), enc(5), *[b"x"] * 100_000])
            sock.send_multipart([enc(2), enc(8)])
            await noop_seen.wait()
            nursery.cancel_scope.cancel()
    assert served == [[enc(2), enc(8)]]
    ((identity, kept, why),) = dropped
    assert identity == b"client"
    assert kept == [enc(1), enc(5), *[b"x"] * (MAX_MESSAGE_FRAMES - 2)]
    assert "100002 frames" in why
    assert listener.oversized_messages == 1


async def test_message_over_the_byte_cap_is_dropped(env: Env) -> None:
    served: list[list[bytes]] = []
    dropped: list[list[bytes]] = []
    done = trio.Event()

    def on_message(identity: bytes, frames: list[bytes]) -> None:
        served.append(frames)
        done.set()

    listener = env.make_listener(
        on_message,
        on_oversized=lambda i, f, why: dropped.append(f),
    )
    half = bytes(MAX_MESSAGE_BYTES // 2 + 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            sock = env.dealer()
            sock.send_multipart([enc(1), enc(3), half, half, enc(b"ev")])
            sock.send_multipart([enc(2), enc(8)])
            await done.wait()
            nursery.cancel_scope.cancel()
    assert dropped == [[enc(1), enc(3), half]]
    assert served == [[enc(2), enc(8)]]


@pytest.mark.parametrize("limit_mib", [1, 80])
async def test_byte_cap_is_the_configured_one(env: Env, limit_mib: int) -> None:
    """`--max-message-mb`: a message one byte over the limit is dropped, one
    at the limit is served (at 80 MiB: a frame over the 32 MiB default and
    over ZMQ's 64 MiB backstop, which grows with the limit)."""
    limit = limit_mib << 20
    served: list[list[bytes]] = []
    dropped: list[list[bytes]] = []
    whys: list[str] = []
    two = trio.Event()

    def on_message(identity: bytes, frames: list[bytes]) -> None:
        served.append(frames)
        if len(served) == 2:
            two.set()

    def on_oversized(identity: bytes, frames: list[bytes], why: str) -> None:
        dropped.append(frames)
        whys.append(why)

    listener = env.make_listener(
        on_message, on_oversized=on_oversized, max_message_bytes=limit
    )
    # With the one-byte uid and type frames: exactly the limit, one byte over.
    under = bytes(limit - 2)
    over = bytes(limit - 1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            sock = env.dealer()
            sock.send_multipart([enc(1), enc(3), over])
            sock.send_multipart([enc(2), enc(3), under])
            sock.send_multipart([enc(3), enc(8)])
            await two.wait()
            nursery.cancel_scope.cancel()
    assert dropped == [[enc(1), enc(3)]]
    assert f"{limit_mib} MiB per message (--max-message-mb)" in whys[0]
    assert [f[:2] for f in served] == [[enc(2), enc(3)], [enc(3), enc(8)]]
    assert len(served[0][2]) == limit - 2


@pytest.mark.parametrize(("limit_mib", "frame_mib"), [(1, 64), (32, 64), (80, 160)])
def test_zmq_frame_backstop_grows_with_the_byte_cap(
    env: Env, limit_mib: int, frame_mib: int
) -> None:
    # Over TCP, ZMQ drops a connection whose frame passes MAXMSGSIZE: it
    # must stay above any frame the byte cap would let through.
    listener = env.make_listener(lambda i, f: None, max_message_bytes=limit_mib << 20)
    listener.bind()
    assert listener._socket is not None
    assert listener._socket.getsockopt(zmq.MAXMSGSIZE) == frame_mib << 20


# -- one client that does not read ------------------------------------------------


async def test_client_that_never_reads_loses_only_its_own_replies(
    env: Env,
) -> None:
    listener: Listener
    seen = {b"slow": 0, b"fast": 0}
    all_in = trio.Event()

    def echo(identity: bytes, frames: list[bytes]) -> None:
        seen[identity] += 1
        listener.send([identity, frames[0], bytes(1000)])
        if seen[b"slow"] == 100 and seen[b"fast"] == 20:
            all_in.set()

    listener = env.make_listener(
        echo,
        send_hwm=4,
        max_queued_replies=8,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            slow = env.dealer(b"slow", rcvhwm=1)
            fast = env.dealer(b"fast")
            for uid in range(100):
                slow.send_multipart([enc(uid)])
            # The slow client's pipe is full and its outbox fills up; the fast
            # one is answered round trip after round trip all the same.
            for uid in range(20):
                fast.send_multipart([enc(uid)])
                assert (await recv(fast, 5000))[0] == enc(uid)
            await all_in.wait()
            stats = listener.statistics()
            assert stats.parked_clients == 1
            assert stats.queued_replies == 8
            assert stats.dropped_replies > 0
            assert dict(stats.drops_by_client) == {b"slow".hex(): stats.dropped_replies}
            # Once it reads, it gets every reply that was not dropped, in order.
            expected = 100 - stats.dropped_replies
            uids = [
                msgspec.msgpack.decode((await recv(slow))[0]) for _ in range(expected)
            ]
            assert uids == sorted(uids)
            assert not slow.poll(200)
            await listener.wait_sent()
            assert listener.statistics().parked_clients == 0
            nursery.cancel_scope.cancel()


async def test_replies_to_a_vanished_client_are_dropped(env: Env) -> None:
    listener = env.make_listener(
        lambda i, f: None,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            listener.send([b"nobody", enc(1), enc(8)])
            assert listener.dropped_replies == 1
            assert listener.statistics().parked_clients == 0
            nursery.cancel_scope.cancel()


# -- progress and /healthz -------------------------------------------------------


async def _healthz(app: Any) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "path": "/healthz", "method": "GET"}, receive, send)
    return int(sent[0]["status"])


async def test_healthz_fails_when_the_loop_stalls_with_work_waiting(
    env: Env,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stuck = False
    release = trio.Event()
    real_wait = trio.lowlevel.wait_readable

    async def wait_readable(fd: int) -> None:
        if stuck:  # a loop that never comes back, whatever happens
            with trio.CancelScope(shield=True):
                await release.wait()
        else:
            await real_wait(fd)

    monkeypatch.setattr(listener_module, "_wait_readable", wait_readable)
    handled = trio.Event()
    listener = env.make_listener(
        lambda i, f: handled.set(),
    )
    app = make_app(lambda: {}, listener.healthy)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        try:
            await trio.sleep(60)  # idle: the heartbeat keeps the loop's pass fresh
            assert await _healthz(app) == 200
            age = listener.statistics().last_pass_age
            assert age is not None
            assert age <= HEARTBEAT
            stuck = True
            await trio.sleep(2 * HEARTBEAT)  # the loop's next wait never returns
            await trio.sleep(10 * STALL_AFTER)
            assert await _healthz(app) == 200  # stuck, but nothing is waiting
            sock = env.dealer()
            sock.send_multipart([enc(1), enc(8)])
            assert await _healthz(app) == 503  # stuck with input waiting
            assert listener.statistics().stalled
        finally:
            stuck = False
            release.set()  # else a failed assertion leaves the loop shielded
        await handled.wait()
        assert await _healthz(app) == 200
        nursery.cancel_scope.cancel()


async def test_lost_wakeup_costs_at_most_a_heartbeat(
    env: Env,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def deaf(fd: int) -> None:  # an FD edge that never comes
        await trio.sleep_forever()

    monkeypatch.setattr(listener_module, "_wait_readable", deaf)
    handled = trio.Event()
    listener = env.make_listener(
        lambda i, f: handled.set(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        await trio.sleep(10)
        sock = env.dealer()
        sock.send_multipart([enc(1), enc(8)])
        started = trio.current_time()
        with trio.fail_after(10 * HEARTBEAT):
            await handled.wait()
        assert trio.current_time() - started <= HEARTBEAT
        nursery.cancel_scope.cancel()


async def test_finish_input_serves_what_the_socket_holds_then_stops(
    env: Env,
) -> None:
    listener: Listener
    served: list[bytes] = []

    def echo(identity: bytes, frames: list[bytes]) -> None:
        served.append(frames[0])
        listener.send([identity, frames[0]])

    listener = env.make_listener(
        echo,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            sock = env.dealer()
            for uid in range(600):  # more than one batch
                sock.send_multipart([enc(uid)])
            await listener.finish_input()
            assert not listener.serving
            assert served == [enc(uid) for uid in range(600)]
            sock.send_multipart([enc(600)])  # after the stop: not received
            await trio.lowlevel.checkpoint()
            assert len(served) == 600
            nursery.cancel_scope.cancel()
