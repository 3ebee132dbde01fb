"""The codec against frames captured from the real client (wire-vectors)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcd.errors import ProtocolError
from lmcd.wire import PayloadError, parse
from lmcd.wire.lmcache03 import RequestType, decode_request, encode_reply
from lmcd.wire.types import (
    CacheKey,
    Clear,
    CopyResult,
    CudaTensorRef,
    GetChunkSize,
    HostTensorRef,
    Lookup,
    Noop,
    RegisterKVCache,
    Retrieve,
    Store,
    UnregisterKVCache,
)
from lmcd.wire.unpickle import load_cuda_ipc_wrapper


def _vectors_path() -> Path:
    here = Path(__file__).resolve().parent
    for root in (here.parent, here.parent.parent):
        p = root / "shared" / "wire-vectors" / "lmcache-0.3.13.json"
        if p.exists():
            return p
    return here / "data" / "lmcache-0.3.13.json"


VECTORS = json.loads(_vectors_path().read_text())["vectors"]


def frames(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def test_request_type_values_match_the_capture() -> None:
    types = json.loads(_vectors_path().read_text())["request_types"]
    assert {t.name: t.value for t in RequestType if t.name in types} == types


EXPECTED_TYPES = {
    "GET_CHUNK_SIZE": GetChunkSize,
    "NOOP": Noop,
    "LOOKUP": Lookup,
    "STORE": Store,
    "RETRIEVE": Retrieve,
    "CLEAR": Clear,
    "REGISTER_KV_CACHE": RegisterKVCache,
    "UNREGISTER_KV_CACHE": UnregisterKVCache,
}


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["request"])
def test_vectors_decode_and_replies_encode_byte_exact(vector: dict[str, Any]) -> None:
    header = parse(frames(vector["client_frames_hex"]))
    request = decode_request(header)
    assert isinstance(request, EXPECTED_TYPES[vector["request"]])
    reply = frames(vector["reply_frames_hex"])
    value = msgspec.msgpack.decode(reply[2]) if len(reply) > 2 else None
    assert encode_reply(header, request, _result(request, value)) == reply


def _result(request: object, value: Any) -> object:
    """The neutral result that the captured reply value encodes."""
    if isinstance(request, Lookup):
        return sum(value)
    if isinstance(request, Store):
        return CopyResult(value[1], value[0])
    if isinstance(request, Retrieve):
        return CopyResult(all(value[1]), value[0], sum(value[1]))
    return value


def test_lookup_vector_contents() -> None:
    v = next(v for v in VECTORS if v["request"] == "LOOKUP")
    request = decode_request(parse(frames(v["client_frames_hex"])))
    assert isinstance(request, Lookup)
    assert request.lock is True
    assert request.keys[0] == CacheKey("Qwen/Qwen3-14B", 2, None, bytes(range(32)))


def test_register_vectors_decode_both_wrapper_forms() -> None:
    refs = []
    for v in VECTORS:
        if v["request"] == "REGISTER_KV_CACHE":
            request = decode_request(parse(frames(v["client_frames_hex"])))
            assert isinstance(request, RegisterKVCache)
            refs.extend(request.layers)
    assert all(isinstance(r, CudaTensorRef) for r in refs)
    cuda_refs = [r for r in refs if isinstance(r, CudaTensorRef)]
    assert {r.dtype for r in cuda_refs} <= {"bfloat16", "float16"}
    assert any(r.device_uuid is not None for r in cuda_refs)
    assert any(r.device is not None for r in cuda_refs)
    assert cuda_refs[0].shape == (2, 1000, 16, 8, 128)


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch /tmp/lmcd-pwned",))


def test_unpickler_refuses_code_execution() -> None:
    with pytest.raises(ProtocolError, match=r"not allowed"):
        load_cuda_ipc_wrapper(pickle.dumps(_Evil()))
    assert not os.path.exists("/tmp/lmcd-pwned")


@pytest.mark.parametrize(
    "obj",
    [
        {"handle": 1},
        [1, 2, 3],
        "just a string",
    ],
)
def test_unpickler_refuses_other_objects(obj: object) -> None:
    with pytest.raises(ProtocolError):
        load_cuda_ipc_wrapper(pickle.dumps(obj))


def test_unpickler_refuses_garbage() -> None:
    with pytest.raises(ProtocolError):
        load_cuda_ipc_wrapper(b"\x80\x04garbage")


def _enc(value: object) -> bytes:
    return msgspec.msgpack.encode(value)


KEY = {"model_name": "m", "world_size": 1, "worker_id": 0, "chunk_hash": b"h"}


@pytest.mark.parametrize(
    ("name", "message", "error"),
    [
        ("no frames", [], "frames"),
        ("one frame", [_enc(1)], "frames"),
        ("uid not an int", [b"\xa1x", _enc(8)], "undecodable"),
        ("type not an int", [_enc(1), b"\xc1"], "undecodable"),
    ],
)
def test_unanswerable_headers(name: str, message: list[bytes], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        parse(message)


def _payload_error(message: list[bytes]) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decode_request(parse(message))
    return info.value


def _reply_value(err: PayloadError) -> object:
    """The response value of the failure reply (None: no response frame)."""
    assert err.reply is not None
    return msgspec.msgpack.decode(err.reply[2]) if len(err.reply) > 2 else None


def test_unknown_type_is_answered_without_a_value() -> None:
    err = _payload_error([_enc(1), _enc(77)])
    assert _reply_value(err) is None


def test_wrong_payload_count_gets_the_typed_failure() -> None:
    err = _payload_error([_enc(1), _enc(5), _enc([KEY, KEY])])
    assert _reply_value(err) == [False, False]


def test_bad_store_payload_echoes_the_client_handle() -> None:
    err = _payload_error(
        [_enc(1), _enc(3), _enc([KEY]), _enc("x"), _enc([0]), _enc(b"ev")]
    )
    assert _reply_value(err) == [b"ev", False]


def test_bad_retrieve_payload_answers_false_per_key() -> None:
    err = _payload_error(
        [_enc(1), _enc(4), _enc([KEY, KEY]), _enc(1), _enc("nope"), _enc(b"ev")]
    )
    assert _reply_value(err) == [b"ev", [False, False]]


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ({**KEY, "world_size": 10**6}, "world_size"),
        ({**KEY, "world_size": 0}, "world_size"),
        ({**KEY, "worker_id": 5}, "worker_id"),
        ({**KEY, "chunk_hash": "text"}, "bytes"),
        ({**KEY, "extra": 1}, "unknown field"),
    ],
)
def test_bad_keys_are_refused(key: dict[str, object], error: str) -> None:
    err = _payload_error([_enc(1), _enc(5), _enc([key]), _enc(True)])
    assert error in str(err)
    assert _reply_value(err) == [False]


def test_nil_worker_keys_expand_within_bounds() -> None:
    keys = [{**KEY, "worker_id": None, "world_size": 1024}] * 2000
    err = _payload_error([_enc(1), _enc(5), _enc(keys), _enc(True)])
    assert "expand" in str(err)


def test_oversized_frame_is_refused_before_decoding() -> None:
    huge = _enc(list(range(2_000_000)))
    err = _payload_error([_enc(1), _enc(3), _enc([KEY]), _enc(1), huge, _enc(b"e")])
    assert "over" in str(err)
    assert _reply_value(err) == [b"e", False]


def test_host_tensor_extension() -> None:
    ext = msgspec.msgpack.Ext(
        2,
        _enc(
            {"path": "/dev/shm/x", "offset": 0, "shape": [4, 16, 8], "dtype": "float16"}
        ),
    )
    request = decode_request(parse([_enc(1), _enc(1), _enc(7), _enc([ext])]))
    assert isinstance(request, RegisterKVCache)
    assert request.layers == (HostTensorRef("/dev/shm/x", 0, (4, 16, 8), "float16"),)


@pytest.mark.parametrize(
    "data",
    [
        {"path": "/dev/shm/x", "offset": 0, "shape": [4], "dtype": "complex64"},
        {"path": "/dev/shm/x", "offset": -1, "shape": [4], "dtype": "float16"},
        {"path": "/dev/shm/x", "offset": 0, "shape": [], "dtype": "float16"},
        {"path": "/dev/shm/x", "shape": [4], "dtype": "float16"},
    ],
)
def test_bad_host_tensor_extensions(data: dict[str, object]) -> None:
    ext = msgspec.msgpack.Ext(2, _enc(data))
    err = _payload_error([_enc(1), _enc(1), _enc(7), _enc([ext])])
    assert _reply_value(err) is None


def test_unknown_extension_code() -> None:
    ext = msgspec.msgpack.Ext(9, b"")
    _payload_error([_enc(1), _enc(1), _enc(7), _enc([ext])])


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from([*KEY, "extra"]), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 1000, 9]),
    st.lists(_values.map(_enc) | st.binary(max_size=30), max_size=5),
)
def test_any_payload_decodes_or_is_refused_with_a_reply(
    rtype: int, payloads: list[bytes]
) -> None:
    """No payload makes the codec raise anything but PayloadError."""
    header = parse([_enc(1), _enc(rtype), *payloads])
    reply: list[bytes] | None = [header.uid, header.type_frame]
    try:
        decode_request(header)
    except PayloadError as e:
        reply = e.reply
    assert reply is not None
    assert reply[:2] == [header.uid, header.type_frame]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=4))
def test_any_header_decodes_or_is_refused(frames: list[bytes]) -> None:
    try:
        header = parse(frames)
    except ProtocolError:
        return
    assert header.uid == frames[0]


# -- pickles: the opcode stream is checked before anything is unpickled -------

_WRAPPER_MODULE = b"lmcache.v1.multiprocess.custom_types"


def _unicode(text: bytes) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text  # SHORT_BINUNICODE


def _wrapper_global() -> bytes:
    return _unicode(_WRAPPER_MODULE) + _unicode(b"CudaIPCWrapper") + b"\x93"


def _real_wrapper() -> bytes:
    v = next(v for v in VECTORS if v["request"] == "REGISTER_KV_CACHE")
    ext = msgspec.msgpack.decode(frames(v["client_frames_hex"])[3])[0]
    return bytes(ext.data)


@pytest.mark.parametrize("index", [2**32 - 1, 2**24])
def test_huge_memo_index_is_refused_without_allocating(index: int) -> None:
    import tracemalloc

    # NONE, LONG_BINPUT index, STOP: unchecked, the unpickler sizes its memo
    # to twice the index (2**24 -> 256 MiB; 2**32-1 -> 64 GiB).
    bomb = b"\x80\x04N" + b"r" + index.to_bytes(4, "little") + b"."
    assert len(bomb) == 9
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="memo index"):
            load_cuda_ipc_wrapper(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("NEWOBJ without BUILD", b"\x80\x04" + _wrapper_global() + b")\x81."),
        ("REDUCE without BUILD", b"\x80\x04" + _wrapper_global() + b")R."),
        ("BUILD with None", b"\x80\x04" + _wrapper_global() + b")\x81Nb."),
        ("NEWOBJ with arguments", b"\x80\x04" + _wrapper_global() + b"K\x01\x85\x81."),
    ],
)
def test_half_built_wrapper_is_a_protocol_error(name: str, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        load_cuda_ipc_wrapper(data)


@pytest.mark.parametrize(
    ("name", "data", "error"),
    [
        ("EXT1", b"\x80\x04\x82\x01.", "opcode EXT1"),
        ("INST", b"(ios\nsystem\nX\x02\x00\x00\x00id.", "opcode INST"),
        ("EMPTY_LIST", b"\x80\x04]N\x61.", "opcode EMPTY_LIST"),
        ("BINFLOAT", b"\x80\x04G" + bytes(8) + b".", "opcode BINFLOAT"),
        ("PERSID", b"\x80\x04N\x51.", "opcode BINPERSID"),
        ("nested 20 deep", b"\x80\x04)" + b"\x85" * 20 + b".", "nests deeper"),
        (
            "5000 bytes",
            b"\x80\x04X" + (5000).to_bytes(4, "little") + b"a" * 5000 + b".",
            "over 4096",
        ),
        ("memo read never stored", b"\x80\x04h\x05.", "never stored"),
        ("data after STOP", b"\x80\x04N.N.", "after STOP"),
        ("no STOP", b"\x80\x04N", "malformed|no STOP"),
    ],
)
def test_pickle_opcode_stream_is_checked(name: str, data: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        load_cuda_ipc_wrapper(data)


def test_real_wrapper_passes_the_opcode_check() -> None:
    from lmcd.wire.pickleguard import check_opcodes
    from lmcd.wire.unpickle import MAX_PICKLE_BYTES, WRAPPER_RULES

    data = _real_wrapper()
    check_opcodes(data, WRAPPER_RULES)
    assert len(data) * 4 < MAX_PICKLE_BYTES
    ref = load_cuda_ipc_wrapper(data)
    assert isinstance(ref, CudaTensorRef)


def test_wrapper_handle_must_be_flat() -> None:
    # The real wrapper with its handle's first element (BININT1 0) replaced
    # by an empty tuple: refused before it can reach torch.
    data = _real_wrapper()
    at = data.index(b"(K\x00C@") + 1
    bad = data[:at] + b")" + data[at + 2 :]
    bad = bad[:2] + b"\x95" + (len(bad) - 11).to_bytes(8, "little") + bad[11:]
    with pytest.raises(ProtocolError, match="ints, bytes and bools"):
        load_cuda_ipc_wrapper(bad)


# -- nesting: failure replies never decode what failed to decode -------------

_DEEP = b"\x91" * 100_000 + b"\x01"


@pytest.mark.parametrize(
    ("message", "reply"),
    [
        ([_enc(1), _enc(5), _DEEP, _enc(True)], [False]),
        ([_enc(1), _enc(3), _DEEP, _enc(1), _enc([0]), _enc(b"ev")], [b"ev", False]),
        ([_enc(1), _enc(4), _DEEP, _enc(1), _enc([0]), _enc(b"ev")], [b"ev", [False]]),
    ],
    ids=["LOOKUP", "STORE", "RETRIEVE"],
)
def test_keys_nested_100k_deep_get_the_failure_reply(
    message: list[bytes], reply: object
) -> None:
    assert _reply_value(_payload_error(message)) == reply


@pytest.mark.parametrize("rtype", [1, 2, 3, 4, 5, 6, 7, 8, 1000])
@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_deep_nesting_anywhere_is_a_payload_error(rtype: int, position: int) -> None:
    payloads = [_enc([KEY]), _enc(1), _enc([0]), _enc(b"ev")]
    payloads[position] = b"\x91" * 5000 + b"\x01"
    message = parse([_enc(1), _enc(rtype), *payloads])
    with contextlib.suppress(PayloadError):
        decode_request(message)


@pytest.mark.parametrize(
    ("frame", "count"),
    [
        (_enc([1, 2, 3]), 3),
        (_enc(list(range(100))), 100),
        (_enc(list(range(70_000))), 70_000),
        (b"\xdd\xff\xff\xff\xff\x01\x02\x03", 3),  # claims 2**32-1, holds 3 bytes
        (b"\xdc\x00", 0),
        (_enc({"a": 1}), 0),
        (b"", 0),
    ],
)
def test_array_length_reads_only_the_header(frame: bytes, count: int) -> None:
    from lmcd.wire.lmcache03 import array_length

    assert array_length(frame) == count


def test_recursion_in_any_decoder_is_a_payload_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decoder of untyped values (lmcache 0.5's maps, say) recurses into
    whatever it is given; the codec turns that into the failure reply."""
    from lmcd.wire import lmcache03

    def untyped_lookup(p: list[bytes]) -> Any:
        return msgspec.msgpack.decode(p[0])

    monkeypatch.setitem(lmcache03._DECODERS, RequestType.LOOKUP, untyped_lookup)
    err = _payload_error([_enc(1), _enc(5), _DEEP, _enc(True)])
    assert _reply_value(err) == [False]
