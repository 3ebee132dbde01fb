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
# An array nested 100,000 deep: past every decoder's recursion limit.
DEEP = b"\x91" * 100_000 + b"\x01"
_MODULE = b"lmcache.v1.multiprocess.custom_types"
_NAME = b"CudaIPCWrapper"
# The wrapper class built (NEWOBJ) but never given its state (no BUILD).
HALF_BUILT = (
    b"\x80\x04\x8c" + bytes([len(_MODULE)]) + _MODULE
    + b"\x8c" + bytes([len(_NAME)]) + _NAME + b"\x93)\x81."
)  # fmt: skip
# NONE, LONG_BINPUT 2**32-1, STOP: a 4-billion-slot memo if unchecked.
MEMO_BOMB = b"\x80\x04Nr\xff\xff\xff\xff."


def wrappers(*pickles: bytes) -> bytes:
    return enc([msgspec.msgpack.Ext(1, p) for p in pickles])


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
    (
        "LOOKUP keys nested 100,000 deep",
        [enc(12), enc(5), DEEP, enc(True)],
        [enc(12), enc(5), enc([False])],
    ),
    (
        "STORE keys nested 100,000 deep",
        [enc(13), enc(3), DEEP, enc(1), enc([0]), enc(b"ev")],
        [enc(13), enc(3), enc([b"ev", False])],
    ),
    (
        "REGISTER wrapper without state",
        [enc(14), enc(1), enc(1234), wrappers(HALF_BUILT)],
        [enc(14), enc(1)],
    ),
    (
        "REGISTER 9-byte memo bomb",
        [enc(15), enc(1), enc(1234), wrappers(MEMO_BOMB)],
        [enc(15), enc(1)],
    ),
    (
        "LOOKUP with 100 extra frames",
        [enc(16), enc(5), enc([KEY, KEY]), enc(True), *[b"\xc0"] * 100],
        [enc(16), enc(5), enc([False, False])],
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
    mark = server.mark()
    raw.send_multipart(message)
    if expected is None:
        assert reply(raw, 300) is None
    else:
        assert reply(raw) == expected
    noop_from_another_client(zmq_context, server)
    assert stats(zmq_context, server)["malformed_messages"] == before + 1
    assert "Traceback" not in server.log_since(mark)


@pytest.mark.parametrize(
    ("name", "message", "expected"),
    [
        (
            "40,000 one-byte frames",
            [enc(1), enc(5), enc([KEY]), enc(True), *[b"\xc0"] * 40_000],
            [enc(1), enc(5), enc([False])],
        ),
        (
            "a 40 MiB STORE",
            [enc(2), enc(3), enc([KEY]), enc(1), bytes(40 << 20), enc(b"ev")],
            # The handle frame came after the limit: not kept, not echoed.
            [enc(2), enc(3), enc([b"", False])],
        ),
        ("a 40 MiB uid", [bytes(40 << 20), enc(8)], None),
    ],
)
def test_message_over_the_caps_is_dropped_and_answered(
    name: str,
    message: list[bytes],
    expected: list[bytes] | None,
    raw: zmq.Socket[bytes],
    server: Server,
    zmq_context: Any,
) -> None:
    before = stats(zmq_context, server)
    raw.send_multipart(message)
    if expected is None:
        assert reply(raw, 300) is None
    else:
        assert reply(raw) == expected
    noop_from_another_client(zmq_context, server)
    after = stats(zmq_context, server)
    assert after["oversized_messages"] == before["oversized_messages"] + 1
    assert after["malformed_messages"] == before["malformed_messages"] + 1


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


def test_oversized_message_is_answered_in_the_connections_dialect(
    server: Server, zmq_context: Any
) -> None:
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.url)
    try:
        # NOOP is 24 in lmcache 0.5 and unknown to 0.3: it binds the
        # connection to 0.5, whose STORE (6) failure is `[b"", False]`.
        sock.send_multipart([enc(0), enc(24)])
        assert reply(sock) == [enc(0), enc(24), enc("OK")]
        sock.send_multipart([enc(1), enc(6), *[b"\xc0"] * 40_000])
        assert reply(sock) == [enc(1), enc(6), enc([b"", False])]
    finally:
        sock.close(linger=0)


def test_oversized_message_of_an_unbound_client_is_counted_not_guessed(
    server: Server, zmq_context: Any
) -> None:
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.url)
    try:
        before = stats(zmq_context, server)
        # Type 5: LOOKUP in 0.3, store_q in 0.5; the two owe different replies.
        sock.send_multipart([enc(1), enc(5), enc([KEY]), *[b"\xc0"] * 40_000])
        assert reply(sock, 300) is None
        after = stats(zmq_context, server)
        assert after["oversized_messages"] == before["oversized_messages"] + 1
        assert after["ambiguous_messages"] == before["ambiguous_messages"] + 1
    finally:
        sock.close(linger=0)
