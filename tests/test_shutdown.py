"""Shutdown answers what the daemon has already received.

The daemon runs in-process with its listener on `inproc://`, so that a
request is in the ROUTER's queue the moment the client's `send` returns:
the test can queue requests and start the shutdown before the listener has
looked at any of them, with no timing involved.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from lmcd.config import Config
from lmcd.daemon import Daemon
from lmcd.shmkv import SharedKVCache

enc = msgspec.msgpack.encode
KEY = {"model_name": "m", "world_size": 1, "worker_id": 0, "chunk_hash": b"h"}
EVENT = b"\x5a" * 64


async def recv(sock: Any, timeout_ms: int = 10_000) -> list[bytes]:
    def wait() -> list[bytes]:
        assert sock.poll(timeout_ms), "no reply"
        return list(sock.recv_multipart())

    return await trio.to_thread.run_sync(wait)


async def exchange(
    daemon: Daemon, sock: Any, kv: SharedKVCache, replies: dict[int, list[bytes]]
) -> None:
    sock.connect("inproc://lmcd-shutdown-test")
    sock.send_multipart([enc(0), enc(1), enc(77), enc(kv.register_payload())])
    assert await recv(sock) == [enc(0), enc(1)]
    assert len(daemon.scheduler.instances()) == 1

    # Queued, then the shutdown starts before the listener has run.
    for uid in range(1, 301):
        sock.send_multipart([enc(uid), enc(5), enc([KEY]), enc(False)])
    store = [enc([KEY]), enc(77), enc(list(range(16))), enc(EVENT)]
    sock.send_multipart([enc(301), enc(3), *store])
    sock.send_multipart([enc(302), enc(8)])
    sock.send_multipart([enc(303), enc(2), enc(77)])
    await daemon.shutdown()

    for _ in range(303):
        reply = await recv(sock)
        replies[msgspec.msgpack.decode(reply[0])] = reply


async def test_requests_received_before_shutdown_are_answered() -> None:
    import zmq

    daemon = Daemon(Config(host="127.0.0.1", port=0, cpu_buffer_size=0.01))
    daemon.listener.address = "inproc://lmcd-shutdown-test"
    kv = SharedKVCache.create(
        "mha", num_layers=2, num_blocks=32, block_size=16, num_heads=2, head_size=16
    )
    replies: dict[int, list[bytes]] = {}
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                sock = daemon.listener.context.socket(zmq.DEALER)
                try:
                    await exchange(daemon, sock, kv, replies)
                finally:
                    # The daemon terminates the context it shares with
                    # `sock` when it stops, which waits for every socket.
                    sock.close(linger=0)
                nursery.cancel_scope.cancel()
    finally:
        kv.close()
    # Control plane: served as usual.
    for uid in range(1, 301):
        assert replies[uid] == [enc(uid), enc(5), enc([False])]
    assert replies[302] == [enc(302), enc(8), enc("OK")]
    # Data plane, not started: its failure reply, and nothing stored.
    assert replies[301] == [enc(301), enc(3), enc([EVENT, False])]
    assert replies[303] == [enc(303), enc(2)]
    assert daemon.storage.statistics().stored_chunks == 0
    assert daemon.handlers.counters.failed_requests == 2
