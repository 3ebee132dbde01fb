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
from collections.abc import Sequence
from typing import Annotated, Literal

import attrs
import msgspec

from lmcd.errors import ProtocolError
from lmcd.wire import tokenkeys as tk
from lmcd.wire.descriptors import (
    UnsupportedDescriptor,
    decode_descriptor,
)
from lmcd.wire.dialect import Message, PayloadError, Unsupported
from lmcd.wire.tokenkeys import (
    BLOCKS_FRAME,
    EMPTY_DATA_FRAME,
    KEY_FRAME,
    MAX_BLOCK_SIZE,
    MAX_INT64,
    MAX_READERS,
    MAX_TOKENS,
    RECORDS_FRAME,
    SMALL_FRAME,
    TENSORS_FRAME,
    Op,
    Response,
)
from lmcd.wire.types import (
    MAX_LAYERS,
    Capabilities,
    Clear,
    CommitRetrieve,
    CommitStore,
    EndSession,
    FreeLookupLocks,
    GetChunkSize,
    Noop,
    Ping,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    Request,
    RetrieveSpan,
    StartLookup,
    StoreSpan,
    TokenSpan,
    UnregisterKVCache,
    UnregisterPool,
)

NAME = "lmcache-0.5"

__all__ = [
    "DIALECT",
    "KEY_FRAME",
    "LEGACY_IDS",
    "MAX_REQUEST_CONFIGS",
    "MAX_TOKENS",
    "MAX_WAIT_SECONDS",
    "NAME",
    "UNSUPPORTED",
    "Lmcache05",
    "decode_request",
    "encode_reply",
    "failure_reply",
    "operation",
]

# -- bounds ---------------------------------------------------------------------

# The bounds shared with lmcache 0.4 are in `lmcd.wire.tokenkeys`.
MAX_REQUEST_CONFIGS = 64
"""Entries of a key's `request_configs` (accepted and ignored)."""
MAX_REQUEST_CONFIGS_BYTES = 64 * 1024
MAX_WAIT_SECONDS = 300.0
"""Longest `wait_prefetch_status` wait (the clients' own default timeout);
a longer one is cut to this, after which the reply is "still running"."""

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


class _Key(tk.KeyFields, forbid_unknown_fields=True):
    """`IPCCacheServerKey` as 0.5.5+ clients send it: lmcache 0.4's key
    fields plus `request_configs` (accepted and ignored) and
    `num_kv_readers` (required, at least 1)."""

    request_configs: (
        Annotated[dict[str, msgspec.Raw], msgspec.Meta(max_length=MAX_REQUEST_CONFIGS)]
        | None
    ) = None
    num_kv_readers: Annotated[int, msgspec.Meta(ge=0, le=MAX_READERS)] = 0


class _Hints(tk.HintFields, forbid_unknown_fields=True):
    """lmcache 0.5's `LayoutHints`."""

    kv_layout: Literal["NHD", "HND", "BLHNC", "BLNHC"] | None = None
    kv_list_layout: Literal["k_v", "unified"] | None = None


class _GroupInfo(tk.GroupInfo, forbid_unknown_fields=True):
    """lmcache's `EngineGroupInfo` (0.5 adds two fields to 0.4.7's)."""

    extra_object_group_tag: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)] = 0
    recurrent_state: bool = False


class _PoolPayload(tk.PoolFields, forbid_unknown_fields=True):
    """`RegisterEngineDrivenContextPayload`."""

    num_physical_slots: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)] | None = (
        None
    )


_ENGINES = frozenset({"vllm", "atom", "sglang", "trtllm", "mock"})

_key = msgspec.msgpack.Decoder(_Key)
_int = tk.int_decoder
_opt_int = msgspec.msgpack.Decoder(int | None)
_str = tk.str_decoder
_bool = tk.bool_decoder
_float = msgspec.msgpack.Decoder(float)
_bytes = tk.bytes_decoder
_hints = msgspec.msgpack.Decoder(_Hints)
_groups = msgspec.msgpack.Decoder(
    Annotated[list[_GroupInfo], msgspec.Meta(max_length=MAX_LAYERS)]
)
_pool = msgspec.msgpack.Decoder(_PoolPayload)
_encoder = msgspec.msgpack.Encoder()

# -- operations -----------------------------------------------------------------

_Op = Op
_Response = Response


@attrs.frozen
class _Refused:
    """An operation lmcd does not offer, with what its client is owed."""

    name: str
    payloads: int
    reply: Literal["none", "ack", "stream_end", "module_error"]
    feature: str
    """What the operation belongs to, for the log line."""


_frame_checks = tk.check_frames
_instance_id = tk.instance_id
_event = tk.event_handle
_request_id = tk.request_id
_model_name = tk.model_name
_block_ids = tk.group_block_ids


def _span(data: bytes, *, empty_ok: bool = False) -> TokenSpan:
    """A key's `TokenSpan`; `empty_ok` turns `start > end` into an empty
    range instead of an error (free_lookup_locks: lmcache's server ignores
    such a range)."""
    key = _key.decode(data)
    if key.num_kv_readers < 1:
        raise ProtocolError(
            "num_kv_readers is missing or 0; lmcd needs an lmcache 0.5.5+ client"
        )
    configs = key.request_configs
    if configs is not None:
        size = sum(len(k) + len(v) for k, v in configs.items())
        if size > MAX_REQUEST_CONFIGS_BYTES:
            raise ProtocolError(f"request_configs of {size} bytes")
    return tk.token_span(key, readers=key.num_kv_readers, empty_ok=empty_ok)


def _register(p: Sequence[bytes]) -> Request:
    return tk.register_kv_cache(
        instance_id=_instance_id(p[0]),
        tensors=tk.tensors_decoder.decode(p[1]),
        tensor=lambda data: decode_descriptor(memoryview(data)),
        model_name=_model_name(p[2]),
        world_size=tk.world_size(p[3]),
        engine=_str.decode(p[4]),
        engines=_ENGINES,
        hints=_hints.decode(p[5]),
        groups=_groups.decode(p[6]),
        pings=True,
    )


def _store(p: Sequence[bytes]) -> Request:
    return StoreSpan(_span(p[0]), _instance_id(p[1]), _block_ids(p[2]), _event(p[3]))


def _retrieve(p: Sequence[bytes]) -> Request:
    span = _span(p[0])
    return RetrieveSpan(
        span,
        _instance_id(p[1]),
        _block_ids(p[2]),
        _event(p[3]),
        skip_tokens=tk.skip_tokens(p[4], span),
    )


def _tp_size(data: bytes) -> None:
    # Sent for payload arity only; lmcache 0.5's server ignores it too.
    tk.tp_size(data)


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
    return tk.register_pool(pool, slots_per_chunk=pool.num_physical_slots)


def _commit_store(p: Sequence[bytes]) -> Request:
    span = _span(p[0])
    instance_id = _instance_id(p[1])
    if _bytes.decode(p[2]) != b"":  # `decode_request` refused data already
        raise ProtocolError("commit_store with data is refused")
    return CommitStore(span, instance_id)


_is_data = tk.is_data
_report = tk.report


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


_failure_value = tk.failure_value


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
    # A copy without device work answers with an empty handle: 0.5.6
    # clients then wait for no event.
    return tk.reply_value(name, response, result, b"")


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
