"""Per-connection detection between the lmcache 0.3, 0.4.x and 0.5
dialects, with the captured message sequences of their clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcd.errors import ProtocolError
from lmcd.wire import (
    PayloadError,
    Unsupported,
    lmcache03,
    lmcache04,
    lmcache05,
    parse,
)
from lmcd.wire.detect import Ambiguous, DialectRouter, Release
from lmcd.wire.dialect import Dialect, Message
from lmcd.wire.registry import DIALECTS, dialects_for
from lmcd.wire.types import Ping, Request

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


# -- every dialect at once (`--dialect auto`) -------------------------------------

# Every dialect lmcd speaks on one router (a superset of `--dialect auto`).
ALL = tuple(DIALECTS.values())
D044, D046, D047 = lmcache04.DIALECTS
_DATA = Path(__file__).resolve().parent / "data"


def _sequences_04() -> dict[str, tuple[Dialect, list[list[bytes]]]]:
    """The real 0.4 adapters' messages, per client, in the order sent: the
    two real-server transcripts and the scheduler and worker flows of the
    0.4.7 capture (its raw clients send every type in table order, which no
    adapter does)."""
    seqs: dict[str, tuple[Dialect, list[list[bytes]]]] = {}
    for release, dialect in (("0.4.6", D046), ("0.4.7", D047)):
        name = f"lmcache-{release}-real-server-transcript.json"
        for e in json.loads((_DATA / name).read_text())["entries"]:
            if e["dir"] == "c2s" and e["client"] != "raw":
                key = f"{release} {e['client']}"
                seqs.setdefault(key, (dialect, []))[1].append(_frames(e["frames_hex"]))
    for v in _data("lmcache-0.4.7.json")["vectors"]:
        if not v["source"].startswith("A:"):
            key = f"0.4.7 {v['source']}"
            seqs.setdefault(key, (D047, []))[1].append(_frames(v["client_frames_hex"]))
    return seqs


SEQUENCES_04 = _sequences_04()


def _operation(dialect: Dialect, msg: Message) -> str | None:
    if dialect is D05:
        return lmcache05.operation(msg)
    if dialect is D03:
        return str(msg.op)
    assert isinstance(dialect, lmcache04.Lmcache04)
    return dialect.operation(msg)


# Messages that may go unanswered when they are the first a daemon sees of a
# connection (mid-stream, after a daemon restart), because another enabled
# dialect reads the same frames as a request of another type and a reply in
# the wrong type would kill the client. Each is either not waited for, or
# always preceded on its connection by a message that binds it (an
# adapter's GET_CHUNK_SIZE, the heartbeat PING that precedes a
# re-registration), or refused by its own dialect too.
_MAY_WAIT = {
    D05: {
        # `[9, str]` is also lmcache 0.4's END_SESSION; unanswered, the
        # 0.5 scheduler gives that one lookup up (its job did not survive
        # the restart anyway).
        "query_prefetch_status",
        # Refused by every dialect that knows the number.
        "cb_unregister_rope",
        "cb_retrieve_pre_computed",
        "p2p_query_lookup_results",
    },
    # `[14, key, id]`: 0.4.6's COMMIT_RETRIEVE follows its PREPARE_RETRIEVE
    # (which binds); 0.4.7's PREPARE_RETRIEVE waits for the heartbeat that
    # binds its connection only if it is the first message after a restart
    # quicker than one heartbeat interval (it then times out: no hit).
    D046: {"END_SESSION", "REGISTER_KV_CACHE_NON_GPU_CONTEXT", "COMMIT_RETRIEVE"},
    D047: {
        "END_SESSION",
        "REGISTER_KV_CACHE_NON_GPU_CONTEXT",
        "PREPARE_RETRIEVE",
        # Refused by lmcd's 0.4.7 dialect as well (HND CPU caches; pickles).
        "REGISTER_KV_CACHE",
        "COMMIT_STORE",
    },
}


def _all_sequences() -> dict[str, tuple[Dialect, list[list[bytes]]]]:
    seqs = {
        name: (D03 if name.startswith("0.3") else D05, seq)
        for name, seq in SEQUENCES.items()
    }
    return {**seqs, **SEQUENCES_04}


ALL_SEQUENCES = _all_sequences()


def _reply(dialect: Dialect, msg: Message, request: Request, result: object) -> Any:
    try:
        return dialect.encode(msg, request, result)
    except (TypeError, AssertionError) as e:  # not a result of that request
        return type(e).__name__


@pytest.mark.parametrize("name", list(ALL_SEQUENCES))
def test_under_auto_no_client_is_misread_from_any_starting_point(name: str) -> None:
    """With every dialect enabled, a client (re)connecting mid-stream is
    never bound to another dialect's reading nor answered in another
    dialect's shape; a message only its own dialect and one that reads it
    differently could have sent waits, unanswered (`_MAY_WAIT`)."""
    right, seq = ALL_SEQUENCES[name]
    for start in range(len(seq)):
        router = DialectRouter(ALL)
        for frames in seq[start:]:
            msg = parse(frames)
            try:
                routed = router.route(b"c", msg)
            except Ambiguous:
                assert router.dialect_of(b"c") is None
                assert _operation(right, msg) in _MAY_WAIT.get(right, set())
                continue
            bound = router.dialect_of(b"c")
            assert bound is None or bound is right, bound
            _check_release(right, Release(msg, routed))


@pytest.mark.parametrize("name", list(SEQUENCES_04))
def test_a_04_clients_heartbeat_binds_its_connection(name: str) -> None:
    """After a daemon restart a 0.4 client sends PING (with the uid it has
    reached) before anything it waits for: that binds the connection."""
    right, seq = SEQUENCES_04[name]
    pings = [
        f
        for f in seq
        if _operation(right, parse(f)) == "PING" and parse(f).uid != enc(0)
    ]
    if not pings:
        pytest.skip("this flow sent no heartbeat")
    router = DialectRouter(ALL)
    routed = router.route(b"c", parse(pings[0]))
    assert routed.request == Ping()
    assert router.dialect_of(b"c") is right


def test_every_dialect_on_one_router_at_once() -> None:
    """One `--dialect auto` daemon: a 0.3.13, a 0.4.6, a 0.4.7 and a 0.5.6
    client, their messages interleaved, each bound to its own dialect."""
    clients = [
        (b"a", SEQUENCES["0.3.13"], D03),
        (b"b", SEQUENCES_04["0.4.6 worker-a"][1], D046),
        (b"c", SEQUENCES_04["0.4.7 worker-a"][1], D047),
        (b"d", SEQUENCES["0.5.6 C:WorkerAdapter(lmcache_driven)"], D05),
        (b"e", SEQUENCES_04["0.4.6 scheduler"][1], D046),
    ]
    router = DialectRouter(ALL)
    for i in range(max(len(seq) for _, seq, _ in clients)):
        for identity, seq, right in clients:
            if i < len(seq):
                msg = parse(seq[i])
                routed = router.route(identity, msg)
                assert routed.request == _decoded(right, msg)
    assert router.connections() == {
        "lmcache-0.3": 1,
        "lmcache-0.4.4": 0,
        "lmcache-0.4.6": 2,
        "lmcache-0.4.7": 1,
        "lmcache-0.5": 1,
    }
    assert router.ambiguous_messages == 0


_ALL_OPS = sorted(
    {
        *range(0, 40),
        1000,
        *lmcache05.LEGACY_IDS,
    },
    key=str,
)
_payloads_all = sorted(
    {
        f
        for seq in (*SEQUENCES.values(), *(s for _, s in SEQUENCES_04.values()))
        for m in seq
        for f in m[2:]
    },
    key=len,
)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(_ALL_OPS),
    st.integers(0, 3),
    st.lists(st.sampled_from(_payloads_all) | _values.map(enc), max_size=8),
)
def test_what_0_3_or_0_5_reads_is_never_served_otherwise(
    op: int | str, uid: int, payloads: list[bytes]
) -> None:
    """Whatever a 0.3 or 0.5 client could send: if its dialect reads it,
    the `auto` router serves exactly that request with that dialect's
    replies, or leaves it unanswered; never another reading."""
    msg = parse([enc(uid), enc(op), *payloads])
    router = DialectRouter(ALL)
    try:
        routed = router.route(b"x", msg)
    except Ambiguous:
        return
    for dialect in (D03, D05):
        if not dialect.plausible(msg):
            continue
        request = _decoded(dialect, msg)
        if request is None:
            continue
        assert routed.request == request
        assert routed.dialect.failure(msg, request) == dialect.failure(msg, request)
        assert _reply(routed.dialect, msg, request, None) == _reply(
            dialect, msg, request, None
        )


def test_a_fresh_05_client_may_start_with_a_status_query() -> None:
    """`[9, request_id]` is lmcache 0.5's query_prefetch_status and lmcache
    0.4's END_SESSION. A 0.4 scheduler never sends END_SESSION first (its
    first message is GET_CHUNK_SIZE), so at uid 0 it is 0.5's; later it is
    left unanswered rather than answered in the wrong type."""
    router = DialectRouter(ALL)
    routed = router.route(b"x", parse([enc(0), enc(9), enc("req-1")]))
    assert routed.dialect is D05
    assert routed.request == lmcache05.decode_request(
        parse([enc(0), enc(9), enc("req-1")])
    )
    with pytest.raises(Ambiguous):
        router.route(b"y", parse([enc(3), enc(9), enc("req-1")]))


# -- `--dialect auto` with holding (what the daemon does) ------------------------------

AUTO = dialects_for("auto")


def test_auto_detects_every_dialect() -> None:
    assert set(AUTO) == set(ALL)


def _check_release(right: Dialect, r: Release) -> None:
    """`r` is served as `right` serves it: the same request, the same
    failure and reply (with the right dialect, or one that owes the same)."""
    msg, routed = r.message, r.routed
    expected = _decoded(right, msg)
    assert routed.request == expected
    if routed.request is None:
        assert routed.error is not None
        assert routed.error.reply == _owed(right, msg)
    elif routed.dialect is not right:
        assert routed.dialect.failure(msg, expected) == right.failure(msg, expected)
        assert _reply(routed.dialect, msg, expected, None) == _reply(
            right, msg, expected, None
        )


@pytest.mark.parametrize("name", list(ALL_SEQUENCES))
def test_under_auto_every_message_is_served_right_or_held(name: str) -> None:
    """Every captured client, (re)connecting at any point of its stream:
    each message is served as its own dialect reads it, in the order sent,
    or held until its connection binds (then served so); what is still held
    at the end of the stream waits for the heartbeat (`_MAY_WAIT`)."""
    right, seq = ALL_SEQUENCES[name]
    for start in range(len(seq)):
        router = DialectRouter(AUTO)
        order: list[bytes] = []
        held: list[Message] = []
        for i, frames in enumerate(seq[start:]):
            msg = parse(frames)
            out = router.admit(b"c", msg, float(i))
            bound = router.dialect_of(b"c")
            assert bound is None or bound is right, bound
            if not out:
                held.append(msg)
                continue
            assert [r.message for r in out] == [*held, msg]
            held.clear()
            for r in out:
                _check_release(right, r)
                order.append(r.message.uid)
        assert router.held == len(held)
        assert router.ambiguous_messages == 0
        for msg in held[:1]:
            # Only a message another dialect reads otherwise starts a hold.
            assert _operation(right, msg) in _MAY_WAIT.get(right, set())
        # Served in the order sent.
        assert order == [parse(f).uid for f in seq[start:]][: len(order)]


def test_a_05_status_query_after_a_restart_is_served_on_the_next_lookup() -> None:
    """A 0.5 scheduler resuming after a daemon restart polls the status of a
    lookup submitted before it (`[9, id]`, 0.4's END_SESSION): held, and
    served as 0.5's status query, ahead of it, as soon as the scheduler sends
    anything only 0.5 sends (its next lookup), not a heartbeat later."""
    router = DialectRouter(AUTO)
    query = parse([enc(7), enc(9), enc("req-1")])
    assert router.admit(b"s", query, 0.0) == []
    lookup = next(
        parse(f)
        for s in SEQUENCES.values()
        for f in s
        if lmcache05.operation(parse(f)) == "lookup" and D05.plausible(parse(f))
    )
    out = router.admit(b"s", lookup, 0.1)
    assert [r.message for r in out] == [query, lookup]
    assert all(r.routed.dialect is D05 for r in out)
    assert out[0].routed.request == D05.decode(query)
    assert router.dialect_of(b"s") is D05


def test_a_04_end_session_after_a_restart_is_served_on_the_heartbeat() -> None:
    """The same frames from a 0.4.6 client are its END_SESSION: held until
    its heartbeat binds the connection, then served as 0.4.6 reads them."""
    router = DialectRouter(AUTO)
    end = parse([enc(7), enc(9), enc("req-1")])
    assert router.admit(b"w", end, 0.0) == []
    ping = parse([enc(8), enc(17)])  # 0.4.6 PING at a later uid
    out = router.admit(b"w", ping, 3.0)
    assert [r.message for r in out] == [end, ping]
    assert out[0].routed.dialect is D046
    assert out[0].routed.request == D046.decode(end)
    assert out[1].routed.request == Ping()


def _binds(right: Dialect, msg: Message) -> bool:
    router = DialectRouter(AUTO)
    router.admit(b"c", msg, 0.0)
    return router.dialect_of(b"c") is right


# A message of each real client that binds a fresh connection to its dialect.
_BINDERS = {
    right: next(parse(f) for f in seq if _binds(right, parse(f)))
    for right, seq in (
        (D03, SEQUENCES["0.3.13"]),
        (D046, SEQUENCES_04["0.4.6 scheduler"][1]),
        (D047, SEQUENCES_04["0.4.7 worker-a"][1]),
        (D05, SEQUENCES["0.5.6 C:WorkerAdapter(lmcache_driven)"]),
    )
}


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(_ALL_OPS),
    st.integers(0, 3),
    st.lists(st.sampled_from(_payloads_all) | _values.map(enc), max_size=8),
    st.sampled_from(list(_BINDERS)),
)
def test_a_held_message_is_served_as_the_bound_dialect_reads_it(
    op: int | str, uid: int, payloads: list[bytes], right: Dialect
) -> None:
    """Whatever is held is served, once a client's message binds its
    connection, exactly as that client's dialect reads it, first."""
    msg = parse([enc(uid), enc(op), *payloads])
    router = DialectRouter(AUTO)
    try:
        first = router.admit(b"x", msg, 0.0)
    except Ambiguous:
        return
    if first:
        return
    out = router.admit(b"x", _BINDERS[right], 1.0)
    assert [r.message for r in out] == [msg, _BINDERS[right]]
    assert out[0].routed.dialect is right
    _check_release(right, out[0])
