"""The lmcache 0.4.4 / 0.4.6 / 0.4.7 dialects against frames of the real
clients and replies of lmcache's own 0.4.6 and 0.4.7 servers (tests/data:
`lmcache-0.4.7.json` from the shared wire vectors, the two transcripts
recorded by `tests/lmcache04/capture.py`), and the pickles they carry."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import pickletools
import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from lmcd.errors import ConfigError, ProtocolError
from lmcd.wire import PayloadError, Unsupported, parse
from lmcd.wire.descriptors import UnsupportedDescriptor
from lmcd.wire.dialect import Message
from lmcd.wire.lmcache04 import (
    LMCACHE_044,
    LMCACHE_046,
    LMCACHE_047,
    ORDER,
    Lmcache04,
)
from lmcd.wire.registry import choices, dialects_for
from lmcd.wire.tensorpickle import dump_tensors, load_tensors
from lmcd.wire.types import (
    ChunkData,
    Clear,
    CommitRetrieve,
    CommitStore,
    CopyResult,
    CudaTensorRef,
    EndSession,
    FreeLookupLocks,
    GetChunkSize,
    HostTensorRef,
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
    UnregisterKVCache,
    UnregisterPool,
)
from lmcd.wire.unpickle import load_wrapper_04

enc = msgspec.msgpack.encode
DATA = Path(__file__).resolve().parent / "data"


def _data(name: str) -> Any:
    here = Path(__file__).resolve().parent
    for root in (here.parent, here.parent.parent):
        p = root / "shared" / "wire-vectors" / name
        if p.exists():
            return json.loads(p.read_text())
    return json.loads((DATA / name).read_text())


VECTORS_047 = _data("lmcache-0.4.7.json")
TRANSCRIPT_046 = json.loads(
    (DATA / "lmcache-0.4.6-real-server-transcript.json").read_text()
)
TRANSCRIPT_047 = json.loads(
    (DATA / "lmcache-0.4.7-real-server-transcript.json").read_text()
)


def _frames(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def _exchanges(transcript: Any) -> list[tuple[str, list[bytes], list[bytes] | None]]:
    """(client, request frames, reply frames or None) in request order: each
    reply matched to its request by client and uid."""
    out: list[tuple[str, list[bytes], list[bytes] | None]] = []
    pending: dict[tuple[str, bytes], int] = {}
    for e in transcript["entries"]:
        frames = _frames(e["frames_hex"])
        k = (e["client"], frames[0])
        if e["dir"] == "c2s":
            pending[k] = len(out)
            out.append((e["client"], frames, None))
        else:
            i = pending.pop(k)
            out[i] = (out[i][0], out[i][1], frames)
    return out


# -- the type tables -------------------------------------------------------------------


def test_the_tables_are_the_releases_enum_orders() -> None:
    for release, dialect, types_ in (
        ("0.4.6", LMCACHE_046, TRANSCRIPT_046["request_types"]),
        ("0.4.7", LMCACHE_047, TRANSCRIPT_047["request_types"]),
        ("0.4.7", LMCACHE_047, VECTORS_047["request_types"]),
    ):
        assert {n: i for i, n in enumerate(ORDER[release], 1)} == types_  # type: ignore[index]
        for name, value in types_.items():
            msg = parse([enc(1), enc(value)])
            assert dialect.operation(msg) == name
    # 0.4.4 and 0.4.5 (LMCACHE-DIALECTS.md §4, read from both wheels).
    table = {n: i for i, n in enumerate(ORDER["0.4.4"], 1)}
    assert table["CLEAR"] == 10
    assert table["GET_CHUNK_SIZE"] == 11
    assert table["PING"] == 12
    assert table["REPORT_BLOCK_ALLOCATION"] == 13
    assert table["NOOP"] == 14
    assert table["CB_RETRIEVE_PRE_COMPUTED_V2"] == 22


def test_dialect_names_and_the_registry() -> None:
    assert [d.name for d in (LMCACHE_044, LMCACHE_046, LMCACHE_047)] == [
        "lmcache-0.4.4",
        "lmcache-0.4.6",
        "lmcache-0.4.7",
    ]
    for name in ("lmcache-0.4.4", "lmcache-0.4.5", "lmcache-0.4.6", "lmcache-0.4.7"):
        assert name in choices()
    assert dialects_for("lmcache-0.4.5") == (LMCACHE_044,)
    # auto detects every dialect.
    auto = [d.name for d in dialects_for("auto")]
    assert auto == [
        "lmcache-0.3",
        "lmcache-0.4.4",
        "lmcache-0.4.6",
        "lmcache-0.4.7",
        "lmcache-0.5",
    ]
    # Several named with commas: detected among those.
    mixed = dialects_for("lmcache-0.3, lmcache-0.4.5,lmcache-0.4.6")
    assert [d.name for d in mixed] == ["lmcache-0.3", "lmcache-0.4.4", "lmcache-0.4.6"]
    for bad in ("lmcache-0.4.6,auto", "lmcache-0.4.4,lmcache-0.4.5", "", "0.4.6"):
        with pytest.raises(ConfigError):
            dialects_for(bad)


# -- requests of the real clients ------------------------------------------------------

_EXPECTED: dict[str, type] = {
    "REGISTER_KV_CACHE": RegisterKVCache,
    "UNREGISTER_KV_CACHE": UnregisterKVCache,
    "STORE": StoreSpan,
    "RETRIEVE": RetrieveSpan,
    "LOOKUP": StartLookup,
    "QUERY_PREFETCH_STATUS": QueryLookup,
    "QUERY_PREFETCH_LOOKUP_HITS": QueryLookup,
    "FREE_LOOKUP_LOCKS": FreeLookupLocks,
    "END_SESSION": EndSession,
    "REGISTER_KV_CACHE_NON_GPU_CONTEXT": RegisterPool,
    "UNREGISTER_KV_CACHE_NON_GPU_CONTEXT": UnregisterPool,
    "PREPARE_STORE": PrepareStore,
    "COMMIT_STORE": CommitStore,
    "PREPARE_RETRIEVE": PrepareRetrieve,
    "COMMIT_RETRIEVE": CommitRetrieve,
    "CLEAR": Clear,
    "GET_CHUNK_SIZE": GetChunkSize,
    "PING": Ping,
    "REPORT_BLOCK_ALLOCATION": ReportBlockAllocation,
    "NOOP": Noop,
}


@pytest.mark.parametrize(
    ("dialect", "transcript"),
    [(LMCACHE_046, TRANSCRIPT_046), (LMCACHE_047, TRANSCRIPT_047)],
    ids=["0.4.6", "0.4.7"],
)
def test_every_transcript_request_decodes(dialect: Lmcache04, transcript: Any) -> None:
    for client, frames, _reply in _exchanges(transcript):
        msg = parse(frames)
        name = dialect.operation(msg)
        assert name is not None
        # The raw client of the capture starts with PING, which no adapter
        # does (`test_the_colliding_zero_payload_messages_...`).
        assert dialect.plausible(msg) or (client, name) == ("raw", "PING"), name
        request = dialect.decode(msg)
        assert isinstance(request, _EXPECTED[name]), (name, request)
        if isinstance(request, QueryLookup):
            assert request.peek == (name == "QUERY_PREFETCH_LOOKUP_HITS")
        if isinstance(request, Clear):
            assert request.force  # lmcache 0.4's server clears everything
        if isinstance(request, RegisterPool):
            assert not request.pings  # 0.4 pings name no worker: never reaped
            assert request.inline == (dialect is LMCACHE_046)
        if isinstance(request, CommitStore):
            if dialect is LMCACHE_046:
                assert request.chunks is not None
                assert [c.shape for c in request.chunks] == [(2, 2, 16, 16)] * 2
            else:
                assert request.chunks is None


def _vector_requests() -> list[tuple[str, str, list[bytes]]]:
    return [
        (v["source"], v["request"], _frames(v["client_frames_hex"]))
        for v in VECTORS_047["vectors"]
    ]


@pytest.mark.parametrize(("source", "name", "frames"), _vector_requests())
def test_every_047_vector_decodes_or_is_refused_as_lmcache_would(
    source: str, name: str, frames: list[bytes]
) -> None:
    msg = parse(frames)
    assert LMCACHE_047.operation(msg) == name
    if name.startswith("CB_"):
        # CacheBlend: lmcache's default server has no handler and leaves it
        # unanswered; so does lmcd.
        with pytest.raises(Unsupported) as e:
            LMCACHE_047.decode(msg)
        assert e.value.reply is None
        return
    if name == "COMMIT_STORE" and msgspec.msgpack.decode(frames[4]):
        # A 0.4.7 worker pickles only when the server offers no pool.
        with pytest.raises(Unsupported) as e:
            LMCACHE_047.decode(msg)
        assert e.value.reply == msg.reply(enc(False))
        return
    if name == "REGISTER_KV_CACHE" and "handle" in source:
        return  # test_the_cpu_shm_handle_registration_of_the_vectors
    if name == "REGISTER_KV_CACHE" and source.startswith("A:"):
        # The raw capture registers one layer in a group of two: refused, and
        # still answered (the registration's response is None).
        with pytest.raises(PayloadError) as p:
            LMCACHE_047.decode(msg)
        assert p.value.reply == msg.reply(None)
        return
    request = LMCACHE_047.decode(msg)
    assert isinstance(request, _EXPECTED[name])
    if isinstance(request, RegisterKVCache):
        assert request.refresh
        assert not request.pings
        for layer in request.layers:
            assert isinstance(layer, CudaTensorRef)
            assert layer.stride is not None
            assert layer.device_uuid


def test_the_cpu_shm_handle_registration_of_the_vectors() -> None:
    v = next(
        v
        for v in VECTORS_047["vectors"]
        if v["request"] == "REGISTER_KV_CACHE" and "handle" in v["source"]
    )
    msg = parse(_frames(v["client_frames_hex"]))
    # [2, 8 blocks, 16 "heads", 2 "block size", 8]: lmcache reads it as HND,
    # whose NHD view is not contiguous: refused, with a reply (the
    # registration's response is None) and the setting that avoids it.
    with pytest.raises(Unsupported) as e:
        LMCACHE_047.decode(msg)
    assert "cpu_shm_hnd" in str(e.value)
    assert e.value.reply == msg.reply(None)


# -- replies ---------------------------------------------------------------------------


@dataclasses.dataclass
class PrepareStoreResponse:
    context: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PrepareRetrieveResponse:
    success: bool
    data: bytes = b""
    context: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RegisterNonGpuContextResponse:
    shm_name: str = ""
    pool_size: int = 0


# What lmcache 0.4.6 / 0.4.7 declare as each response (`protocols/*.py`);
# 0.4.6's client decodes replies strictly with these types.
_RESPONSE_TYPES: dict[str, Any] = {
    "STORE": tuple[bytes, bool],
    "RETRIEVE": tuple[bytes, bool],
    "QUERY_PREFETCH_STATUS": int | None,
    "QUERY_PREFETCH_LOOKUP_HITS": int | None,
    "PREPARE_STORE": PrepareStoreResponse,
    "COMMIT_STORE": bool,
    "PREPARE_RETRIEVE": PrepareRetrieveResponse,
    "COMMIT_RETRIEVE": bool,
    "GET_CHUNK_SIZE": int,
    "PING": bool,
    "NOOP": str,
}


def _response_type(dialect: Lmcache04, name: str) -> Any:
    if name == "REGISTER_KV_CACHE_NON_GPU_CONTEXT" and dialect is LMCACHE_047:
        return RegisterNonGpuContextResponse
    return _RESPONSE_TYPES.get(name)


def _client_reads(dialect: Lmcache04, msg: Message, reply: list[bytes] | None) -> Any:
    """What the client makes of `reply`, decoding as strictly as lmcache
    0.4.6 does (a mistyped reply raises, as it would kill its I/O thread)."""
    assert reply is not None
    assert reply[:2] == [msg.uid, msg.type_frame]
    name = dialect.operation(msg)
    assert name is not None
    if len(reply) == 2:
        return None
    cls = _response_type(dialect, name)
    assert cls is not None, f"{name} declares no response but got one"
    return msgspec.msgpack.decode(reply[2], type=cls)


def _result_for(request: Request, server_value: Any) -> object:
    """The neutral result that stands for the real server's reply."""
    if isinstance(request, StoreSpan | RetrieveSpan):
        handle, ok = server_value
        return CopyResult(ok=ok, event_handle=handle)
    if isinstance(request, RegisterPool):
        return (
            PoolInfo(server_value["shm_name"], server_value["pool_size"])
            if (server_value)
            else PoolInfo("", 0)
        )
    if isinstance(request, PrepareStore):
        ctx = server_value["context"]
        return PreparedSlots(
            tuple(PoolSlot(**s) for s in ctx.get("slots", [])),
            tuple(ctx.get("chunk_indices", [])),
        )
    if isinstance(request, PrepareRetrieve):
        ctx = server_value["context"]
        chunks = ()
        if server_value["data"]:
            chunks = load_tensors(server_value["data"], max_bytes=1 << 30)
        return PreparedSlots(
            tuple(PoolSlot(**s) for s in ctx.get("slots", [])),
            ok=server_value["success"],
            chunks=chunks,
        )
    return server_value


@pytest.mark.parametrize(
    ("dialect", "transcript"),
    [(LMCACHE_046, TRANSCRIPT_046), (LMCACHE_047, TRANSCRIPT_047)],
    ids=["0.4.6", "0.4.7"],
)
def test_replies_match_the_real_servers(dialect: Lmcache04, transcript: Any) -> None:
    """For each request of the transcript, the result standing for the real
    server's reply is encoded by lmcd into the same frames (the pickled
    chunks of a 0.4.6 PREPARE_RETRIEVE: into tensors of the same bytes)."""
    for _client, frames, reply in _exchanges(transcript):
        msg = parse(frames)
        request = dialect.decode(msg)
        assert reply is not None
        server_value = msgspec.msgpack.decode(reply[2]) if len(reply) > 2 else None
        ours = dialect.encode(msg, request, _result_for(request, server_value))
        _client_reads(dialect, msg, ours)
        if isinstance(request, PrepareRetrieve) and dialect is LMCACHE_046:
            theirs = pickle.loads(server_value["data"])
            mine = pickle.loads(msgspec.msgpack.decode(ours[2])["data"])
            assert len(mine) == len(theirs) == 2
            for a, b in zip(mine, theirs, strict=True):
                assert a.dtype == b.dtype
                assert a.shape == b.shape
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            continue
        assert ours == reply, dialect.operation(msg)


_SAMPLE: dict[str, object] = {
    "STORE": CopyResult(ok=True),
    "RETRIEVE": CopyResult(ok=True, event_handle=b"e" * 64),
    "QUERY_PREFETCH_STATUS": 3,
    "QUERY_PREFETCH_LOOKUP_HITS": None,
    "GET_CHUNK_SIZE": 256,
    "PING": True,
    "NOOP": "OK",
    "COMMIT_STORE": True,
    "COMMIT_RETRIEVE": True,
}


def _failure_expected(dialect: Lmcache04, name: str | None, request: Request) -> Any:
    if isinstance(request, StoreSpan | RetrieveSpan):
        return (request.event_handle, False)  # the client's own event
    if name == "PREPARE_STORE":
        if dialect is LMCACHE_046:
            return PrepareStoreResponse()
        return PrepareStoreResponse({"slots": [], "chunk_indices": []})
    if name == "REGISTER_KV_CACHE_NON_GPU_CONTEXT" and dialect is LMCACHE_047:
        return RegisterNonGpuContextResponse()
    return {
        "QUERY_PREFETCH_STATUS": 0,
        "QUERY_PREFETCH_LOOKUP_HITS": 0,
        "PREPARE_RETRIEVE": PrepareRetrieveResponse(success=False),
        "COMMIT_STORE": False,
        "COMMIT_RETRIEVE": False,
        "PING": False,
        "NOOP": "ERROR",
    }.get(name or "")


@pytest.mark.parametrize(
    ("dialect", "transcript"),
    [(LMCACHE_046, TRANSCRIPT_046), (LMCACHE_047, TRANSCRIPT_047)],
    ids=["0.4.6", "0.4.7"],
)
def test_results_and_failures_answer_with_the_declared_types(
    dialect: Lmcache04, transcript: Any
) -> None:
    seen = set()
    for _client, frames, _reply in _exchanges(transcript):
        msg = parse(frames)
        name = dialect.operation(msg)
        request = dialect.decode(msg)
        if name in _SAMPLE:
            ours = _client_reads(
                dialect, msg, dialect.encode(msg, request, _SAMPLE[name])
            )
            if name == "STORE":
                # No device work: the client's own event comes back, since a
                # 0.4 client always imports the handle of the reply.
                assert isinstance(request, StoreSpan)
                assert ours == (request.event_handle, True)
        failure = dialect.failure(msg, request)
        if name == "GET_CHUNK_SIZE":
            assert failure is None  # no chunk size is better than a wrong one
        else:
            value = _client_reads(dialect, msg, failure)
            assert value == _failure_expected(dialect, name, request), name
        seen.add(name)
    assert {"PING", "COMMIT_STORE", "PREPARE_RETRIEVE"} <= seen


def test_a_copy_that_fails_to_decode_still_gets_the_clients_event() -> None:
    frames = next(
        _frames(v["client_frames_hex"])
        for v in VECTORS_047["vectors"]
        if v["request"] == "STORE"
    )
    bad = [*frames[:3], enc("not a key"), *frames[4:]]  # the instance id
    msg = parse(bad)
    with pytest.raises(PayloadError) as e:
        LMCACHE_047.decode(msg)
    assert e.value.reply == msg.reply(enc([msgspec.msgpack.decode(frames[5]), False]))


def test_unknown_types_and_counts_are_not_answered_in_another_shape() -> None:
    for dialect in (LMCACHE_044, LMCACHE_046, LMCACHE_047):
        with pytest.raises(PayloadError) as e:
            dialect.decode(parse([enc(1), enc(999)]))
        assert e.value.reply is None
        gcs = {n: i for i, n in enumerate(ORDER[dialect.release], 1)}["GET_CHUNK_SIZE"]
        with pytest.raises(PayloadError) as e:
            dialect.decode(parse([enc(0), enc(gcs), enc(1)]))
        assert e.value.reply is None  # never a wrong chunk size


# -- 0.4.4 / 0.4.5 ---------------------------------------------------------------------


def _register_frames(*, engine: bool, groups: bool, world: int = 1) -> list[bytes]:
    """A 0.4.x REGISTER_KV_CACHE of the CUDA wrapper of the vectors."""
    v = next(
        v
        for v in VECTORS_047["vectors"]
        if v["request"] == "REGISTER_KV_CACHE" and v["source"].startswith("A:")
    )
    f = _frames(v["client_frames_hex"])
    out = [f[0], f[1], f[2], f[3], f[4], enc(world)]
    if engine:
        out.append(f[6])
    out.append(f[7])
    if groups:
        group = {"engine_group_id": 0, "layer_indices": [0], "tokens_per_block": 16}
        out.append(enc([group]))
    return out


def test_0_4_4_and_0_4_5_registrations() -> None:
    r44 = LMCACHE_044.decode(parse(_register_frames(engine=False, groups=False)))
    r45 = LMCACHE_044.decode(parse(_register_frames(engine=True, groups=False)))
    assert isinstance(r44, RegisterKVCache)
    assert isinstance(r45, RegisterKVCache)
    assert r44.engine is None
    assert r45.engine == "vllm"
    assert r44.layers == r45.layers
    assert r45.hints.kv_layout == "NHD"
    # 0.4.6 sends 0.4.5's shape; 0.4.7 adds the groups.
    assert LMCACHE_046.decode(parse(_register_frames(engine=True, groups=False))) == r45
    r47 = LMCACHE_047.decode(parse(_register_frames(engine=True, groups=True)))
    assert isinstance(r47, RegisterKVCache)
    assert r47.groups[0].layer_indices == (0,)
    assert not LMCACHE_046.plausible(parse(_register_frames(engine=True, groups=True)))


def test_0_4_4_copies_take_flat_block_ids() -> None:
    store = next(
        _frames(v["client_frames_hex"])
        for v in VECTORS_047["vectors"]
        if v["request"] == "STORE"
    )
    flat = [*store[:4], enc([1, 2]), *store[5:]]
    request = LMCACHE_044.decode(parse(flat))
    assert isinstance(request, StoreSpan)
    assert request.block_ids == ((1, 2),)
    with pytest.raises(PayloadError):
        LMCACHE_044.decode(parse(store))  # nested lists are 0.4.7's
    with pytest.raises(PayloadError):
        LMCACHE_047.decode(parse(flat))


def test_lookup_readers_follow_lmcache_0_4s_mla_rule() -> None:
    lookup = next(
        _frames(v["client_frames_hex"])
        for v in VECTORS_047["vectors"]
        if v["request"] == "LOOKUP"
    )
    key = msgspec.msgpack.decode(lookup[2])
    for world, tp, readers in ((2, 1, 1), (2, 2, 1), (1, 4, 4), (2, 8, 8), (1, 0, 1)):
        frames = [*lookup[:2], enc({**key, "world_size": world}), enc(tp)]
        request = LMCACHE_047.decode(parse(frames))
        assert isinstance(request, StartLookup)
        assert request.span.readers == readers, (world, tp)


# -- detection between 0.4.6 and 0.4.7 -------------------------------------------------


def test_the_colliding_zero_payload_messages_are_told_apart_by_uid() -> None:
    first_16 = parse([enc(0), enc(16)])  # 0.4.6 GET_CHUNK_SIZE
    later_16 = parse([enc(5), enc(16)])  # either; 0.4.7 CLEAR
    first_17 = parse([enc(0), enc(17)])  # 0.4.7 GET_CHUNK_SIZE
    later_17 = parse([enc(5), enc(17)])  # 0.4.6 PING (after a restart)
    assert LMCACHE_046.plausible(first_16)
    assert not LMCACHE_047.plausible(first_16)
    assert LMCACHE_046.plausible(later_16)
    assert LMCACHE_047.plausible(later_16)
    assert LMCACHE_047.plausible(first_17)
    assert not LMCACHE_046.plausible(first_17)
    assert LMCACHE_046.plausible(later_17)
    assert not LMCACHE_047.plausible(later_17)
    # With one dialect selected, its own reading holds whatever the uid.
    assert isinstance(LMCACHE_046.decode(first_17), Ping)
    assert isinstance(LMCACHE_047.decode(later_17), GetChunkSize)


# -- pickles ---------------------------------------------------------------------------

MARKER = "lmcd-test-pwned"


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.path}",))


def _commit_store_046(data: bytes) -> list[bytes]:
    for _client, frames, _reply in _exchanges(TRANSCRIPT_046):
        if LMCACHE_046.operation(parse(frames)) == "COMMIT_STORE":
            return [*frames[:4], enc(data)]
    raise AssertionError("no COMMIT_STORE in the transcript")


def test_a_pickle_that_would_run_code_is_refused_in_every_0_4_payload(
    tmp_path: Path,
) -> None:
    marker = tmp_path / MARKER
    evil = pickle.dumps(_Evil(str(marker)))
    evil_in_list = pickle.dumps([_Evil(str(marker))])
    # COMMIT_STORE's chunks (0.4.6): answered False.
    for data in (evil, evil_in_list):
        msg = parse(_commit_store_046(data))
        with pytest.raises(PayloadError) as e:
            LMCACHE_046.decode(msg)
        assert e.value.reply == msg.reply(enc(False))
    # A tensor whose storage blob hides the call.
    t = pickle.dumps([torch.zeros(2, dtype=torch.bfloat16)])
    blob_start = t.index(b"\x80\x02\x8a\n")
    inner = t[blob_start:]
    swapped = t.replace(b"ctorch\nBFloat16Storage\n", b"cposix\nsystem\n")
    assert swapped != t
    assert inner
    with pytest.raises(PayloadError):
        LMCACHE_046.decode(parse(_commit_store_046(swapped)))
    # The tensor wrappers of REGISTER_KV_CACHE (every 0.4 line).
    frames = _register_frames(engine=True, groups=True)
    wrapped = [*frames[:3], enc([msgspec.msgpack.Ext(1, evil)]), *frames[4:]]
    for dialect, fr in (
        (LMCACHE_047, wrapped),
        (LMCACHE_046, wrapped[:-1]),
        (LMCACHE_044, wrapped[:-1]),
    ):
        msg = parse(fr)
        with pytest.raises(PayloadError) as e:
            dialect.decode(msg)
        assert e.value.reply == msg.reply(None)
    with pytest.raises(ProtocolError):
        load_wrapper_04(evil)
    assert not marker.exists()


def test_pickle_resource_bombs_are_refused() -> None:
    # EMPTY_LIST, LONG_BINPUT 2**20: the unpickler would size its memo to
    # a million slots (2**32-1 would be 32 GB).
    big_memo = b"\x80\x04]r\x00\x00\x10\x00."
    many = b"\x80\x04](" + b"N" * 100_000 + b"e."  # a list of 100k Nones
    for data in (big_memo, many):
        with pytest.raises(ProtocolError):
            load_tensors(data, max_bytes=1 << 20, max_tensors=4)
    with pytest.raises(ProtocolError):
        load_tensors(b"\x80\x04]." + b"x" * 100, max_bytes=50)
    chunks = [torch.zeros(4, dtype=torch.float32)] * 5
    with pytest.raises(ProtocolError):
        load_tensors(pickle.dumps(chunks), max_bytes=1 << 20, max_tensors=4)


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.float8_e4m3fn],
)
def test_tensor_pickles_round_trip_with_real_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = [
        (torch.randn(2, 3, 16, 8, generator=gen) * 4).to(dtype) for _ in range(3)
    ]
    chunks = load_tensors(pickle.dumps(tensors), max_bytes=1 << 20)
    for t, c in zip(tensors, chunks, strict=True):
        assert c.shape == tuple(t.shape)
        assert bytes(c.data) == t.view(torch.uint8).numpy().tobytes()
    back = pickle.loads(dump_tensors(chunks))
    for t, b in zip(tensors, back, strict=True):
        assert b.dtype == t.dtype
        assert b.is_contiguous()
        assert torch.equal(b.view(torch.uint8), t.view(torch.uint8))
    # What lmcd writes only uses what lmcd reads.
    again = load_tensors(dump_tensors(chunks), max_bytes=1 << 20)
    assert [bytes(c.data) for c in again] == [bytes(c.data) for c in chunks]


def test_only_plain_contiguous_cpu_tensors_are_read() -> None:
    base = torch.arange(64, dtype=torch.float32)
    view = base[8:40].reshape(4, 8)  # an offset into a larger storage: fine
    (chunk,) = load_tensors(pickle.dumps([view]), max_bytes=1 << 20)
    assert bytes(chunk.data) == view.numpy().tobytes()
    for bad, why in (
        ([base.reshape(8, 8).t()], "contiguous"),
        ([torch.zeros(3, requires_grad=True)], "autograd"),
        ({"a": torch.zeros(3)}, "opcode"),  # a dict: its opcodes are refused
        ((torch.zeros(3),), "list of tensors"),
    ):
        with pytest.raises(ProtocolError, match=why):
            load_tensors(pickle.dumps(bad), max_bytes=1 << 20)


def test_the_opcode_walk_runs_first() -> None:
    """A BUILD (setting attributes: how most pickle exploits reach code) is
    refused by the opcode walk, before the unpickler sees anything."""
    ops = {op.name for op, _, _ in pickletools.genops(pickle.dumps(_Evil("x")))}
    assert "REDUCE" in ops  # allowed: only the stand-ins can be called
    built = pickle.dumps(types.SimpleNamespace(a=1), protocol=2)
    with pytest.raises(ProtocolError, match="opcode"):
        load_tensors(built, max_bytes=1 << 20)


# -- the 0.4 tensor wrappers -----------------------------------------------------------


def _pickled(module: str, name: str, state: dict[str, Any]) -> bytes:
    """A pickle of an instance of `module.name` with `state` (as lmcache's
    wrappers pickle: NEWOBJ, then BUILD), made without lmcache."""
    mod = types.ModuleType(module)
    cls = type(name, (), {"__module__": module})
    setattr(mod, name, cls)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    saved = sys.modules.get(module)
    sys.modules[module] = mod
    try:
        return pickle.dumps(obj, protocol=4)
    finally:
        if saved is None:
            del sys.modules[module]
        else:
            sys.modules[module] = saved


_VIEW = {
    "dtype": torch.bfloat16,
    "shape": (2, 4, 8, 1, 8),
    "stride": (256, 64, 8, 8, 1),
    "storage_offset": 0,
}


def test_cuda_ipc_wrapper_04_keeps_its_view_and_checks_it() -> None:
    handle = (0, b"\x11" * 64, 1024, 0, b"/torch_1_1", 8, b"\x22" * 64, True)
    data = _pickled(
        "lmcache.v1.multiprocess.custom_types",
        "CudaIPCWrapper",
        {**_VIEW, "handle": handle, "device_uuid": "GPU-1"},
    )
    ref = load_wrapper_04(data)
    assert ref == CudaTensorRef(
        handle, "bfloat16", (2, 4, 8, 1, 8), None, "GPU-1", (256, 64, 8, 8, 1), 0
    )
    small = (0, b"\x11" * 64, 1000, 0, b"/t", 8, b"\x22" * 64, True)
    with pytest.raises(ProtocolError, match="past its"):
        load_wrapper_04(
            _pickled(
                "lmcache.v1.multiprocess.custom_types",
                "CudaIPCWrapper",
                {**_VIEW, "handle": small, "device_uuid": "GPU-1"},
            )
        )


def test_raw_cuda_ipc_wrapper_is_read_and_refused() -> None:
    data = _pickled(
        "lmcache.v1.multiprocess.custom_types",
        "RawCudaIPCWrapper",
        {
            **_VIEW,
            "handle": None,
            "device_uuid": "GPU-1",
            "_ipc_handle_reserved": b"\x00" * 64,
            "_nbytes": 1024,
        },
    )
    with pytest.raises(UnsupportedDescriptor) as e:
        load_wrapper_04(data)
    assert e.value.kind == "cuda_raw"


def test_cpu_shm_wrapper_maps_to_a_host_tensor() -> None:
    state = {
        **_VIEW,
        "handle": None,
        "device_uuid": "cpu",
        "shm_name": "/lmcache_kv_42_0",
        "nbytes": 1024,
    }
    ref = load_wrapper_04(
        _pickled("lmcache.v1.platform.cpu.shm", "CpuShmTensorWrapper", state)
    )
    assert ref == HostTensorRef(
        "/dev/shm/lmcache_kv_42_0", 0, (2, 4, 8, 1, 8), "bfloat16", (256, 64, 8, 8, 1)
    )
    for bad in (
        {"shm_name": "/../etc/passwd"},
        {"nbytes": 100},  # the view is larger
        {"device_uuid": "GPU-1"},
        {"extra": 1},  # a field the class does not have
    ):
        with pytest.raises(ProtocolError):
            load_wrapper_04(
                _pickled(
                    "lmcache.v1.platform.cpu.shm",
                    "CpuShmTensorWrapper",
                    {**state, **bad},
                )
            )


def test_a_vllm_cpu_kv_cache_with_one_head_is_served_in_vllms_order() -> None:
    """lmcache reads vLLM CPU caches as HND; with one KV head (or one token
    per block) HND and NHD are the same memory, so lmcd maps it."""
    state = {
        "dtype": torch.bfloat16,
        "shape": (2, 4, 1, 8, 8),  # HND: one head, blocks of 8 tokens
        "stride": (256, 64, 64, 8, 1),
        "storage_offset": 0,
        "handle": None,
        "device_uuid": "cpu",
        "shm_name": "/lmcache_kv_42_1",
        "nbytes": 1024,
    }
    wrapper = _pickled("lmcache.v1.platform.cpu.shm", "CpuShmTensorWrapper", state)
    frames = _register_frames(engine=True, groups=True)
    msg = parse([*frames[:3], enc([msgspec.msgpack.Ext(1, wrapper)]), *frames[4:]])
    request = LMCACHE_047.decode(msg)
    assert isinstance(request, RegisterKVCache)
    (layer,) = request.layers
    assert isinstance(layer, HostTensorRef)
    assert layer.shape == (2, 4, 8, 1, 8)


def test_inline_chunks_reach_the_request_as_bytes() -> None:
    chunks = [
        torch.full((2, 2, 16, 16), float(i), dtype=torch.bfloat16) for i in range(2)
    ]
    request = LMCACHE_046.decode(parse(_commit_store_046(pickle.dumps(chunks))))
    assert isinstance(request, CommitStore)
    assert request.chunks is not None
    assert [bytes(c.data) for c in request.chunks] == [
        c.view(torch.uint8).numpy().tobytes() for c in chunks
    ]
    assert all(
        isinstance(c, ChunkData) and c.dtype == "bfloat16" for c in request.chunks
    )


def test_the_pickle_reply_is_what_pickle_loads_reads(tmp_path: Path) -> None:
    """lmcd's 0.4.6 PREPARE_RETRIEVE reply, read back by a plain
    `pickle.loads` (what the client does), gives the stored bytes."""
    msg = parse(
        next(
            frames
            for _c, frames, _r in _exchanges(TRANSCRIPT_046)
            if LMCACHE_046.operation(parse(frames)) == "PREPARE_RETRIEVE"
        )
    )
    request = LMCACHE_046.decode(msg)
    data = bytes(range(256)) * 8  # 2048 bytes: [2, 2, 16, 16] bfloat16
    result = PreparedSlots((), chunks=(ChunkData("bfloat16", (2, 2, 16, 16), data),))
    reply = _client_reads(LMCACHE_046, msg, LMCACHE_046.encode(msg, request, result))
    assert reply.success
    (tensor,) = pickle.load(io.BytesIO(reply.data))
    assert tensor.shape == (2, 2, 16, 16)
    assert tensor.view(torch.uint8).numpy().tobytes() == data
    miss = _client_reads(
        LMCACHE_046, msg, LMCACHE_046.encode(msg, request, PreparedSlots((), ok=False))
    )
    assert miss == PrepareRetrieveResponse(success=False)
