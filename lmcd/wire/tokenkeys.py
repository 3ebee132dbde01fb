"""What lmcache's token-addressed dialects share (0.4.4-0.4.7 and 0.5).

Since lmcache 0.4 a key names a range `[start, end)` of a request's prompt
and carries the whole prompt's token ids; the daemon hashes the chunks. The
releases differ in their type numbers, in a few key fields and in the shape
of some payloads, but they agree on most of the rest: the key's common
fields and their bounds, the payload decoders (instance ids, request ids,
block ids, event handles, engine groups, the engine-driven registration,
block-allocation records), the per-frame size limits checked before
anything is decoded, and the reply each declared response type gets. Those
live here; each dialect module keeps its own type table and what is its
alone.

Sans-IO: no trio, zmq or torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import attrs
import msgspec

from lmcd.errors import ProtocolError
from lmcd.tokens import check_token_ids
from lmcd.transfer.layouts import DTYPE_SIZES
from lmcd.wire.types import (
    MAX_BLOCK_IDS_PER_REQUEST,
    MAX_EVENT_HANDLE,
    MAX_LAYERS,
    MAX_MODEL_NAME,
    MAX_WORLD_SIZE,
    CopyResult,
    EngineGroup,
    LayoutHints,
    PoolInfo,
    PreparedSlots,
    RegisterKVCache,
    RegisterPool,
    ReportBlockAllocation,
    Request,
    TensorRef,
    TokenSpan,
)

# -- bounds ---------------------------------------------------------------------

MAX_TOKENS = 1 << 21
"""Tokens one key may carry: a 2M-token prompt (every key carries the
request's whole prompt, so this is the longest prompt lmcd serves)."""
MAX_REQUEST_ID = 1024
MAX_SALT = 128
"""lmcache's own `cache_salt` limit (characters)."""
SALT_FORBIDDEN = frozenset("@/\\\x00")
MAX_READERS = MAX_WORLD_SIZE
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

Count = Annotated[int, msgspec.Meta(ge=0)]

# -- keys -------------------------------------------------------------------------


class KeyFields(msgspec.Struct, forbid_unknown_fields=True):
    """The key fields of every token-addressed release since 0.4.4, by name
    (lmcache 0.4's `IPCCacheEngineKey`; 0.5 adds fields in a subclass).

    Unknown fields are refused rather than ignored: a key of another
    release line must not be half-read.
    """

    model_name: Annotated[str, msgspec.Meta(max_length=MAX_MODEL_NAME)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
    worker_id: Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD_SIZE)] | None
    # Each id's range is checked by `check_token_ids` (faster than here).
    token_ids: Annotated[tuple[int, ...], msgspec.Meta(max_length=MAX_TOKENS)]
    start: Count
    end: Count
    request_id: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID)]
    cache_salt: Annotated[str, msgspec.Meta(max_length=MAX_SALT)] = ""


def token_span(key: KeyFields, *, readers: int, empty_ok: bool = False) -> TokenSpan:
    """The `TokenSpan` of a decoded key, each lookup taking `readers` read
    locks per object. `empty_ok` turns `start > end` into an empty range
    instead of an error (free_lookup_locks: lmcache's servers ignore such a
    range). Raises `ProtocolError` for ids out of range, a range past the
    tokens, a bad salt or a reader count out of bounds."""
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
    if not 1 <= readers <= MAX_READERS:
        raise ProtocolError(f"{readers} readers per object, not 1..{MAX_READERS}")
    salt = key.cache_salt
    if SALT_FORBIDDEN.intersection(salt):
        raise ProtocolError(f"cache_salt {salt!r} contains @, /, \\ or NUL")
    return TokenSpan(
        model_name=key.model_name,
        world_size=key.world_size,
        worker_id=key.worker_id,
        token_ids=key.token_ids,
        start=start,
        end=end,
        request_id=key.request_id,
        salt=salt,
        readers=readers,
    )


# -- payload decoders ---------------------------------------------------------------

int_decoder = msgspec.msgpack.Decoder(int)
str_decoder = msgspec.msgpack.Decoder(str)
bool_decoder = msgspec.msgpack.Decoder(bool)
bytes_decoder = msgspec.msgpack.Decoder(bytes)
_group_ids = msgspec.msgpack.Decoder(list[list[int]])
_flat_ids = msgspec.msgpack.Decoder(list[int])


def instance_id(data: bytes) -> int:
    value = int_decoder.decode(data)
    if not -(1 << 63) <= value <= MAX_INT64:
        raise ProtocolError("instance id out of int64 range")
    return value


def request_id(data: bytes) -> str:
    value = str_decoder.decode(data)
    if len(value) > MAX_REQUEST_ID:
        raise ProtocolError("request id too long")
    return value


def model_name(data: bytes) -> str:
    value = str_decoder.decode(data)
    if len(value) > MAX_MODEL_NAME:
        raise ProtocolError("model name too long")
    return value


def world_size(data: bytes) -> int:
    value = int_decoder.decode(data)
    if not 1 <= value <= MAX_WORLD_SIZE:
        raise ProtocolError(f"world_size {value} out of range")
    return value


def event_handle(data: bytes) -> bytes:
    handle = bytes_decoder.decode(data)
    if len(handle) > MAX_EVENT_HANDLE:
        raise ProtocolError("event handle too long")
    return handle


def _check_ids(groups: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
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


def group_block_ids(data: bytes) -> tuple[tuple[int, ...], ...]:
    """Block ids per KV-cache group (`list[list[int]]`, lmcache 0.4.7+)."""
    return _check_ids(_group_ids.decode(data))


def flat_block_ids(data: bytes) -> tuple[tuple[int, ...], ...]:
    """Block ids of a single-group engine (`list[int]`, lmcache 0.4.4-0.4.6),
    as the one group they are."""
    return _check_ids([_flat_ids.decode(data)])


def skip_tokens(data: bytes, span: TokenSpan) -> int:
    """`skip_first_n_tokens`, within the span's range."""
    skip = int_decoder.decode(data)
    tokens = span.end - span.start
    if not 0 <= skip <= tokens:
        raise ProtocolError(
            f"skip_first_n_tokens {skip} outside the {tokens}-token range"
        )
    return skip


def tp_size(data: bytes) -> int:
    """A lookup's tensor-parallel size (at most the largest world size)."""
    value = int_decoder.decode(data)
    if not -MAX_WORLD_SIZE <= value <= MAX_WORLD_SIZE:
        raise ProtocolError(f"tp_size {value} out of range")
    return value


class GroupInfo(msgspec.Struct, forbid_unknown_fields=True):
    """lmcache's `EngineGroupInfo` as 0.4.7 sends it (0.5 adds fields)."""

    engine_group_id: Annotated[int, msgspec.Meta(ge=0, lt=MAX_LAYERS)]
    layer_indices: Annotated[
        tuple[Annotated[int, msgspec.Meta(ge=0, lt=MAX_LAYERS)], ...],
        msgspec.Meta(max_length=MAX_LAYERS),
    ] = ()
    tokens_per_block: Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCK_SIZE)] = 0
    sw_size_tokens: Annotated[int, msgspec.Meta(ge=-1, le=MAX_INT64)] = -1


def engine_groups(infos: Sequence[GroupInfo], layers: int) -> tuple[EngineGroup, ...]:
    """The neutral groups of `infos` for an engine of `layers` layers.
    Raises `ProtocolError` when a group names a layer that does not exist
    or that another group has, or has a zero-token sliding window."""
    seen: set[int] = set()
    groups = []
    for info in infos:
        for layer in info.layer_indices:
            if layer >= layers or layer in seen:
                raise ProtocolError(
                    f"group {info.engine_group_id} names layer {layer} of "
                    f"{layers}, or one another group has"
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
                extra_tag=getattr(info, "extra_object_group_tag", 0),
                recurrent=getattr(info, "recurrent_state", False),
            )
        )
    return tuple(groups)


class HintFields(msgspec.Struct, forbid_unknown_fields=True):
    """lmcache's `LayoutHints` TypedDict, every key optional: the keys every
    release sends (each dialect's subclass adds its `kv_layout` values and
    its own keys)."""

    num_kv_heads: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] | None = None
    tokens_per_block: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)] | None = (
        None
    )
    head_dim: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] | None = None


tensors_decoder = msgspec.msgpack.Decoder(
    Annotated[list[msgspec.msgpack.Ext], msgspec.Meta(max_length=MAX_LAYERS)]
)
"""A registration's KV tensors: one extension (code 1) per layer."""


def register_kv_cache(
    *,
    instance_id: int,
    tensors: Sequence[msgspec.msgpack.Ext],
    tensor: Callable[[bytes], TensorRef],
    model_name: str,
    world_size: int,
    engine: str | None,
    engines: frozenset[str],
    hints: HintFields | None,
    groups: Sequence[GroupInfo],
    pings: bool,
) -> RegisterKVCache:
    """The neutral REGISTER_KV_CACHE of lmcache 0.4 and 0.5: `tensor` reads
    one tensor extension's data (each release its own encoding); `engine`
    (None: the release does not send it) must be one of `engines`;
    `pings`: whether the client's heartbeat names the instance (0.5), so
    that lmcd may reap it when the heartbeat stops.

    Raises `ProtocolError` for an unknown engine, no tensors, an extension
    of another code, a group naming a missing layer, and whatever `tensor`
    raises.
    """
    if engine is not None and engine not in engines:
        raise ProtocolError(f"unknown engine type {engine!r}")
    if not tensors:
        raise ProtocolError("REGISTER_KV_CACHE without KV tensors")
    layers = []
    for ext in tensors:
        if ext.code != 1:
            raise ProtocolError(f"tensor extension code {ext.code}, expected 1")
        layers.append(tensor(bytes(ext.data)))
    h = hints if hints is not None else HintFields()
    return RegisterKVCache(
        instance_id=instance_id,
        layers=tuple(layers),
        model_name=model_name,
        world_size=world_size,
        groups=engine_groups(groups, len(layers)),
        # A known instance registering again only refreshes it (lmcache's
        # servers skip it).
        refresh=True,
        pings=pings,
        engine=engine,
        hints=LayoutHints(
            kv_layout=getattr(h, "kv_layout", None),
            num_kv_heads=h.num_kv_heads,
            tokens_per_block=h.tokens_per_block,
            kv_list_layout=getattr(h, "kv_list_layout", None),
            head_dim=h.head_dim,
        ),
    )


class PoolFields(msgspec.Struct, forbid_unknown_fields=True):
    """`RegisterNonGpuContextPayload` of lmcache 0.4.6-0.4.7 (0.5's
    engine-driven registration adds a field)."""

    instance_id: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=MAX_INT64)]
    model_name: Annotated[str, msgspec.Meta(max_length=MAX_MODEL_NAME)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
    block_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)]
    num_layers: Annotated[int, msgspec.Meta(ge=1, le=MAX_LAYERS)]
    hidden_dim_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_HIDDEN)]
    dtype_str: Annotated[str, msgspec.Meta(max_length=64)]
    use_mla: bool


def register_pool(
    pool: PoolFields,
    *,
    slots_per_chunk: int | None = None,
    pings: bool = True,
    inline: bool = False,
) -> RegisterPool:
    """The neutral engine-driven registration (see `RegisterPool`)."""
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
        slots_per_chunk=slots_per_chunk,
        pings=pings,
        inline=inline,
    )


class _Record(msgspec.Struct, forbid_unknown_fields=True):
    """`BlockAllocationRecord`."""

    req_id: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID)]
    new_block_ids: list[int]
    new_token_ids: list[int]


_records = msgspec.msgpack.Decoder(
    Annotated[list[_Record], msgspec.Meta(max_length=MAX_RECORDS)]
)


def report(p: Sequence[bytes]) -> Request:
    """REPORT_BLOCK_ALLOCATION `[instance_id, model_name, records]`."""
    return ReportBlockAllocation(
        instance_id(p[0]), model_name(p[1]), len(_records.decode(p[2]))
    )


# -- operation tables ---------------------------------------------------------------

Response = Literal[
    "none",  # no response frame
    "copy",  # [event handle, ok]
    "count",  # int, or no frame while running
    "chunk_size",  # int
    "bool",
    "str",
    "strs",  # list[str]
    "pool",  # {shm_name, pool_size}
    "prepare_store",  # {context: {slots, chunk_indices}}
    "prepare_retrieve",  # {success, data: b"", context: {slots}}
    "inline_prepare_store",  # {context: {}}: lmcache 0.4.6's pickle transport
    "inline_prepare_retrieve",  # {success, data: pickled tensors, context: {}}
]
"""What a client declares as an operation's response: this fixes both the
reply to a result and the failure reply."""

Decode = Callable[[Sequence[bytes]], Request]


@attrs.frozen
class Op:
    """One operation of a dialect: its name, the byte limit of each payload
    frame (checked before decoding), its declared response and its decoder."""

    name: str
    limits: tuple[int, ...]
    response: Response
    decode: Decode


def check_frames(op: Op, payloads: Sequence[bytes]) -> None:
    """Raise `ProtocolError` when a payload frame is over its limit."""
    for i, (data, limit) in enumerate(zip(payloads, op.limits, strict=True)):
        if len(data) > limit:
            raise ProtocolError(
                f"payload {i} of {op.name} is {len(data)} bytes, over {limit}"
            )


# An empty MessagePack bin in each of its three encodings.
EMPTY_BINS = frozenset({b"\xc4\x00", b"\xc5\x00\x00", b"\xc6\x00\x00\x00\x00"})


def is_data(frame: bytes) -> bool:
    """Whether `frame` is a non-empty MessagePack bin (by its header)."""
    return frame[:1] in (b"\xc4", b"\xc5", b"\xc6") and frame not in EMPTY_BINS


# -- replies -------------------------------------------------------------------------


def failure_value(response: Response, handle: bytes = b"") -> object:
    """The typed failure for `response` (None: no frame); `handle` is the
    event handle of a failed copy's reply."""
    if response == "copy":
        return [handle, False]
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
    if response == "inline_prepare_store":
        return {"context": {}}
    if response in ("prepare_retrieve", "inline_prepare_retrieve"):
        return {"success": False, "data": b"", "context": {}}
    return None


def reply_value(
    name: str, response: Response, result: object, handle: bytes = b""
) -> object:
    """The response value for `result` (None: no frame). A copy whose
    result carries no event handle (no device work) answers with `handle`.
    Raises `TypeError` for a result of the wrong kind (a bug in the
    caller). The inline kinds are their dialect's to encode."""
    if response == "none":
        return None
    if response == "copy":
        if isinstance(result, CopyResult):
            event = result.event_handle
            return [handle if event is None else event, bool(result.ok)]
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
    elif response == "prepare_retrieve" and isinstance(result, PreparedSlots):
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
