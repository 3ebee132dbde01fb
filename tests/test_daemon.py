"""The daemon in-process (Trio): a crashing handler is answered, not fatal."""

from __future__ import annotations

import logging

import msgspec
import pytest
import trio
import zmq

from lmcd.config import Config
from lmcd.daemon import Daemon
from lmcd.storage import StorageManager

enc = msgspec.msgpack.encode
KEY = {"model_name": "m", "world_size": 1, "worker_id": 0, "chunk_hash": b"h"}


def exchange(endpoint: str, messages: list[list[bytes]]) -> list[list[bytes]]:
    """Send each message from a fresh DEALER and collect its reply (thread)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint)
        replies = []
        for message in messages:
            sock.send_multipart(message)
            assert sock.poll(5000), f"no reply to {message}"
            replies.append(sock.recv_multipart())
        sock.close(linger=0)
        return replies
    finally:
        ctx.term()


async def test_crashing_handler_gets_a_failure_reply(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*args: object, **kwargs: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(StorageManager, "lookup", boom)
    daemon = Daemon(Config(host="127.0.0.1", port=0, cpu_buffer_size=0.01))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(daemon.run)
            with caplog.at_level(logging.ERROR):
                replies = await trio.to_thread.run_sync(
                    exchange,
                    endpoint,
                    [[enc(1), enc(5), enc([KEY, KEY]), enc(True)], [enc(2), enc(8)]],
                )
            assert replies == [
                [enc(1), enc(5), enc([False, False])],
                [enc(2), enc(8), enc("OK")],
            ]
            assert "LOOKUP of 2 chunks (model 'm') crashed" in caplog.text
            assert daemon.handlers.counters.failed_requests == 1
            nursery.cancel_scope.cancel()


def test_warnings_are_rate_limited_but_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from lmcd.handlers import RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("lmcd.test"), per_second=5, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="lmcd.test"):
        for i in range(100):
            limited.warning("bad message %d", i)
        assert len(caplog.records) == 5
        now[0] = 1.0
        limited.warning("bad message %d", 100)
    assert len(caplog.records) == 6
    assert caplog.records[-1].getMessage() == (
        "bad message 100 (95 similar warnings suppressed)"
    )
