"""The lmcache 0.5.5-0.5.6 dialect.

lmcache 0.5.6's client derives each operation's frames from its typed
`RequestClient` API: one MessagePack frame per parameter, defaults always
sent, and exactly one declared response type. The type frame is the
operation's frozen "legacy operation id" (1-33, 11 retired) or, for
operations added since, its name as a MessagePack string; lmcache's server
also takes any operation by name, and so does lmcd. Replies echo the uid
and type frames and add at most one frame: none when the declared response
is None.

Keys (`IPCCacheServerKey`) carry the request's whole token list; the daemon
names the chunks of `[start, end)` with lmcache's token-hash chain
(`lmcd.tokens`). Tensors are MessagePack descriptors (`lmcd.wire.descriptors`),
never pickles.

What lmcd does not offer is refused the way lmcache's own server refuses
it when the feature is not configured: left unanswered (the client's
future times out), or, where the client reads a typed refusal, with that
refusal; never with a reply of another type (see `UNSUPPORTED`). Sans-IO:
no trio, zmq or torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import attrs
import msgspec

from lmcd.errors import ProtocolError
from lmcd.tokens import check_token_ids
from lmcd.transfer.layouts import DTYPE_SIZES
from lmcd.wire.descriptors import (
    UnsupportedDescriptor,
    decode_descriptor,
)
from lmcd.wire.dialect import Message, PayloadError, Unsupported
from lmcd.wire.types import (
    MAX_BLOCK_IDS_PER_REQUEST,
    MAX_EVENT_HANDLE,
    MAX_LAYERS,
    MAX_MODEL_NAME,
    MAX_WORLD_SIZE,
    Capabilities,
    Clear,
    CommitRetrieve,
    CommitStore,
    CopyResult,
    EndSession,
    EngineGroup,
    FreeLookupLocks,
    GetChunkSize,
    LayoutHints,
    Noop,
    Ping,
    PoolInfo,
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

NAME = "lmcache-0.5"

# -- bounds ---------------------------------------------------------------------

MAX_TOKENS = 1 << 21
"""Tokens one key may carry: a 2M-token prompt (every key carries the
request's whole prompt, so this is the longest prompt lmcd serves)."""
MAX_REQUEST_ID = 1024
MAX_SALT = 128
"""lmcache's own `cache_salt` limit (characters)."""
SALT_FORBIDDEN = frozenset("@/\\\x00")
MAX_READERS = MAX_WORLD_SIZE
MAX_REQUEST_CONFIGS = 64
"""Entries of a key's `request_configs` (accepted and ignored)."""
MAX_REQUEST_CONFIGS_BYTES = 64 * 1024
MAX_WAIT_SECONDS = 300.0
"""Longest `wait_prefetch_status` wait (the clients' own default timeout);
a longer one is cut to this, after which the reply is "still running"."""
MAX_BLOCK_SIZE = 1 << 20
MAX_HIDDEN = 1 << 24
MAX_RECORDS = 65_536
MAX_INT64 = (1 << 63) - 1

# Bytes one payload frame may hold, checked before anything is decoded. A
# key carries the whole prompt (at most 5 bytes per token in MessagePack);
# every other frame is small.
SMALL_FRAME = 64 * 1024
KEY_FRAME = 5 * MAX_TOKENS + 64 * 1024
BLOCKS_FRAME = 8 * 1024 * 1024
TENSORS_FRAME = 8 * 1024 * 1024
RECORDS_FRAME = KEY_FRAME
EMPTY_DATA_FRAME = 16

LEGACY_IDS: dict[str, int] = {
    "register_kv_cache": 1,
    "unregister_kv_cache": 2,
    "register_q_cache": 3,
    "unregister_q_cache": 4,
    "store_q": 5,
    "store": 6,
    "retrieve": 7,
    "lookup": 8,
    "query_prefetch_status": 9,
    "wait_prefetch_status": 10,
    "free_lookup_locks": 12,
    "end_session": 13,
    "register_kv_cache_engine_driven_context": 14,
    "unregister_kv_cache_engine_driven_context": 15,
    "prepare_store": 16,
    "commit_store": 17,
    "prepare_retrieve": 18,
    "commit_retrieve": 19,
    "clear": 20,
    "get_chunk_size": 21,
    "ping": 22,
    "report_block_allocation": 23,
    "noop": 24,
    "cb_register_rope": 25,
    "cb_unregister_rope": 26,
    "cb_retrieve_pre_computed": 27,
    "cb_unified_lookup": 28,
    "p2p_lookup_and_lock": 29,
    "p2p_query_lookup_results": 30,
    "p2p_unlock_objects": 31,
    "get_experimental": 32,
    "cb_protocol_handshake": 33,
}
"""lmcache 0.5.5's operation numbers, frozen by 0.5.6 (`wire.py`)."""
_BY_ID = {v: k for k, v in LEGACY_IDS.items()}

# -- wire shapes ----------------------------------------------------------------

_Count = Annotated[int, msgspec.Meta(ge=0)]


class _Key(msgspec.Struct, forbid_unknown_fields=True):
    """`IPCCacheServerKey` as 0.5.5+ clients send it (every field, by name).

    Fields unknown to 0.5.6 are refused rather than ignored: a key from
    another release line must not be half-read.
    """

    model_name: Annotated[str, msgspec.Meta(max_length=MAX_MODEL_NAME)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
    worker_id: Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD_SIZE)] | None
    # Each id's range is checked by `check_token_ids` (faster than here).
    token_ids: Annotated[tuple[int, ...], msgspec.Meta(max_length=MAX_TOKENS)]
    start: _Count
    end: _Count
    request_id: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID)]
    cache_salt: Annotated[str, msgspec.Meta(max_length=MAX_SALT)] = ""
    request_configs: (
        Annotated[dict[str, msgspec.Raw], msgspec.Meta(max_length=MAX_REQUEST_CONFIGS)]
        | None
    ) = None
    num_kv_readers: Annotated[int, msgspec.Meta(ge=0, le=MAX_READERS)] = 0


class _Hints(msgspec.Struct, forbid_unknown_fields=True):
    """lmcache's `LayoutHints` TypedDict: every key optional."""

    kv_layout: Literal["NHD", "HND", "BLHNC", "BLNHC"] | None = None
    num_kv_heads: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] | None = None
    tokens_per_block: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)] | None = (
        None
    )
    kv_list_layout: Literal["k_v", "unified"] | None = None
    head_dim: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] | None = None


class _GroupInfo(msgspec.Struct, forbid_unknown_fields=True):
    """lmcache's `EngineGroupInfo`."""

    engine_group_id: Annotated[int, msgspec.Meta(ge=0, lt=MAX_LAYERS)]
    layer_indices: Annotated[
        tuple[Annotated[int, msgspec.Meta(ge=0, lt=MAX_LAYERS)], ...],
        msgspec.Meta(max_length=MAX_LAYERS),
    ] = ()
    tokens_per_block: Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCK_SIZE)] = 0
    sw_size_tokens: Annotated[int, msgspec.Meta(ge=-1, le=MAX_INT64)] = -1
    extra_object_group_tag: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)] = 0
    recurrent_state: bool = False


class _PoolPayload(msgspec.Struct, forbid_unknown_fields=True):
    """`RegisterEngineDrivenContextPayload`."""

    instance_id: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=MAX_INT64)]
    model_name: Annotated[str, msgspec.Meta(max_length=MAX_MODEL_NAME)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
    block_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)]
    num_layers: Annotated[int, msgspec.Meta(ge=1, le=MAX_LAYERS)]
    hidden_dim_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_HIDDEN)]
    dtype_str: Annotated[str, msgspec.Meta(max_length=64)]
    use_mla: bool
    num_physical_slots: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)] | None = (
        None
    )


class _Record(msgspec.Struct, forbid_unknown_fields=True):
    """`BlockAllocationRecord`."""

    req_id: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID)]
    new_block_ids: list[int]
    new_token_ids: list[int]


_ENGINES = frozenset({"vllm", "atom", "sglang", "trtllm", "mock"})

_key = msgspec.msgpack.Decoder(_Key)
_int = msgspec.msgpack.Decoder(int)
_opt_int = msgspec.msgpack.Decoder(int | None)
_str = msgspec.msgpack.Decoder(str)
_bool = msgspec.msgpack.Decoder(bool)
_float = msgspec.msgpack.Decoder(float)
_bytes = msgspec.msgpack.Decoder(bytes)
_blocks = msgspec.msgpack.Decoder(list[list[int]])
_exts = msgspec.msgpack.Decoder(
    Annotated[list[msgspec.msgpack.Ext], msgspec.Meta(max_length=MAX_LAYERS)]
)
_hints = msgspec.msgpack.Decoder(_Hints)
_groups = msgspec.msgpack.Decoder(
    Annotated[list[_GroupInfo], msgspec.Meta(max_length=MAX_LAYERS)]
)
_pool = msgspec.msgpack.Decoder(_PoolPayload)
_records = msgspec.msgpack.Decoder(
    Annotated[list[_Record], msgspec.Meta(max_length=MAX_RECORDS)]
)
_encoder = msgspec.msgpack.Encoder()

# -- operations -----------------------------------------------------------------

# What the client declares as the response, which fixes both the reply to a
# result and the failure reply.
_Response = Literal[
    "none",  # no response frame
    "copy",  # [event handle, ok]
    "count",  # int, or no frame while running
    "chunk_size",  # int
    "bool",
    "str",
    "strs",  # list[str]
    "pool",  # RegisterEngineDrivenContextResponse
    "prepare_store",  # PrepareStoreResponse
    "prepare_retrieve",  # PrepareRetrieveResponse
]

_Decode = Callable[[Sequence[bytes]], Request]


@attrs.frozen
class _Op:
    name: str
    limits: tuple[int, ...]  # per payload frame, checked before decoding
    response: _Response
    decode: _Decode


@attrs.frozen
class _Refused:
    """An operation lmcd does not offer, with what its client is owed."""

    name: str
    payloads: int
    reply: Literal["none", "ack", "stream_end", "module_error"]
    feature: str
    """What the operation belongs to, for the log line."""


def _frame_checks(op: _Op, payloads: Sequence[bytes]) -> None:
    for i, (data, limit) in enumerate(zip(payloads, op.limits, strict=True)):
        if len(data) > limit:
            raise ProtocolError(
                f"payload {i} of {op.name} is {len(data)} bytes, over {limit}"
            )


def _instance_id(data: bytes) -> int:
    value = _int.decode(data)
    if not -(1 << 63) <= value <= MAX_INT64:
        raise ProtocolError("instance id out of int64 range")
    return value


def _span(data: bytes, *, empty_ok: bool = False) -> TokenSpan:
    """A key's `TokenSpan`; `empty_ok` turns `start > end` into an empty
    range instead of an error (free_lookup_locks: lmcache's server ignores
    such a range)."""
    key = _key.decode(data)
    try:
        check_token_ids(key.token_ids)
    except ValueError as e:
        raise ProtocolError(f"bad token_ids: {e}") from e
    if key.worker_id is not None and key.worker_id >= key.world_size:
        raise ProtocolError(f"worker_id {key.worker_id} not in 0..world_size-1")
    start, end = key.start, key.end
    if end > len(key.token_ids):
        raise ProtocolError(f"end {end} is past the {len(key.token_ids)} token ids")
    if start > end:
        if not empty_ok:
            raise ProtocolError(f"start {start} is after end {end}")
        start = end
    if key.num_kv_readers < 1:
        raise ProtocolError(
            "num_kv_readers is missing or 0; lmcd needs an lmcache 0.5.5+ client"
        )
    salt = key.cache_salt
    if SALT_FORBIDDEN.intersection(salt):
        raise ProtocolError(f"cache_salt {salt!r} contains @, /, \\ or NUL")
    configs = key.request_configs
    if configs is not None:
        size = sum(len(k) + len(v) for k, v in configs.items())
        if size > MAX_REQUEST_CONFIGS_BYTES:
            raise ProtocolError(f"request_configs of {size} bytes")
    return TokenSpan(
        model_name=key.model_name,
        world_size=key.world_size,
        worker_id=key.worker_id,
        token_ids=key.token_ids,
        start=start,
        end=end,
        request_id=key.request_id,
        salt=salt,
        readers=key.num_kv_readers,
    )


def _block_ids(data: bytes) -> tuple[tuple[int, ...], ...]:
    groups = _blocks.decode(data)
    if len(groups) > MAX_LAYERS:
        raise ProtocolError(f"block ids for {len(groups)} groups")
    total = 0
    for ids in groups:
        total += len(ids)
        if total > MAX_BLOCK_IDS_PER_REQUEST:
            raise ProtocolError(f"over {MAX_BLOCK_IDS_PER_REQUEST} block ids")
        if ids and (min(ids) < 0 or max(ids) > MAX_INT64):
            raise ProtocolError("block ids must be non-negative int64")
    return tuple(tuple(ids) for ids in groups)


def _event(data: bytes) -> bytes:
    handle = _bytes.decode(data)
    if len(handle) > MAX_EVENT_HANDLE:
        raise ProtocolError("event handle too long")
    return handle


def _request_id(data: bytes) -> str:
    value = _str.decode(data)
    if len(value) > MAX_REQUEST_ID:
        raise ProtocolError("request id too long")
    return value


def _model_name(data: bytes) -> str:
    value = _str.decode(data)
    if len(value) > MAX_MODEL_NAME:
        raise ProtocolError("model name too long")
    return value


def _register(p: Sequence[bytes]) -> Request:
    instance_id = _instance_id(p[0])
    exts = _exts.decode(p[1])
    model_name = _model_name(p[2])
    world_size = _int.decode(p[3])
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ProtocolError(f"world_size {world_size} out of range")
    engine = _str.decode(p[4])
    if engine not in _ENGINES:
        raise ProtocolError(f"unknown engine type {engine!r}")
    hints = _hints.decode(p[5])
    infos = _groups.decode(p[6])
    if not exts:
        raise ProtocolError("register_kv_cache without KV tensors")
    layers = []
    for ext in exts:
        if ext.code != 1:
            raise ProtocolError(f"tensor extension code {ext.code}, expected 1")
        layers.append(decode_descriptor(memoryview(ext.data)))
    seen: set[int] = set()
    groups = []
    for info in infos:
        for layer in info.layer_indices:
            if layer >= len(layers) or layer in seen:
                raise ProtocolError(
                    f"group {info.engine_group_id} names layer {layer} of "
                    f"{len(layers)}, or one another group has"
                )
            seen.add(layer)
        sw = info.sw_size_tokens
        if sw == 0:
            raise ProtocolError("sliding window of 0 tokens")
        groups.append(
            EngineGroup(
                group_id=info.engine_group_id,
                layer_indices=info.layer_indices,
                tokens_per_block=info.tokens_per_block,
                sliding_window_tokens=None if sw < 0 else sw,
                extra_tag=info.extra_object_group_tag,
                recurrent=info.recurrent_state,
            )
        )
    return RegisterKVCache(
        instance_id=instance_id,
        layers=tuple(layers),
        model_name=model_name,
        world_size=world_size,
        groups=tuple(groups),
        refresh=True,
        engine=engine,
        hints=LayoutHints(
            kv_layout=hints.kv_layout,
            num_kv_heads=hints.num_kv_heads,
            tokens_per_block=hints.tokens_per_block,
            kv_list_layout=hints.kv_list_layout,
            head_dim=hints.head_dim,
        ),
    )


def _store(p: Sequence[bytes]) -> Request:
    return StoreSpan(_span(p[0]), _instance_id(p[1]), _block_ids(p[2]), _event(p[3]))


def _retrieve(p: Sequence[bytes]) -> Request:
    span = _span(p[0])
    skip = _int.decode(p[4])
    tokens = span.end - span.start
    if not 0 <= skip <= tokens:
        raise ProtocolError(
            f"skip_first_n_tokens {skip} outside the {tokens}-token range"
        )
    return RetrieveSpan(
        span, _instance_id(p[1]), _block_ids(p[2]), _event(p[3]), skip_tokens=skip
    )


def _tp_size(data: bytes) -> None:
    # Sent for payload arity only; lmcache's server ignores it too.
    _int.decode(data)


def _lookup(p: Sequence[bytes]) -> Request:
    span = _span(p[0])
    _tp_size(p[1])
    return StartLookup(span)


def _free_locks(p: Sequence[bytes]) -> Request:
    span = _span(p[0], empty_ok=True)
    _tp_size(p[1])
    return FreeLookupLocks(span)


def _wait(p: Sequence[bytes]) -> Request:
    request_id = _request_id(p[0])
    timeout = _float.decode(p[1])
    if not (math.isfinite(timeout) and timeout >= 0):
        raise ProtocolError(f"wait timeout {timeout} is not a non-negative number")
    return QueryLookup(request_id, wait=min(timeout, MAX_WAIT_SECONDS))


def _register_pool(p: Sequence[bytes]) -> Request:
    pool = _pool.decode(p[0])
    if pool.dtype_str not in DTYPE_SIZES:
        raise ProtocolError(f"unknown or unsupported dtype {pool.dtype_str!r}")
    return RegisterPool(
        instance_id=pool.instance_id,
        model_name=pool.model_name,
        world_size=pool.world_size,
        block_size=pool.block_size,
        num_layers=pool.num_layers,
        hidden=pool.hidden_dim_size,
        dtype=pool.dtype_str,
        mla=pool.use_mla,
        slots_per_chunk=pool.num_physical_slots,
    )


def _commit_store(p: Sequence[bytes]) -> Request:
    span = _span(p[0])
    instance_id = _instance_id(p[1])
    if _bytes.decode(p[2]) != b"":  # `decode_request` refused data already
        raise ProtocolError("commit_store with data is refused")
    return CommitStore(span, instance_id)


# An empty MessagePack bin in each of its three encodings.
_EMPTY_BINS = frozenset({b"\xc4\x00", b"\xc5\x00\x00", b"\xc6\x00\x00\x00\x00"})


def _is_data(frame: bytes) -> bool:
    """Whether `frame` is a non-empty MessagePack bin (by its header)."""
    return frame[:1] in (b"\xc4", b"\xc5", b"\xc6") and frame not in _EMPTY_BINS


def _report(p: Sequence[bytes]) -> Request:
    instance_id = _instance_id(p[0])
    model_name = _model_name(p[1])
    records = _records.decode(p[2])
    return ReportBlockAllocation(instance_id, model_name, len(records))


_S, _K = SMALL_FRAME, KEY_FRAME

_OPS: dict[str, _Op] = {
    op.name: op
    for op in (
        _Op(
            "register_kv_cache",
            (_S, TENSORS_FRAME, _S, _S, _S, _S, _S),
            "none",
            _register,
        ),
        _Op(
            "unregister_kv_cache",
            (_S,),
            "none",
            lambda p: UnregisterKVCache(_instance_id(p[0])),
        ),
        _Op("store", (_K, _S, BLOCKS_FRAME, _S), "copy", _store),
        _Op("retrieve", (_K, _S, BLOCKS_FRAME, _S, _S), "copy", _retrieve),
        _Op("lookup", (_K, _S), "none", _lookup),
        _Op(
            "query_prefetch_status",
            (_S,),
            "count",
            lambda p: QueryLookup(_request_id(p[0])),
        ),
        _Op("wait_prefetch_status", (_S, _S), "count", _wait),
        _Op("free_lookup_locks", (_K, _S), "none", _free_locks),
        _Op("end_session", (_S,), "none", lambda p: EndSession(_request_id(p[0]))),
        _Op(
            "register_kv_cache_engine_driven_context",
            (_S,),
            "pool",
            _register_pool,
        ),
        _Op(
            "unregister_kv_cache_engine_driven_context",
            (_S,),
            "none",
            lambda p: UnregisterPool(_instance_id(p[0])),
        ),
        _Op(
            "prepare_store",
            (_K, _S),
            "prepare_store",
            lambda p: PrepareStore(_span(p[0]), _instance_id(p[1])),
        ),
        _Op("commit_store", (_K, _S, EMPTY_DATA_FRAME), "bool", _commit_store),
        _Op(
            "prepare_retrieve",
            (_K, _S),
            "prepare_retrieve",
            lambda p: PrepareRetrieve(_span(p[0]), _instance_id(p[1])),
        ),
        _Op(
            "commit_retrieve",
            (_K, _S),
            "bool",
            lambda p: CommitRetrieve(_span(p[0]), _instance_id(p[1])),
        ),
        _Op("clear", (_S,), "none", lambda p: Clear(force=_bool.decode(p[0]))),
        _Op("get_chunk_size", (), "chunk_size", lambda p: GetChunkSize()),
        _Op("ping", (_S,), "bool", lambda p: Ping(_ping_id(p[0]))),
        _Op("report_block_allocation", (_S, _S, RECORDS_FRAME), "none", _report),
        _Op("noop", (), "str", lambda p: Noop()),
        _Op("get_experimental", (), "strs", lambda p: Capabilities()),
    )
}


def _ping_id(data: bytes) -> int | None:
    value = _opt_int.decode(data)
    if value is not None and not -(1 << 63) <= value <= MAX_INT64:
        raise ProtocolError("instance id out of int64 range")
    return value


_Q = "the Q cache"
_CB = "CacheBlend"
_P2P = "P2P transfers between servers"

UNSUPPORTED: dict[str, _Refused] = {
    r.name: r
    for r in (
        # Q cache: lmcache's server has handlers only with `--enable` of its
        # experimental module, which get_experimental then advertises; lmcd
        # advertises nothing, so clients do not ask.
        _Refused("register_q_cache", 7, "none", _Q),
        _Refused("unregister_q_cache", 1, "none", _Q),
        _Refused("store_q", 4, "none", _Q),
        # CacheBlend: only a blend-engine server registers these handlers;
        # any other leaves them unanswered.
        _Refused("cb_register_rope", 8, "none", _CB),
        _Refused("cb_unregister_rope", 1, "none", _CB),
        _Refused("cb_retrieve_pre_computed", 5, "none", _CB),
        _Refused("cb_unified_lookup", 2, "none", _CB),
        _Refused("cb_protocol_handshake", 1, "none", _CB),
        _Refused("cb_reorder_plan", 3, "none", _CB),
        # P2P is server-to-server. A lookup is never started here, so its
        # task id and results are left unanswered; an unlock of objects
        # that lmcd never locked is acknowledged (None is its declared
        # response, and there is nothing to unlock).
        _Refused("p2p_lookup_and_lock", 2, "none", _P2P),
        _Refused("p2p_query_lookup_results", 1, "none", _P2P),
        _Refused("p2p_unlock_objects", 1, "ack", _P2P),
        # A stream: `[uid, op]` without a frame ends it, and the client then
        # stops its subscription cleanly ("Event subscription ended"). Only
        # sent to servers that advertise `kv_event_stream`; lmcd does not.
        _Refused("subscribe_kv_events", 4, "stream_end", "KV event streams"),
        # lmcache's own plugin router answers an unknown method with this
        # typed failure, which the caller reads as an error at once.
        _Refused("server_module_call", 1, "module_error", "server modules"),
    )
}
"""Operations lmcd refuses, with the reply each gets (see `_Refused.reply`):
"none" leaves it unanswered, as lmcache's server leaves every operation it
has no handler for."""


def operation(message: Message) -> str | None:
    """The operation name a message asks for (None: not one of 0.5.6's)."""
    op = message.op
    if type(op) is int:
        return _BY_ID.get(op)
    if type(op) is str and (op in _OPS or op in UNSUPPORTED):
        return op
    return None


def _payload_count(name: str) -> int:
    op = _OPS.get(name)
    return len(op.limits) if op is not None else UNSUPPORTED[name].payloads


# -- replies ---------------------------------------------------------------------


def _failure_value(response: _Response) -> object:
    if response == "copy":
        return [b"", False]
    if response == "count":
        return 0
    if response == "bool":
        return False
    if response == "str":
        return "ERROR"
    if response == "strs":
        return []
    if response == "pool":
        return {"shm_name": "", "pool_size": 0}
    if response == "prepare_store":
        return {"context": {"slots": [], "chunk_indices": []}}
    if response == "prepare_retrieve":
        return {"success": False, "data": b"", "context": {}}
    return None


def failure_reply(message: Message) -> list[bytes] | None:
    """The reply owed to a request of `message`'s operation that cannot be
    served (None: leave it unanswered).

    Typed failures: store/retrieve `[b"", False]` (empty handle: no device
    work to wait for), query/wait 0 (no hits), commit and ping False,
    get_experimental `[]`, noop "ERROR", a pool registration without a pool
    (`shm_name` "", `pool_size` 0: the worker falls back to the pickle path,
    whose commits lmcd refuses, so it runs uncached), prepare_store "nothing
    to write" (empty
    slots: what lmcache's server answers when it cannot reserve room; the
    engine then skips the copy), prepare_retrieve `success` False. Operations
    whose response is None get the bare `[uid, op]`. get_chunk_size and
    unknown operations are left unanswered: no chunk size is better than a
    wrong one.
    """
    name = operation(message)
    if name is None:
        return None
    refused = UNSUPPORTED.get(name)
    if refused is not None:
        return _refused_reply(message, refused)
    response = _OPS[name].response
    if response == "chunk_size":
        return None
    value = _failure_value(response)
    return message.reply(None if value is None else _encoder.encode(value))


def _refused_reply(message: Message, refused: _Refused) -> list[bytes] | None:
    if refused.reply == "none":
        return None
    if refused.reply == "module_error":
        return message.reply(
            _encoder.encode(
                {
                    "success": False,
                    "payload": b"",
                    "error": "lmcd offers no server modules",
                }
            )
        )
    return message.reply(None)


def decode_request(message: Message) -> Request:
    """Decode the payloads of a 0.5 message whose header decoded.

    Raises `PayloadError` (with `failure_reply`) for an unknown operation,
    a wrong payload count, or a payload that is too large, malformed or out
    of bounds; `Unsupported` (with the reply described at `UNSUPPORTED`) for
    an operation lmcd does not offer or tensors it cannot map.
    """
    name = operation(message)
    if name is None:
        raise PayloadError(f"unknown lmcache 0.5 operation {message.op!r}", None)
    payloads = message.payloads
    refused = UNSUPPORTED.get(name)
    if refused is not None:
        if len(payloads) != refused.payloads:
            raise PayloadError(
                f"{name} takes {refused.payloads} payloads, got {len(payloads)}",
                None,
            )
        raise Unsupported(
            f"{name} ({refused.feature})", _refused_reply(message, refused)
        )
    op = _OPS[name]
    if len(payloads) != len(op.limits):
        raise PayloadError(
            f"{name} takes {len(op.limits)} payloads, got {len(payloads)}",
            failure_reply(message),
        )
    if name == "commit_store" and _is_data(payloads[2]):
        # lmcd offers only its shared-memory pool: the engine wrote the
        # slots and commits with no data. Data is the pickle path, which
        # lmcache's server feeds to torch.load (code execution): refused
        # by its first bytes, never decoded.
        raise Unsupported(
            "commit_store with data (the pickle transfer path)",
            failure_reply(message),
        )
    try:
        _frame_checks(op, payloads)
        return op.decode(payloads)
    except UnsupportedDescriptor as e:
        raise Unsupported(f"{name} with {e.kind} tensors", message.reply(None)) from e
    except (ProtocolError, msgspec.DecodeError, RecursionError) as e:
        raise PayloadError(f"bad {name} payload: {e}", failure_reply(message)) from e


def encode_reply(message: Message, request: Request, result: object) -> list[bytes]:
    """Reply frames for `result`, the outcome of serving `request`.

    The result each operation takes: store/retrieve a `CopyResult` (None
    event handle: the reply's handle is empty), query/wait an int or None
    (still running: no frame), get_chunk_size an int, ping and commits a
    bool, noop a str, get_experimental a list of str, pool registration a
    `PoolInfo`, prepare_store/prepare_retrieve a `PreparedSlots`; anything
    for operations whose response is None (no frame is sent). Raises
    `TypeError` for a result of the wrong kind (a bug in the caller).
    """
    name = operation(message)
    if name is None or name not in _OPS:
        raise TypeError(f"no reply is encoded for operation {message.op!r}")
    response = _OPS[name].response
    value = _reply_value(name, response, result)
    return message.reply(None if value is None else _encoder.encode(value))


def _reply_value(name: str, response: _Response, result: object) -> object:
    if response == "none":
        return None
    if response == "copy":
        if isinstance(result, CopyResult):
            handle = result.event_handle
            return [b"" if handle is None else handle, bool(result.ok)]
    elif response == "count":
        if result is None or _is_int(result):
            return result
    elif response == "chunk_size":
        if _is_int(result):
            return result
    elif response == "bool":
        if isinstance(result, bool):
            return result
    elif response == "str":
        if isinstance(result, str):
            return result
    elif response == "strs":
        if isinstance(result, list | tuple) and all(isinstance(s, str) for s in result):
            return list(result)
    elif response == "pool":
        if isinstance(result, PoolInfo):
            return {"shm_name": result.shm_name, "pool_size": result.pool_size}
    elif response == "prepare_store":
        if isinstance(result, PreparedSlots):
            return {
                "context": {
                    "slots": _slots(result),
                    "chunk_indices": list(result.chunk_indices),
                }
            }
    elif isinstance(result, PreparedSlots):  # prepare_retrieve
        if not result.ok:
            return {"success": False, "data": b"", "context": {}}
        return {"success": True, "data": b"", "context": {"slots": _slots(result)}}
    raise TypeError(f"{name} cannot answer with {type(result).__name__} {result!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _slots(result: PreparedSlots) -> list[dict[str, Any]]:
    return [
        {
            "offset": s.offset,
            "length": s.length,
            "shape": list(s.shape),
            "dtype": s.dtype,
        }
        for s in result.slots
    ]


class Lmcache05:
    """The lmcache 0.5.5-0.5.6 dialect (see the module docstring)."""

    name = NAME

    def plausible(self, message: Message) -> bool:
        name = operation(message)
        return name is not None and len(message.payloads) == _payload_count(name)

    def decode(self, message: Message) -> Request:
        return decode_request(message)

    def encode(self, message: Message, request: Request, result: object) -> list[bytes]:
        return encode_reply(message, request, result)

    def failure(self, message: Message, request: Request | None) -> list[bytes] | None:
        return failure_reply(message)


DIALECT = Lmcache05()
