"""Per-connection detection between the lmcache 0.3 and 0.5 dialects, with
the captured message sequences of both clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcd.errors import ProtocolError
from lmcd.wire import PayloadError, Unsupported, lmcache03, lmcache05, parse
from lmcd.wire.detect import Ambiguous, DialectRouter
from lmcd.wire.dialect import Dialect, Message
from lmcd.wire.types import Request

D03 = lmcache03.DIALECT
D05 = lmcache05.DIALECT
enc = msgspec.msgpack.encode


def _data(name: str) -> Any:
    here = Path(__file__).resolve().parent
    for root in (here.parent, here.parent.parent):
        p = root / "shared" / "wire-vectors" / name
        if p.exists():
            return json.loads(p.read_text())
    return json.loads((here / "data" / name).read_text())


def _frames(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def _sequences() -> dict[str, list[list[bytes]]]:
    """Each captured client's messages, in the order it sent them."""
    seqs: dict[str, list[list[bytes]]] = {}
    seqs["0.3.13"] = [
        _frames(v["client_frames_hex"]) for v in _data("lmcache-0.3.13.json")["vectors"]
    ]
    for v in _data("lmcache-0.5.6.json")["vectors"]:
        if v["client_frames_hex"] and "<" not in v["operation"]:
            seqs.setdefault(f"0.5.6 {v['source']}", []).append(
                _frames(v["client_frames_hex"])
            )
    runs = _data("lmcache-0.5.6-real-server-transcript.json")["runs"]
    for run, entries in runs.items():
        for e in entries:
            if e["dir"] == "c2s":
                seqs.setdefault(f"0.5.6 {run} {e['client']}", []).append(
                    _frames(e["frames_hex"])
                )
    return seqs


SEQUENCES = _sequences()
ALL_MESSAGES = [m for seq in SEQUENCES.values() for m in seq]


def _decoded(dialect: Dialect, msg: Message) -> Request | None:
    try:
        return dialect.decode(msg)
    except (PayloadError, Unsupported):
        return None


def _check_never_misread(msg: Message) -> None:
    """If both dialects read `msg`, they read the same request and owe the
    same reply."""
    a = _decoded(D03, msg) if D03.plausible(msg) else None
    b = _decoded(D05, msg) if D05.plausible(msg) else None
    if a is None or b is None:
        return
    assert a == b
    assert D03.failure(msg, a) == D05.failure(msg, b)
    assert D03.encode(msg, a, None) == D05.encode(msg, b, None)


def test_captured_messages_are_never_misread() -> None:
    overlaps = 0
    for frames in ALL_MESSAGES:
        msg = parse(frames)
        _check_never_misread(msg)
        overlaps += D03.plausible(msg) and D05.plausible(msg)
    assert overlaps  # UNREGISTER_KV_CACHE: type 2, one instance id, in both


_KEYS03 = {"model_name": "m", "world_size": 1, "worker_id": 0, "chunk_hash": b"x"}
_payloads = sorted({f for m in ALL_MESSAGES for f in m[2:]}, key=len)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=20)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from([*_KEYS03, "token_ids", "x"]), inner, max_size=5
        )
    ),
    max_leaves=15,
)


@settings(max_examples=800, deadline=None)
@given(
    st.sampled_from([*range(0, 36), 1000, *lmcache05.LEGACY_IDS]),
    st.lists(st.sampled_from(_payloads) | _values.map(enc), max_size=8),
)
def test_the_two_decoders_never_accept_one_message_as_different_operations(
    op: int | str, payloads: list[bytes]
) -> None:
    _check_never_misread(parse([enc(1), enc(op), *payloads]))


def _route_all(
    router: DialectRouter, identity: bytes, seq: list[list[bytes]]
) -> list[tuple[str, Request | None, bool]]:
    """(dialect name, request, bound) for every message of `seq`."""
    out = []
    for frames in seq:
        routed = router.route(identity, parse(frames))
        bound = router.dialect_of(identity) is not None
        out.append((routed.dialect.name, routed.request, bound))
    return out


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_every_client_binds_to_its_dialect_from_any_starting_point(name: str) -> None:
    """A client that (re)connects mid-stream, e.g. after a daemon restart,
    is bound by its first message that only its dialect could have sent;
    before that nothing is misread and nothing it sends goes unanswered."""
    seq = SEQUENCES[name]
    right = D03 if name.startswith("0.3") else D05
    for start in range(len(seq)):
        router = DialectRouter((D03, D05))
        for frames in seq[start:]:
            msg = parse(frames)
            was_bound = router.dialect_of(b"c") is not None
            routed = router.route(b"c", msg)  # never Ambiguous for real clients
            expected = _decoded(right, msg)
            assert routed.request == expected
            if router.dialect_of(b"c") is not None:
                assert router.dialect_of(b"c") is right
            if routed.dialect is not right:
                # Served unbound: both dialects read it alike (UNREGISTER).
                assert not was_bound
                assert router.dialect_of(b"c") is None
                assert expected is not None
                assert routed.dialect.encode(msg, expected, None) == right.encode(
                    msg, expected, None
                )
            if routed.request is None:
                assert routed.error is not None
                assert routed.error.reply == _owed(right, msg)
        assert router.ambiguous_messages == 0


def _owed(dialect: Dialect, msg: Message) -> list[bytes] | None:
    try:
        dialect.decode(msg)
    except (PayloadError, Unsupported) as e:
        return e.reply
    raise AssertionError("decoded")


def test_both_clients_on_one_router_at_once() -> None:
    router = DialectRouter((D03, D05))
    a = SEQUENCES["0.3.13"]
    b = SEQUENCES["0.5.6 C:WorkerAdapter(lmcache_driven)"]
    for i in range(max(len(a), len(b))):
        for identity, seq, right in ((b"a", a, D03), (b"b", b, D05)):
            if i < len(seq):
                routed = router.route(identity, parse(seq[i]))
                assert routed.dialect is right or routed.request == _decoded(
                    right, parse(seq[i])
                )
    assert router.connections() == {"lmcache-0.3": 1, "lmcache-0.5": 1}


def test_a_message_neither_dialect_reads_is_left_unanswered() -> None:
    router = DialectRouter((D03, D05))
    with pytest.raises(Ambiguous):
        router.route(b"x", parse([enc(0), enc(11)]))  # 0.5's retired id
    # Type 2 with an undecodable instance id fits both and neither reads it.
    with pytest.raises(Ambiguous):
        router.route(b"x", parse([enc(0), enc(2), enc("not an id")]))
    assert router.dialect_of(b"x") is None


def test_stream_credit_frames_are_not_messages() -> None:
    # lmcache 0.5.6 sends [uid, b"", b"ack" | b"cancel"] to steer a stream;
    # they have no operation, so no dialect is asked to read them.
    with pytest.raises(ProtocolError):
        parse([enc(3), b"", b"cancel"])
