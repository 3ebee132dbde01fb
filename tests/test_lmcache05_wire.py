"""The lmcache 0.5 dialect against frames of the real 0.5.6 client and
replies of lmcache's own 0.5.6 server (wire-vectors)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcd.wire import PayloadError, Unsupported, parse
from lmcd.wire.descriptors import (
    DescriptorError,
    UnsupportedDescriptor,
    decode_descriptor,
)
from lmcd.wire.dialect import Message
from lmcd.wire.lmcache05 import (
    DIALECT,
    KEY_FRAME,
    LEGACY_IDS,
    MAX_TOKENS,
    MAX_WAIT_SECONDS,
    UNSUPPORTED,
    decode_request,
    encode_reply,
    failure_reply,
    operation,
)
from lmcd.wire.registry import dialects_for
from lmcd.wire.types import (
    Capabilities,
    Clear,
    CommitRetrieve,
    CommitStore,
    CopyResult,
    CudaTensorRef,
    EndSession,
    EngineGroup,
    FreeLookupLocks,
    GetChunkSize,
    HostTensorRef,
    LayoutHints,
    Noop,
    Ping,
    PoolInfo,
    PoolSlot,
    PreparedSlots,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    RegisterKVCache,
    RegisterPool,
    ReportBlockAllocation,
    Request,
    RetrieveSpan,
    StartLookup,
    StoreSpan,
    TokenSpan,
    UnregisterKVCache,
    UnregisterPool,
)


def _data(name: str) -> Any:
    here = Path(__file__).resolve().parent
    for root in (here.parent, here.parent.parent):
        p = root / "shared" / "wire-vectors" / name
        if p.exists():
            return json.loads(p.read_text())
    return json.loads((here / "data" / name).read_text())


CAPTURE = _data("lmcache-0.5.6.json")
TRANSCRIPT = _data("lmcache-0.5.6-real-server-transcript.json")
# Client messages only: stream credit/cancel frames and the server's
# end-of-stream are not requests.
VECTORS = [
    v
    for v in CAPTURE["vectors"]
    if v["client_frames_hex"] and "<" not in v["operation"]
]

enc = msgspec.msgpack.encode


def frames(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def message(op: int | str, *payloads: object) -> Message:
    return parse([enc(7), enc(op), *(enc(p) for p in payloads)])


EXPECTED: dict[str, type[Request] | None] = {
    "get_chunk_size": GetChunkSize,
    "noop": Noop,
    "ping": Ping,
    "get_experimental": Capabilities,
    "lookup": StartLookup,
    "query_prefetch_status": QueryLookup,
    "wait_prefetch_status": QueryLookup,
    "free_lookup_locks": FreeLookupLocks,
    "end_session": EndSession,
    "register_kv_cache": RegisterKVCache,
    "unregister_kv_cache": UnregisterKVCache,
    "store": StoreSpan,
    "retrieve": RetrieveSpan,
    "register_kv_cache_engine_driven_context": RegisterPool,
    "unregister_kv_cache_engine_driven_context": UnregisterPool,
    "prepare_store": PrepareStore,
    "commit_store": CommitStore,
    "prepare_retrieve": PrepareRetrieve,
    "commit_retrieve": CommitRetrieve,
    "clear": Clear,
    "report_block_allocation": ReportBlockAllocation,
    # None: refused (see UNSUPPORTED).
    **dict.fromkeys(UNSUPPORTED),
}


def test_operation_table_matches_the_capture() -> None:
    assert CAPTURE["legacy_operation_ids"] == LEGACY_IDS
    contract = CAPTURE["rpc_contract"]
    for name in CAPTURE["operations_without_id_sent_as_string"]:
        assert name in UNSUPPORTED
    for name, spec in contract.items():
        assert name in EXPECTED, name
        count = len(spec["payload_types"])
        # plausible() knows each operation's payload count, by id and name.
        ops: list[int | str] = [name]
        if name in LEGACY_IDS:
            ops.append(LEGACY_IDS[name])
        for op in ops:
            assert DIALECT.plausible(message(op, *([0] * count)))
            assert not DIALECT.plausible(message(op, *([0] * (count + 1))))


def test_the_dialect_is_registered() -> None:
    assert [d.name for d in dialects_for("lmcache-0.5")] == ["lmcache-0.5"]
    assert "lmcache-0.5" in [d.name for d in dialects_for("auto")]


@pytest.mark.parametrize(
    "vector", VECTORS, ids=lambda v: f"{v['source'][:1]}-{v['operation']}"
)
def test_every_captured_message_decodes_to_its_request(vector: dict[str, Any]) -> None:
    msg = parse(frames(vector["client_frames_hex"]))
    name = vector["operation"]
    assert operation(msg) == name
    assert DIALECT.plausible(msg)
    expected = EXPECTED[name]
    if name == "commit_store" and bytes.fromhex(vector["client_frames_hex"][4]) != (
        b"\xc4\x00"
    ):
        # The pickle transfer path: refused unread, with the typed failure.
        with pytest.raises(Unsupported) as refused:
            decode_request(msg)
        assert refused.value.reply == msg.reply(enc(False))
        return
    if expected is None:
        with pytest.raises(Unsupported) as refused:
            decode_request(msg)
        assert refused.value.reply == _refusal(msg, name)
        return
    request = decode_request(msg)
    assert isinstance(request, expected)


def _refusal(msg: Message, name: str) -> list[bytes] | None:
    """What each refused operation gets (see UNSUPPORTED's docstring)."""
    if name in ("p2p_unlock_objects", "subscribe_kv_events"):
        return msg.reply(None)
    if name == "server_module_call":
        return msg.reply(
            enc(
                {
                    "success": False,
                    "payload": b"",
                    "error": "lmcd offers no server modules",
                }
            )
        )
    return None


def _result(name: str, value: Any) -> object:
    """The neutral result that a captured reply value encodes."""
    if name in ("store", "retrieve"):
        return CopyResult(ok=value[1], event_handle=value[0] or None)
    if name == "get_experimental":
        return list(value)
    if name == "register_kv_cache_engine_driven_context":
        return PoolInfo(**value)
    if name == "prepare_store":
        context = value["context"]
        return PreparedSlots(
            tuple(_slot(s) for s in context["slots"]),
            tuple(context["chunk_indices"]),
        )
    if name == "prepare_retrieve":
        assert value["data"] == b""
        slots = value["context"].get("slots", [])
        return PreparedSlots(tuple(_slot(s) for s in slots), ok=value["success"])
    return value


def _slot(s: dict[str, Any]) -> PoolSlot:
    return PoolSlot(s["offset"], s["length"], tuple(s["shape"]), s["dtype"])


# Captured replies that lmcd never sends: the pickle transfer path's
# `{"context": {}}` (lmcd always offers its pool, so its prepare_store
# always names slots) and the refused operations (tested above).
def _reproducible(name: str, asked: list[bytes], reply: list[bytes]) -> bool:
    if EXPECTED[name] is None:
        return False
    if name == "commit_store":
        return asked[4] == b"\xc4\x00"
    if name == "prepare_store":
        return "slots" in msgspec.msgpack.decode(reply[2])["context"]
    if name == "prepare_retrieve":
        return msgspec.msgpack.decode(reply[2])["data"] == b""
    return True


@pytest.mark.parametrize(
    "vector", VECTORS, ids=lambda v: f"{v['source'][:1]}-{v['operation']}"
)
def test_captured_replies_encode_byte_exact(vector: dict[str, Any]) -> None:
    name = vector["operation"]
    reply = frames(vector["reply_frames_hex"])
    asked = frames(vector["client_frames_hex"])
    if not _reproducible(name, asked, reply):
        pytest.skip("a reply lmcd never gives (pickle path or refused operation)")
    msg = parse(asked)
    request = decode_request(msg)
    value = msgspec.msgpack.decode(reply[2]) if len(reply) > 2 else None
    assert encode_reply(msg, request, _result(name, value)) == reply


def _transcript_pairs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    pairs = []
    for run, entries in TRANSCRIPT["runs"].items():
        asked: dict[tuple[str, str], dict[str, Any]] = {}
        for e in entries:
            key = (e["client"], e["frames_hex"][0])
            if e["dir"] == "c2s":
                asked[key] = e
            else:
                pairs.append((run, asked.pop(key), e))
        assert not asked, f"unanswered requests in {run}"
    return pairs


PAIRS = _transcript_pairs()


@pytest.mark.parametrize(
    ("run", "request_entry", "reply_entry"),
    PAIRS,
    ids=[f"{r.split()[0]}-{q['client']}-{q['operation']}" for r, q, _ in PAIRS],
)
def test_real_server_replies_are_reproduced_byte_exact(
    run: str, request_entry: dict[str, Any], reply_entry: dict[str, Any]
) -> None:
    name = request_entry["operation"]
    msg = parse(frames(request_entry["frames_hex"]))
    reply = frames(reply_entry["frames_hex"])
    if name == "commit_store" and "pickle" in run:
        with pytest.raises(Unsupported) as refused:
            decode_request(msg)
        assert refused.value.reply == msg.reply(enc(False))
        return
    request = decode_request(msg)
    if not _reproducible(name, frames(request_entry["frames_hex"]), reply):
        pytest.skip("the pickle transfer path, which lmcd never offers")
    value = msgspec.msgpack.decode(reply[2]) if len(reply) > 2 else None
    assert encode_reply(msg, request, _result(name, value)) == reply


def test_transcript_contents() -> None:
    run = TRANSCRIPT["runs"]["lmcache_driven (CPU SHM descriptors)"]
    register = next(e for e in run if e["operation"] == "register_kv_cache")
    request = decode_request(parse(frames(register["frames_hex"])))
    assert isinstance(request, RegisterKVCache)
    assert request.refresh
    assert request.model_name == "rt-model-lmcache_driven"
    assert request.world_size == 1
    assert request.engine == "vllm"
    assert request.hints == LayoutHints(kv_layout="NHD")
    assert request.groups == (EngineGroup(0, (0, 1), 16, None),)
    assert request.layers == (
        HostTensorRef(
            "/dev/shm/lmcache_kv_24966_0",
            0,
            (2, 8, 16, 2, 8),
            "bfloat16",
            (2048, 256, 16, 8, 1),
        ),
        HostTensorRef(
            "/dev/shm/lmcache_kv_24966_1",
            0,
            (2, 8, 16, 2, 8),
            "bfloat16",
            (2048, 256, 16, 8, 1),
        ),
    )
    store = next(e for e in run if e["operation"] == "store")
    request = decode_request(parse(frames(store["frames_hex"])))
    assert request == StoreSpan(
        TokenSpan(
            "rt-model-lmcache_driven",
            1,
            0,
            tuple(range(1000, 1040)),
            0,
            32,
            "req-store",
            "",
            1,
        ),
        4158238690739642257,
        ((2, 5),),
        b"stub_ipc_handle",
    )
    retrieve = next(e for e in run if e["operation"] == "retrieve")
    request = decode_request(parse(frames(retrieve["frames_hex"])))
    assert isinstance(request, RetrieveSpan)
    assert request.skip_tokens == 0
    assert request.block_ids == ((6, 1),)


def test_captured_register_with_cuda_descriptors() -> None:
    v = next(v for v in VECTORS if v["operation"] == "register_kv_cache")
    request = decode_request(parse(frames(v["client_frames_hex"])))
    assert isinstance(request, RegisterKVCache)
    first = request.layers[0]
    assert isinstance(first, CudaTensorRef)
    assert first.device is None
    assert first.device_uuid == "GPU-00000000-0000-0000-0000-000000000000"
    assert first.shape == (2, 64, 16, 8, 128)
    assert first.stride == (1048576, 16384, 1024, 128, 1)
    assert first.storage_offset == 0
    assert len(first.handle) == 8
    assert first.handle[2] == 4194304


def test_captured_pool_and_allocation_payloads() -> None:
    by_op = {v["operation"]: v for v in VECTORS if v["source"].startswith("A")}
    pool = decode_request(
        parse(
            frames(
                by_op["register_kv_cache_engine_driven_context"]["client_frames_hex"]
            )
        )
    )
    assert pool == RegisterPool(
        4244, "Qwen/Qwen3-14B", 2, 16, 2, 1024, "bfloat16", False, 16
    )
    report = decode_request(
        parse(frames(by_op["report_block_allocation"]["client_frames_hex"]))
    )
    assert report == ReportBlockAllocation(4245, "Qwen/Qwen3-14B", 1)


# -- replies and failures ---------------------------------------------------------


def _span_payload(**changes: Any) -> dict[str, Any]:
    key: dict[str, Any] = {
        "model_name": "m",
        "world_size": 2,
        "worker_id": 1,
        "token_ids": list(range(64)),
        "start": 0,
        "end": 32,
        "request_id": "r",
        "cache_salt": "",
        "request_configs": None,
        "num_kv_readers": 1,
    }
    key.update(changes)
    return {k: v for k, v in key.items() if v is not _DROP}


_DROP = object()

FAILURES: list[tuple[str, tuple[object, ...], object]] = [
    ("store", (_span_payload(), 1, [[1, 2]], b"h"), [b"", False]),
    ("retrieve", (_span_payload(), 1, [[1, 2]], b"h", 0), [b"", False]),
    ("query_prefetch_status", ("r",), 0),
    ("wait_prefetch_status", ("r", 1.0), 0),
    ("commit_store", (_span_payload(), 1, b""), False),
    ("commit_retrieve", (_span_payload(), 1), False),
    ("ping", (None,), False),
    ("noop", (), "ERROR"),
    ("get_experimental", (), []),
    (
        "register_kv_cache_engine_driven_context",
        ({},),
        {"shm_name": "", "pool_size": 0},
    ),
    (
        "prepare_store",
        (_span_payload(), 1),
        {"context": {"slots": [], "chunk_indices": []}},
    ),
    (
        "prepare_retrieve",
        (_span_payload(), 1),
        {"success": False, "data": b"", "context": {}},
    ),
]


@pytest.mark.parametrize(("name", "payloads", "value"), FAILURES)
def test_typed_failure_replies(
    name: str, payloads: tuple[object, ...], value: object
) -> None:
    for op in (name, LEGACY_IDS[name]):
        msg = message(op, *payloads)
        assert failure_reply(msg) == msg.reply(enc(value))
        assert DIALECT.failure(msg, None) == msg.reply(enc(value))


@pytest.mark.parametrize(
    "name",
    [
        "register_kv_cache",
        "unregister_kv_cache",
        "lookup",
        "free_lookup_locks",
        "end_session",
        "unregister_kv_cache_engine_driven_context",
        "clear",
        "report_block_allocation",
    ],
)
def test_operations_without_a_response_fail_with_a_bare_reply(name: str) -> None:
    msg = message(LEGACY_IDS[name])
    assert failure_reply(msg) == [msg.uid, msg.type_frame]


def test_no_chunk_size_rather_than_a_wrong_one() -> None:
    assert failure_reply(message(21)) is None
    assert failure_reply(message(11)) is None  # retired id: unknown


def test_replies_of_each_result() -> None:
    span = _span_payload()
    cases: list[tuple[Message, object, object]] = [
        (message(6, span, 1, [[1]], b"h"), CopyResult(True), [b"", True]),
        (message(6, span, 1, [[1]], b"h"), CopyResult(False, b"ev"), [b"ev", False]),
        (message(9, "r"), 3, 3),
        (message(9, "r"), 0, 0),
        (message(10, "r", 2.5), None, None),
        (message(21), 256, 256),
        (message(22, 5), True, True),
        (message(24), "OK", "OK"),
        (message(32), [], []),
        (message(32), ("kv_event_stream",), ["kv_event_stream"]),
        (
            message(14, {}),
            PoolInfo("lmcd_pool", 1 << 30),
            {"shm_name": "lmcd_pool", "pool_size": 1 << 30},
        ),
        (
            message(16, span, 1),
            PreparedSlots(()),
            {"context": {"slots": [], "chunk_indices": []}},
        ),
        (
            message(18, span, 1),
            PreparedSlots((), ok=False),
            {"success": False, "data": b"", "context": {}},
        ),
        (message(17, span, 1, b""), True, True),
        (message(19, span, 1), True, True),
        (message(8, span, 1), None, None),
        (message(1), None, None),
        (message(20, False), None, None),
    ]
    for msg, result, value in cases:
        expected = msg.reply(None if value is None else enc(value))
        assert encode_reply(msg, Noop(), result) == expected, (msg.op, result)


@pytest.mark.parametrize(
    ("op", "result"),
    [
        (6, True),
        (9, True),  # a bool is not a chunk count
        (9, "3"),
        (21, None),
        (22, 1),
        (24, 3),
        (32, "kv_event_stream"),
        (14, {"shm_name": "", "pool_size": 0}),
        (16, PoolInfo("x", 1)),
        (18, None),
        (17, 1),
    ],
)
def test_a_result_of_the_wrong_kind_is_a_bug_not_a_reply(
    op: int, result: object
) -> None:
    msg = parse([enc(1), enc(op)])
    with pytest.raises(TypeError):
        encode_reply(msg, Noop(), result)


# -- bad input ------------------------------------------------------------------------


def _payload_error(msg: Message) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        decode_request(msg)
    return caught.value


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"num_kv_readers": 0}, "num_kv_readers"),
        ({"num_kv_readers": _DROP}, "num_kv_readers"),
        ({"num_kv_readers": -1}, "num_kv_readers"),
        ({"cache_salt": "a/b"}, "cache_salt"),
        ({"cache_salt": "a@b"}, "cache_salt"),
        ({"cache_salt": "a\\b"}, "cache_salt"),
        ({"cache_salt": "a\x00b"}, "cache_salt"),
        ({"cache_salt": "x" * 129}, "cache_salt"),
        ({"worker_id": 2}, "worker_id"),
        ({"world_size": 0}, "world_size"),
        ({"world_size": 1025, "worker_id": None}, "world_size"),
        ({"end": 65}, "past"),
        ({"start": 40, "end": 32}, "after end"),
        ({"token_ids": [-1, 2]}, "token_ids"),
        ({"token_ids": [1 << 32]}, "token_ids"),
        ({"token_ids": "abc"}, "token_ids"),
        ({"chunk_hash": b"x"}, "chunk_hash"),  # a key of another release line
        ({"request_id": _DROP}, "request_id"),
        ({"request_configs": [1, 2]}, "request_configs"),
        ({"request_configs": {f"k{i}": i for i in range(65)}}, "request_configs"),
        ({"request_configs": {"k": "x" * 70_000}}, "request_configs"),
    ],
)
def test_bad_keys_get_the_failure_reply(changes: dict[str, Any], error: str) -> None:
    msg = message("store", _span_payload(**changes), 1, [[1]], b"h")
    e = _payload_error(msg)
    assert error in str(e)
    assert e.reply == msg.reply(enc([b"", False]))


def test_request_configs_are_accepted_and_ignored() -> None:
    configs = {"lmcache.tag.user": "alice", "nested": {"a": [1, 2, {"b": None}]}}
    request = decode_request(
        message("lookup", _span_payload(request_configs=configs, worker_id=None), 1)
    )
    assert isinstance(request, StartLookup)
    assert request.span.worker_id is None


def test_an_empty_free_range_is_a_no_op_not_an_error() -> None:
    request = decode_request(message(12, _span_payload(start=48, end=32), 1))
    assert isinstance(request, FreeLookupLocks)
    assert (request.span.start, request.span.end) == (32, 32)


def test_salt_and_readers_are_kept() -> None:
    request = decode_request(
        message(8, _span_payload(cache_salt="tenant-7", num_kv_readers=4), 2)
    )
    assert isinstance(request, StartLookup)
    assert (request.span.salt, request.span.readers) == ("tenant-7", 4)


def test_a_1m_token_prompt_decodes() -> None:
    tokens = list(range(150_000)) * 7  # 1.05M tokens, most of them 3-5 bytes
    msg = message("store", _span_payload(token_ids=tokens, end=1 << 20), 1, [[1]], b"")
    assert len(msg.payloads[0]) < KEY_FRAME
    request = decode_request(msg)
    assert isinstance(request, StoreSpan)
    assert len(request.span.token_ids) == len(tokens)


def test_oversized_token_lists_are_refused() -> None:
    msg = message("lookup", _span_payload(token_ids=[1] * (MAX_TOKENS + 1)), 1)
    assert "token_ids" in str(_payload_error(msg))
    # A frame over the limit is refused by its size, before decoding.
    big = parse([enc(1), enc(8), b"\xc0" * (KEY_FRAME + 1), enc(1)])
    e = _payload_error(big)
    assert "over" in str(e)
    assert e.reply == big.reply(None)


def test_every_other_frame_is_tightly_bounded() -> None:
    msg = parse([enc(1), enc(9), enc("r" * 70_000)])
    e = _payload_error(msg)
    assert "over" in str(e)
    assert e.reply == msg.reply(enc(0))


@pytest.mark.parametrize(
    "blocks",
    [[[-1]], [[1, 2], [3, -5]], [1, 2], [[1.5]], [[1 << 63]]],
)
def test_bad_block_ids(blocks: object) -> None:
    msg = message(7, _span_payload(), 1, blocks, b"", 0)
    assert _payload_error(msg).reply == msg.reply(enc([b"", False]))


def test_too_many_block_ids() -> None:
    msg = message(6, _span_payload(), 1, [[1] * 600_000, [2] * 600_000], b"")
    assert "block ids" in str(_payload_error(msg))


@pytest.mark.parametrize("skip", [-1, 33, "0"])
def test_bad_skip(skip: object) -> None:
    msg = message(7, _span_payload(), 1, [[1]], b"", skip)
    assert _payload_error(msg).reply == msg.reply(enc([b"", False]))


@pytest.mark.parametrize("timeout", [-1.0, math.nan, math.inf, "5"])
def test_bad_wait_timeouts(timeout: object) -> None:
    msg = message("wait_prefetch_status", "r", timeout)
    assert _payload_error(msg).reply == msg.reply(enc(0))


def test_long_waits_are_cut() -> None:
    request = decode_request(message(10, "r", 1e9))
    assert request == QueryLookup("r", wait=MAX_WAIT_SECONDS)
    assert decode_request(message(10, "r", 0)) == QueryLookup("r", wait=0.0)


@pytest.mark.parametrize(
    ("op", "payloads"),
    [
        (20, (1,)),  # clear(force) is a bool
        (22, ("x",)),
        (22, (1 << 64 - 1,)),
        (2, ("x",)),
        (14, ({"instance_id": 1},)),
        (
            14,
            (
                {
                    "instance_id": 1,
                    "model_name": "m",
                    "world_size": 1,
                    "block_size": 16,
                    "num_layers": 2,
                    "hidden_dim_size": 16,
                    "dtype_str": "complex64",
                    "use_mla": False,
                    "num_physical_slots": None,
                },
            ),
        ),
        (23, (1, "m", [{"req_id": "r", "new_block_ids": [1]}])),
    ],
)
def test_bad_small_payloads(op: int, payloads: tuple[object, ...]) -> None:
    msg = message(op, *payloads)
    assert _payload_error(msg).reply == failure_reply(msg)


@pytest.mark.parametrize("op", [0, 11, 34, 1000, -1, "no_such_op", "11", ""])
def test_unknown_operations_are_left_unanswered(op: int | str) -> None:
    msg = message(op)
    assert not DIALECT.plausible(msg)
    assert operation(msg) is None
    assert _payload_error(msg).reply is None
    assert DIALECT.failure(msg, None) is None


def test_wrong_payload_count_gets_the_typed_failure() -> None:
    msg = message(6, _span_payload(), 1, [[1]])
    assert not DIALECT.plausible(msg)
    assert _payload_error(msg).reply == msg.reply(enc([b"", False]))
    msg = message("cb_unified_lookup", 1)
    assert _payload_error(msg).reply is None


def test_legacy_operations_are_also_taken_by_name() -> None:
    by_id = decode_request(message(9, "r"))
    by_name = decode_request(message("query_prefetch_status", "r"))
    assert by_id == by_name == QueryLookup("r")
    msg = message("query_prefetch_status", "r")
    assert encode_reply(msg, by_name, 2) == [
        msg.uid,
        enc("query_prefetch_status"),
        enc(2),
    ]


def test_commit_store_data_is_refused_unread() -> None:
    for data in (b"\x80\x04anything", b"x" * 100, b"x" * 10_000_000):
        msg = message(17, _span_payload(), 1, data)
        with pytest.raises(Unsupported) as refused:
            decode_request(msg)
        assert refused.value.reply == msg.reply(enc(False))
    # Only an empty bin commits; anything else that is not a bin is malformed.
    assert isinstance(decode_request(message(17, _span_payload(), 1, b"")), CommitStore)
    msg = parse([enc(1), enc(17), enc(_span_payload()), enc(1), b"\xc5\x00\x00"])
    assert isinstance(decode_request(msg), CommitStore)
    msg = message(17, _span_payload(), 1, "text")
    assert _payload_error(msg).reply == msg.reply(enc(False))


def test_nesting_bombs_are_refused() -> None:
    bomb = b"\x91" * 100_000 + b"\x00"
    key = enc(_span_payload(request_configs={"k": 1}))
    # Replace the value 1 of request_configs' "k" with the bomb.
    assert key.count(b"\xa1k\x01") == 1
    bombed = key.replace(b"\xa1k\x01", b"\xa1k" + bomb)
    for msg in (
        parse([enc(1), enc(8), bombed, enc(1)]),
        parse([enc(1), enc(23), enc(1), enc("m"), bomb]),
        parse([enc(1), enc(1), enc(1), bomb, *(enc(0) for _ in range(5))]),
    ):
        e = _payload_error(msg)
        assert e.reply == failure_reply(msg)


# -- register_kv_cache and its descriptors ------------------------------------------


def _meta(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dtype": "bfloat16",
        "shape": [2, 8, 16, 2, 8],
        "stride": [2048, 256, 16, 8, 1],
        "storage_offset": 0,
        "device_uuid": "cpu",
    }
    meta.update(changes)
    return meta


def _shm(**changes: Any) -> dict[str, Any]:
    desc: dict[str, Any] = {
        "type": "cpu_shm",
        "shm_name": "/lmcache_kv_1_0",
        "nbytes": 8192,
        "version": 1,
        "metadata": _meta(),
    }
    desc.update(changes)
    return desc


def _cuda(**changes: Any) -> dict[str, Any]:
    desc: dict[str, Any] = {
        "type": "cuda",
        "handle": [0, b"\x11" * 64, 8192, 0, b"/torch_1", 8, b"\x22" * 64, True],
        "version": 1,
        "metadata": _meta(device_uuid="GPU-1234"),
    }
    desc.update(changes)
    return desc


def _register(
    descs: list[dict[str, Any]], groups: list[dict[str, Any]] | None = None
) -> Message:
    exts = [msgspec.msgpack.Ext(1, enc(d)) for d in descs]
    return message(
        1,
        7,
        exts,
        "m",
        1,
        "vllm",
        {"kv_layout": "HND", "num_kv_heads": 2},
        groups if groups is not None else [],
    )


def test_descriptor_kinds() -> None:
    assert decode_descriptor(
        enc(_shm(metadata=_meta(storage_offset=4), nbytes=8200))
    ) == (
        HostTensorRef(
            "/dev/shm/lmcache_kv_1_0",
            8,
            (2, 8, 16, 2, 8),
            "bfloat16",
            (2048, 256, 16, 8, 1),
        )
    )
    ref = decode_descriptor(enc(_cuda()))
    assert isinstance(ref, CudaTensorRef)
    assert ref.handle[2] == 8192
    request = decode_request(_register([_shm(), _shm(shm_name="lmcache_kv_1_1")]))
    assert isinstance(request, RegisterKVCache)
    assert request.hints == LayoutHints(kv_layout="HND", num_kv_heads=2)
    assert request.groups == ()
    assert request.refresh


@pytest.mark.parametrize("kind", ["cuda_raw", "cuda_vmm", "musa", "npu"])
def test_unmapped_descriptor_kinds_are_refused(kind: str) -> None:
    desc = {"type": kind, "version": 1, "metadata": _meta(), "whatever": [1, 2]}
    with pytest.raises(UnsupportedDescriptor) as e:
        decode_descriptor(enc(desc))
    assert e.value.kind == kind
    msg = _register([_shm(), desc])
    with pytest.raises(Unsupported) as refused:
        decode_request(msg)
    assert kind in refused.value.operation
    assert refused.value.reply == msg.reply(None)


def test_pickled_handles_are_never_loaded() -> None:
    import pickle

    with pytest.raises(UnsupportedDescriptor):
        decode_descriptor(pickle.dumps({"handle": 1}))


@pytest.mark.parametrize(
    "desc",
    [
        _shm(nbytes=8191),  # view past the segment
        _shm(metadata=_meta(storage_offset=1)),
        _shm(metadata=_meta(dtype="complex64")),
        _shm(metadata=_meta(dtype="not_a_dtype")),
        _shm(metadata=_meta(stride=[1, 1, 1, 1])),
        _shm(metadata=_meta(shape=[], stride=[])),
        _shm(metadata=_meta(shape=[0, 4], stride=[4, 1])),
        _shm(metadata=_meta(shape=[1] * 9, stride=[1] * 9)),
        _shm(
            metadata=_meta(shape=[1 << 30, 1 << 30], stride=[1 << 30, 1]),
            nbytes=1 << 62,
        ),
        _shm(metadata=_meta(extra=1)),
        _shm(shm_name="/a/b"),
        _shm(shm_name="/.."),
        _shm(shm_name="/"),
        _shm(shm_name="/x\x00y"),
        _shm(shm_name="/" + "x" * 300),
        _shm(version=2),
        _shm(extra="field"),
        {**_shm(), "nbytes": -1},
        _cuda(handle=[0, b"x", 8191, 0, None, 0, None, False]),  # storage too small
        _cuda(handle=[0, "x", 8192, 0, None, 0, None, False]),
        _cuda(handle=[0, b"x", 8192, 0, None, 0, None]),
        _cuda(handle=[5000, b"x", 8192, 0, None, 0, None, False]),
        _cuda(handle=[0, b"x" * 300, 8192, 0, None, 0, None, False]),
        _cuda(metadata=_meta(device_uuid="")),
        {"type": "other", "version": 1},
        {"version": 1},
        [1, 2, 3],
    ],
)
def test_descriptors_outside_the_rules_are_refused(desc: object) -> None:
    with pytest.raises(DescriptorError) as e:
        decode_descriptor(enc(desc))
    assert not isinstance(e.value, UnsupportedDescriptor)
    msg = _register([_shm(), desc])  # type: ignore[list-item]
    assert _payload_error(msg).reply == msg.reply(None)


@pytest.mark.parametrize(
    "groups",
    [
        [{"engine_group_id": 0, "layer_indices": [0, 2]}],  # only 2 layers
        [
            {"engine_group_id": 0, "layer_indices": [0]},
            {"engine_group_id": 1, "layer_indices": [0]},
        ],
        [{"engine_group_id": -1, "layer_indices": [0]}],
        [{"engine_group_id": 0, "sw_size_tokens": 0}],
        [{"engine_group_id": 0, "unknown": 1}],
    ],
)
def test_bad_engine_groups(groups: list[dict[str, Any]]) -> None:
    msg = _register([_shm(), _shm()], groups)
    assert _payload_error(msg).reply == msg.reply(None)


def test_engine_groups() -> None:
    request = decode_request(
        _register(
            [_shm(), _shm(), _shm()],
            [
                {"engine_group_id": 0, "layer_indices": [0, 2], "tokens_per_block": 16},
                {
                    "engine_group_id": 1,
                    "layer_indices": [1],
                    "tokens_per_block": 16,
                    "sw_size_tokens": 4096,
                    "extra_object_group_tag": 0,
                    "recurrent_state": True,
                },
            ],
        )
    )
    assert isinstance(request, RegisterKVCache)
    assert request.groups == (
        EngineGroup(0, (0, 2), 16),
        EngineGroup(1, (1,), 16, 4096, recurrent=True),
    )


def test_bad_register_payloads() -> None:
    base = _register([_shm()])
    for index, bad in [
        (2, 5),
        (3, 0),
        (4, "vllm2"),
        (5, {"kv_layout": "XYZ"}),
        (5, {"x": 1}),
    ]:
        payloads = list(base.payloads)
        payloads[index] = enc(bad)
        msg = parse([base.uid, base.type_frame, *payloads])
        assert _payload_error(msg).reply == msg.reply(None), (index, bad)
    msg = message(1, 7, [], "m", 1, "vllm", {}, [])
    assert _payload_error(msg).reply == msg.reply(None)
    msg = message(1, 7, [msgspec.msgpack.Ext(2, enc(_shm()))], "m", 1, "vllm", {}, [])
    assert _payload_error(msg).reply == msg.reply(None)


# -- properties ------------------------------------------------------------------------

_KEY_FIELDS = [*_span_payload(), "chunk_hash", "x"]

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(_KEY_FIELDS) | st.text(max_size=5), inner, max_size=6
        )
    ),
    max_leaves=25,
)

_real_payloads = sorted(
    {bytes.fromhex(h) for v in VECTORS for h in v["client_frames_hex"][2:]}, key=len
)


def _mutated(data: bytes, cut: int, flip: int) -> bytes:
    if not data:
        return data
    i = flip % len(data)
    return (
        data[: max(cut, 1)]
        if cut < len(data) // 2
        else (data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :])
    )


_payload = (
    _values.map(enc)
    | st.binary(max_size=40)
    | st.builds(
        _mutated,
        st.sampled_from(_real_payloads),
        st.integers(0, 400),
        st.integers(0, 10_000),
    )
    | st.sampled_from(_real_payloads)
)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from([*range(0, 36), *LEGACY_IDS, *UNSUPPORTED, "nope"]),
    st.lists(_payload, max_size=8),
)
def test_any_message_decodes_or_is_refused(
    op: int | str, payloads: list[bytes]
) -> None:
    """No payload makes the dialect raise anything but PayloadError or
    Unsupported, and every reply it owes echoes uid and type."""
    msg = parse([enc(3), enc(op), *payloads])
    try:
        request = decode_request(msg)
    except (PayloadError, Unsupported) as e:
        reply = e.reply
    else:
        assert DIALECT.plausible(msg)
        reply = failure_reply(msg)
        if isinstance(request, StoreSpan | RetrieveSpan | StartLookup):
            span = request.span
            assert 0 <= span.start <= span.end <= len(span.token_ids)
            assert span.readers >= 1
    if reply is not None:
        assert reply[:2] == [msg.uid, msg.type_frame]
        assert len(reply) <= 3
