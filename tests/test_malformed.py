"""Bad input over a raw socket: each gets a logged, counted, answered failure
(or, when not even uid and type decode, a logged and counted drop), and the
daemon goes on serving everyone else."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq

from tests.conftest import Server

enc = msgspec.msgpack.encode
KEY = {"model_name": "m", "world_size": 1, "worker_id": 0, "chunk_hash": b"h"}


@pytest.fixture
def raw(server: Server, zmq_context: Any) -> Iterator[zmq.Socket[bytes]]:
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.url)
    # Like a real 0.3 client, start with GET_CHUNK_SIZE: under --dialect
    # auto that binds the connection to the 0.3 dialect, whose failure
    # replies these cases check (an unbound connection's message that fits
    # no dialect is left unanswered).
    sock.send_multipart([enc(0), enc(7)])
    assert reply(sock) is not None
    yield sock
    sock.close(linger=0)


def reply(sock: zmq.Socket[bytes], timeout_ms: int = 10_000) -> list[bytes] | None:
    if not sock.poll(timeout_ms):
        return None
    return sock.recv_multipart()


def stats(zmq_context: Any, server: Server) -> dict[str, Any]:
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.url)
    try:
        sock.send_multipart([enc(0), enc(1000)])
        frames = reply(sock)
        assert frames is not None, "STATS not answered"
        return dict(msgspec.msgpack.decode(frames[2]))
    finally:
        sock.close(linger=0)


def noop_from_another_client(zmq_context: Any, server: Server) -> None:
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.url)
    try:
        sock.send_multipart([enc(7), enc(8)])
        assert reply(sock) == [enc(7), enc(8), enc("OK")]
    finally:
        sock.close(linger=0)


# (name, frames after the identity, the reply expected or None for a drop)
CASES: list[tuple[str, list[bytes], list[bytes] | None]] = [
    ("empty message", [b""], None),
    ("fewer than 3 frames", [enc(1)], None),
    ("undecodable uid", [b"\xc1", enc(8)], None),
    ("undecodable type", [enc(1), b"\xff\xff"], None),
    ("unknown type", [enc(2), enc(99)], [enc(2), enc(99)]),
    ("NOOP with a payload", [enc(3), enc(8), enc(1)], [enc(3), enc(8), enc("ERROR")]),
    (
        "LOOKUP missing lock",
        [enc(4), enc(5), enc([KEY, KEY])],
        [enc(4), enc(5), enc([False, False])],
    ),
    (
        "LOOKUP keys not a list",
        [enc(5), enc(5), enc(3), enc(True)],
        [enc(5), enc(5), enc([])],
    ),
    (
        "LOOKUP huge world_size",
        [enc(6), enc(5), enc([{**KEY, "world_size": 1 << 40}]), enc(True)],
        [enc(6), enc(5), enc([False])],
    ),
    (
        "STORE bad block ids",
        [enc(7), enc(3), enc([KEY]), enc(1), enc("x"), enc(b"ev")],
        [enc(7), enc(3), enc([b"ev", False])],
    ),
    (
        "RETRIEVE bad instance",
        [enc(8), enc(4), enc([KEY]), enc("x"), enc([1]), enc(b"ev")],
        [enc(8), enc(4), enc([b"ev", [False]])],
    ),
    (
        "oversized STORE",
        [enc(9), enc(3), enc([KEY]), enc(1), enc(list(range(3_000_000))), enc(b"ev")],
        [enc(9), enc(3), enc([b"ev", False])],
    ),
    ("REGISTER not a list", [enc(10), enc(1), enc(1), enc(5)], [enc(10), enc(1)]),
    (
        "GET_CHUNK_SIZE with payload",
        [enc(11), enc(7), enc(0)],
        [enc(11), enc(7), enc(0)],
    ),
]


@pytest.mark.parametrize(
    ("name", "message", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_malformed_message(
    name: str,
    message: list[bytes],
    expected: list[bytes] | None,
    raw: zmq.Socket[bytes],
    server: Server,
    zmq_context: Any,
) -> None:
    before = stats(zmq_context, server)["malformed_messages"]
    raw.send_multipart(message)
    if expected is None:
        assert reply(raw, 300) is None
    else:
        assert reply(raw) == expected
    noop_from_another_client(zmq_context, server)
    assert stats(zmq_context, server)["malformed_messages"] == before + 1


class _RunsCode:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch /tmp/lmcd-pwned-{os.getpid()}",))


def test_pickle_that_would_run_code_is_refused(
    raw: zmq.Socket[bytes], server: Server, zmq_context: Any
) -> None:
    marker = f"/tmp/lmcd-pwned-{os.getpid()}"
    ext = msgspec.msgpack.Ext(1, pickle.dumps(_RunsCode()))
    raw.send_multipart([enc(1), enc(1), enc(1234), enc([ext])])
    assert reply(raw) == [enc(1), enc(1)]
    server.wait_for_log("not allowed")
    assert not os.path.exists(marker)
    noop_from_another_client(zmq_context, server)


def test_client_that_disconnects_before_its_reply(
    server: Server, zmq_context: Any
) -> None:
    for _ in range(20):
        sock = zmq_context.socket(zmq.DEALER)
        sock.connect(server.url)
        sock.send_multipart([enc(1), enc(5), enc([KEY] * 100), enc(True)])
        sock.close(linger=0)
    noop_from_another_client(zmq_context, server)
