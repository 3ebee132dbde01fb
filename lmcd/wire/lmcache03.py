"""The lmcache 0.3.10-0.3.13 dialect (and lmcd's own extensions to it).

Types 1-8 as PROTOCOL.md lists them, plus lmcd's STATS (1000), RESET_STATS
(1001) and DROP (1002) (docs/protocol-extensions.md). Keys carry
vLLM's chunk hash; tensors are pickled `CudaIPCWrapper`s (extension code 1,
through the restricted unpickler) or lmcd's host tensors (code 2). No trio,
zmq or torch.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from lmcd.errors import ProtocolError
from lmcd.wire.dialect import Message, PayloadError
from lmcd.wire.types import (
    MAX_BLOCK_IDS_PER_REQUEST,
    MAX_EVENT_HANDLE,
    MAX_EXPANDED_KEYS,
    MAX_KEYS_PER_REQUEST,
    MAX_LAYERS,
    CacheKey,
    Clear,
    CopyResult,
    DropChunks,
    GetChunkSize,
    HostTensorRef,
    Lookup,
    Noop,
    RegisterKVCache,
    Request,
    ResetStats,
    Retrieve,
    Stats,
    Store,
    TensorRef,
    UnregisterKVCache,
)
from lmcd.wire.unpickle import TORCH_DTYPES, load_cuda_ipc_wrapper

NAME = "lmcache-0.3"


class RequestType(enum.IntEnum):
    """Request type values of the lmcache 0.3.10-0.3.13 dialect (+ lmcd's
    extensions from 1000 on)."""

    REGISTER_KV_CACHE = 1
    UNREGISTER_KV_CACHE = 2
    STORE = 3
    RETRIEVE = 4
    LOOKUP = 5
    CLEAR = 6
    GET_CHUNK_SIZE = 7
    NOOP = 8
    STATS = 1000
    RESET_STATS = 1001
    DROP = 1002


# How many payload frames follow `[uid, type]` for each request type.
PAYLOAD_COUNTS: dict[RequestType, int] = {
    RequestType.REGISTER_KV_CACHE: 2,
    RequestType.UNREGISTER_KV_CACHE: 1,
    RequestType.STORE: 4,
    RequestType.RETRIEVE: 4,
    RequestType.LOOKUP: 2,
    RequestType.CLEAR: 0,
    RequestType.GET_CHUNK_SIZE: 0,
    RequestType.NOOP: 0,
    RequestType.STATS: 0,
    RequestType.RESET_STATS: 0,
    RequestType.DROP: 1,
}

EXT_CUDA_IPC_WRAPPER = 1
EXT_HOST_TENSOR = 2

# Bytes one payload frame may hold, checked before it is decoded, so that a
# frame of a million tiny ints cannot make a million Python objects.
MAX_SMALL_FRAME = 64 * 1024
MAX_LIST_FRAME = 4 * 1024 * 1024
MAX_REGISTER_FRAME = 8 * 1024 * 1024


class _HostTensorMsg(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    offset: int
    shape: list[int]
    dtype: str


_int = msgspec.msgpack.Decoder(int)
_bytes = msgspec.msgpack.Decoder(bytes)
_opt_bool = msgspec.msgpack.Decoder(bool | None)
_opt_str = msgspec.msgpack.Decoder(str | None)
_keys = msgspec.msgpack.Decoder(list[CacheKey])
_ints = msgspec.msgpack.Decoder(list[int])
_exts = msgspec.msgpack.Decoder(list[msgspec.msgpack.Ext])
_host = msgspec.msgpack.Decoder(_HostTensorMsg)
_encoder = msgspec.msgpack.Encoder()
_TYPES = {t.value: t for t in RequestType}


def failure_reply(rtype: RequestType, payloads: Sequence[bytes]) -> object:
    """The reply owed to a request of `rtype` that cannot be served.

    LOOKUP: all false; STORE: `[handle, False]`; RETRIEVE: `[handle,
    [False]*n]`, the handle being the client's own where it decodes; `None`
    (no frame) for types whose response is None; a typed zero otherwise.
    """
    if rtype is RequestType.LOOKUP:
        return [False] * _count_keys(payloads, 0)
    if rtype in (RequestType.STORE, RequestType.RETRIEVE):
        handle = b""
        if len(payloads) > 3 and len(payloads[3]) <= MAX_SMALL_FRAME:
            try:
                handle = _bytes.decode(payloads[3])
            except msgspec.DecodeError:
                handle = b""
        if rtype is RequestType.STORE:
            return [handle, False]
        return [handle, [False] * _count_keys(payloads, 0)]
    if rtype is RequestType.GET_CHUNK_SIZE:
        return 0
    if rtype is RequestType.NOOP:
        return "ERROR"
    if rtype is RequestType.STATS:
        return {}
    if rtype is RequestType.RESET_STATS:
        return False
    if rtype is RequestType.DROP:
        return -1
    return None


def _count_keys(payloads: Sequence[bytes], index: int) -> int:
    if len(payloads) <= index:
        return 0
    return min(array_length(payloads[index]), MAX_KEYS_PER_REQUEST)


def array_length(frame: bytes) -> int:
    """The element count in the header of a MessagePack array, 0 if `frame`
    does not start with one.

    Reads only the header, never the elements: a failure reply must not
    decode what just failed to decode (an array nested 100,000 deep makes a
    decoder recurse). The count is capped by the bytes that follow, since
    every element takes at least one.
    """
    if not frame:
        return 0
    head = frame[0]
    if 0x90 <= head <= 0x9F:
        count, start = head & 0x0F, 1
    elif head == 0xDC and len(frame) >= 3:
        count, start = int.from_bytes(frame[1:3], "big"), 3
    elif head == 0xDD and len(frame) >= 5:
        count, start = int.from_bytes(frame[1:5], "big"), 5
    else:
        return 0
    return min(count, len(frame) - start)


def _request_type(message: Message) -> RequestType | None:
    op = message.op
    if type(op) is not int:
        return None
    return _TYPES.get(op)


def decode_request(message: Message) -> Request:
    """Decode the payloads of a message whose header decoded.

    Raises `PayloadError` (with the failure reply owed) when the type is
    unknown or the payloads are of the wrong count, type or size.
    """
    rtype = _request_type(message)
    if rtype is None:
        # The 0.3 client has no unknown types to send; answer with no
        # response frame rather than guess a reply type.
        raise PayloadError(
            f"unknown request type {message.type_frame.hex()}", message.reply(None)
        )
    payloads = message.payloads
    expected = PAYLOAD_COUNTS[rtype]
    if len(payloads) != expected:
        raise PayloadError(
            f"{rtype.name} takes {expected} payloads, got {len(payloads)}",
            _failure(message, rtype),
        )
    try:
        return _DECODERS[rtype](payloads)
    except (ProtocolError, msgspec.DecodeError, RecursionError) as e:
        # RecursionError: a payload nested past a decoder's depth limit.
        raise PayloadError(
            f"bad {rtype.name} payload: {_short(e)}", _failure(message, rtype)
        ) from e


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _failure(message: Message, rtype: RequestType) -> list[bytes]:
    value = failure_reply(rtype, message.payloads)
    return message.reply(None if value is None else _encoder.encode(value))


def _frame(data: bytes, limit: int, what: str) -> bytes:
    if len(data) > limit:
        raise ProtocolError(f"{what} frame is {len(data)} bytes, over {limit}")
    return data


def _decode_keys(data: bytes) -> tuple[CacheKey, ...]:
    keys = _keys.decode(_frame(data, MAX_LIST_FRAME, "keys"))
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise ProtocolError(f"{len(keys)} keys, over {MAX_KEYS_PER_REQUEST}")
    # msgspec checked each field's bounds; what is left spans two fields.
    expanded = 0
    for key in keys:
        worker = key.worker_id
        if worker is None:
            expanded += key.world_size
        elif worker < key.world_size:
            expanded += 1
        else:
            raise ProtocolError(f"worker_id {worker} not in 0..world_size-1")
    if expanded > MAX_EXPANDED_KEYS:
        raise ProtocolError(f"keys expand to {expanded} per-rank keys")
    return tuple(keys)


def _decode_instance_id(data: bytes) -> int:
    value = _int.decode(_frame(data, MAX_SMALL_FRAME, "instance id"))
    if not -(1 << 63) <= value < (1 << 63):
        raise ProtocolError("instance id out of int64 range")
    return value


def _decode_block_ids(data: bytes) -> tuple[int, ...]:
    ids = _ints.decode(_frame(data, MAX_LIST_FRAME, "block ids"))
    if len(ids) > MAX_BLOCK_IDS_PER_REQUEST:
        raise ProtocolError(f"{len(ids)} block ids, over {MAX_BLOCK_IDS_PER_REQUEST}")
    return tuple(ids)


def _decode_event(data: bytes) -> bytes:
    handle = _bytes.decode(_frame(data, MAX_SMALL_FRAME, "event handle"))
    if len(handle) > MAX_EVENT_HANDLE:
        raise ProtocolError("event handle too long")
    return handle


def _decode_tensor(ext: msgspec.msgpack.Ext) -> TensorRef:
    if ext.code == EXT_CUDA_IPC_WRAPPER:
        return load_cuda_ipc_wrapper(bytes(ext.data))
    if ext.code == EXT_HOST_TENSOR:
        msg = _host.decode(ext.data)
        if msg.dtype not in TORCH_DTYPES:
            raise ProtocolError(f"unknown dtype {msg.dtype!r}")
        if not 0 < len(msg.shape) <= 8 or any(d < 0 for d in msg.shape):
            raise ProtocolError("host tensor shape must have 1..8 non-negative dims")
        if msg.offset < 0:
            raise ProtocolError("host tensor offset must be non-negative")
        return HostTensorRef(msg.path, msg.offset, tuple(msg.shape), msg.dtype)
    raise ProtocolError(f"unknown tensor extension code {ext.code}")


def _register(p: Sequence[bytes]) -> Request:
    instance_id = _decode_instance_id(p[0])
    exts = _exts.decode(_frame(p[1], MAX_REGISTER_FRAME, "kv caches"))
    if not 0 < len(exts) <= MAX_LAYERS:
        raise ProtocolError(f"{len(exts)} layers, expected 1..{MAX_LAYERS}")
    return RegisterKVCache(instance_id, tuple(_decode_tensor(e) for e in exts))


def _copy(cls: type[Store] | type[Retrieve]) -> Any:
    def decode(p: Sequence[bytes]) -> Request:
        return cls(
            _decode_keys(p[0]),
            _decode_instance_id(p[1]),
            _decode_block_ids(p[2]),
            _decode_event(p[3]),
        )

    return decode


def _lookup(p: Sequence[bytes]) -> Request:
    lock = _opt_bool.decode(_frame(p[1], MAX_SMALL_FRAME, "lock"))
    return Lookup(_decode_keys(p[0]), bool(lock))


_DECODERS: dict[RequestType, Callable[[Sequence[bytes]], Request]] = {
    RequestType.REGISTER_KV_CACHE: _register,
    RequestType.UNREGISTER_KV_CACHE: lambda p: UnregisterKVCache(
        _decode_instance_id(p[0])
    ),
    RequestType.STORE: _copy(Store),
    RequestType.RETRIEVE: _copy(Retrieve),
    RequestType.LOOKUP: _lookup,
    RequestType.CLEAR: lambda p: Clear(),
    RequestType.GET_CHUNK_SIZE: lambda p: GetChunkSize(),
    RequestType.NOOP: lambda p: Noop(),
    RequestType.STATS: lambda p: Stats(),
    RequestType.RESET_STATS: lambda p: ResetStats(),
    RequestType.DROP: lambda p: DropChunks(
        _opt_str.decode(_frame(p[0], MAX_SMALL_FRAME, "model"))
    ),
}


def encode_reply(message: Message, request: Request, result: object) -> list[bytes]:
    """Reply frames for `result`, the outcome of `request`.

    LOOKUP's result is the hit count (the reply: that many True, then
    False); STORE and RETRIEVE give a `CopyResult` (the reply carries the
    done event's handle, or the client's own when no device work is
    pending); other results are sent as they are (None: no response frame).
    """
    if isinstance(result, CopyResult):
        assert isinstance(request, Store | Retrieve)
        handle = result.event_handle
        if handle is None:
            handle = request.event_handle
        if isinstance(request, Store):
            value: object = [handle, result.ok]
        else:
            n = len(request.keys)
            value = [handle, [True] * result.found + [False] * (n - result.found)]
    elif isinstance(request, Lookup):
        assert isinstance(result, int)
        n = len(request.keys)
        value = [True] * result + [False] * (n - result)
    else:
        value = result
    return message.reply(None if value is None else _encoder.encode(value))


class Lmcache03:
    """The lmcache 0.3.10-0.3.13 dialect (see the module docstring)."""

    name = NAME

    def plausible(self, message: Message) -> bool:
        rtype = _request_type(message)
        return rtype is not None and len(message.payloads) == PAYLOAD_COUNTS[rtype]

    def decode(self, message: Message) -> Request:
        return decode_request(message)

    def encode(self, message: Message, request: Request, result: object) -> list[bytes]:
        return encode_reply(message, request, result)

    def failure(self, message: Message, request: Request | None) -> list[bytes] | None:
        rtype = _request_type(message)
        if rtype is None:
            return message.reply(None)
        return _failure(message, rtype)


DIALECT = Lmcache03()
