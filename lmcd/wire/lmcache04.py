"""The lmcache 0.4.4-0.4.7 dialects: one module, a type table per release.

lmcache 0.4 numbers its request types with `enum.auto()`, so every release
that inserts an operation shifts the ones after it: GET_CHUNK_SIZE is 11 in
0.4.4-0.4.5, 16 in 0.4.6 and 17 in 0.4.7. Each release's table below is
that enum order, and the payloads of each operation are what that release's
`protocols/*.py` declare:

- `lmcache-0.4.4` (0.4.4 and 0.4.5, which share the numbering): REGISTER
  without (0.4.4) or with (0.4.5) the engine type; block ids `list[int]`.
- `lmcache-0.4.6`: adds the non-GPU context, whose chunks travel pickled in
  the messages (COMMIT_STORE's data, PREPARE_RETRIEVE's reply): lmcd reads
  and writes those pickles with `lmcd.wire.tensorpickle`, which runs
  nothing the pickle names. Its registration has no response.
- `lmcache-0.4.7`: REGISTER adds engine groups, block ids become per-group
  `list[list[int]]`, the non-GPU registration answers with a shared-memory
  pool (lmcd always offers its own pool, so 0.4.7 workers never fall back
  to pickles; a COMMIT_STORE with data is refused), and it can unregister.

What the releases share with each other and with 0.5 (the key's fields,
the payload decoders, the reply to each declared response type) is in
`lmcd.wire.tokenkeys`. Where they differ from 0.5, lmcache 0.4's own server
is the reference: a key has no `num_kv_readers` (a lookup takes one read
lock per object, or the tensor-parallel size for MLA, as 0.4's
`compute_extra_count` derives it), PING has no payload and names no worker
(0.4 workers are never reaped), LOOKUP is acknowledged and then polled with
QUERY_PREFETCH_STATUS, QUERY_PREFETCH_LOOKUP_HITS peeks at a lookup without
collecting it, CLEAR has no flag and clears everything (0.4's server
forces it), a copy's reply always carries an event handle (0.4 clients
always import it: the client's own when there is no device work), and
tensor handles are pickled wrappers (`lmcd.wire.unpickle.load_wrapper_04`).

A 0.4 client's shared I/O thread dies on a reply of the wrong type, and
with it every client of the process: every reply here has exactly the type
the release declares, and what lmcd cannot serve is left unanswered (the
client's request times out) rather than answered in another shape.

With `--dialect auto`, 0.4.6 and 0.4.7 send two identical zero-payload
messages: `[16]` (0.4.6 GET_CHUNK_SIZE, 0.4.7 CLEAR) and `[17]` (0.4.6
PING, 0.4.7 GET_CHUNK_SIZE). Every adapter's first message (uid 0) is
GET_CHUNK_SIZE and neither release sends GET_CHUNK_SIZE again, so the uid
decides: uid 0 is a GET_CHUNK_SIZE, a later one is not (`plausible`). A
0.4.6 client that reconnects after a daemon restart is so recognised by its
heartbeat. Sans-IO: no trio, zmq or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import attrs
import msgspec

from lmcd.errors import ProtocolError
from lmcd.wire import tokenkeys as tk
from lmcd.wire.descriptors import UnsupportedDescriptor
from lmcd.wire.dialect import Message, PayloadError, Unsupported
from lmcd.wire.tensorpickle import dump_tensors, load_tensors
from lmcd.wire.tokenkeys import (
    BLOCKS_FRAME,
    EMPTY_DATA_FRAME,
    KEY_FRAME,
    MAX_BLOCK_SIZE,
    RECORDS_FRAME,
    SMALL_FRAME,
    TENSORS_FRAME,
    Op,
    Response,
)
from lmcd.wire.types import (
    MAX_LAYERS,
    Clear,
    CommitRetrieve,
    CommitStore,
    EndSession,
    FreeLookupLocks,
    GetChunkSize,
    HostTensorRef,
    Noop,
    Ping,
    PreparedSlots,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    Request,
    RetrieveSpan,
    StartLookup,
    StoreSpan,
    TensorRef,
    TokenSpan,
    UnregisterKVCache,
    UnregisterPool,
)
from lmcd.wire.unpickle import load_wrapper_04

Release = Literal["0.4.4", "0.4.6", "0.4.7"]
NAMES: dict[Release, str] = {
    "0.4.4": "lmcache-0.4.4",
    "0.4.6": "lmcache-0.4.6",
    "0.4.7": "lmcache-0.4.7",
}

DATA_FRAME = 1 << 30
"""Bytes of an lmcache 0.4.6 COMMIT_STORE's pickled chunks (lmcd's listener
caps whole messages lower; `lmcd.listener`)."""

# -- type tables: the enum order of each release ------------------------------------

_ENGINE = [
    "REGISTER_KV_CACHE",
    "UNREGISTER_KV_CACHE",
    "STORE",
    "RETRIEVE",
    "LOOKUP",
    "QUERY_PREFETCH_STATUS",
    "QUERY_PREFETCH_LOOKUP_HITS",
    "FREE_LOOKUP_LOCKS",
    "END_SESSION",
]
_NON_GPU_046 = [
    "REGISTER_KV_CACHE_NON_GPU_CONTEXT",
    "PREPARE_STORE",
    "COMMIT_STORE",
    "PREPARE_RETRIEVE",
    "COMMIT_RETRIEVE",
]
_NON_GPU_047 = [
    "REGISTER_KV_CACHE_NON_GPU_CONTEXT",
    "UNREGISTER_KV_CACHE_NON_GPU_CONTEXT",
    "PREPARE_STORE",
    "COMMIT_STORE",
    "PREPARE_RETRIEVE",
    "COMMIT_RETRIEVE",
]
_CONTROL = ["CLEAR", "GET_CHUNK_SIZE", "PING", "REPORT_BLOCK_ALLOCATION", "NOOP"]
_BLEND = [
    "CB_REGISTER_KV_CACHE",
    "CB_UNREGISTER_KV_CACHE",
    "CB_STORE_PRE_COMPUTED",
    "CB_LOOKUP_PRE_COMPUTED",
    "CB_RETRIEVE_PRE_COMPUTED",
    "CB_STORE_FINAL",
    "CB_LOOKUP_PRE_COMPUTED_V2",
    "CB_RETRIEVE_PRE_COMPUTED_V2",
]
_BLEND_V3 = [
    "CB_REGISTER_ROPE_V3",
    "CB_UNREGISTER_ROPE_V3",
    "CB_RETRIEVE_PRE_COMPUTED_V3",
    "CB_UNIFIED_LOOKUP",
]
ORDER: dict[Release, list[str]] = {
    "0.4.4": [*_ENGINE, *_CONTROL, *_BLEND],
    "0.4.6": [*_ENGINE, *_NON_GPU_046, *_CONTROL, *_BLEND],
    "0.4.7": [*_ENGINE, *_NON_GPU_047, *_CONTROL, *_BLEND, *_BLEND_V3],
}
"""Each release's `RequestType` members in order (value = index + 1)."""

# CacheBlend, which lmcd does not offer: payload counts, for `plausible`.
_BLEND_PAYLOADS = {
    "CB_REGISTER_KV_CACHE": 4,
    "CB_UNREGISTER_KV_CACHE": 1,
    "CB_STORE_PRE_COMPUTED": 4,
    "CB_LOOKUP_PRE_COMPUTED": 1,
    "CB_RETRIEVE_PRE_COMPUTED": 5,
    "CB_STORE_FINAL": 4,
    "CB_LOOKUP_PRE_COMPUTED_V2": 1,
    "CB_RETRIEVE_PRE_COMPUTED_V2": 5,
    "CB_REGISTER_ROPE_V3": 4,
    "CB_UNREGISTER_ROPE_V3": 1,
    "CB_RETRIEVE_PRE_COMPUTED_V3": 5,
    "CB_UNIFIED_LOOKUP": 2,
}

# -- wire shapes ------------------------------------------------------------------


class _Hints(tk.HintFields, forbid_unknown_fields=True):
    """lmcache 0.4's `LayoutHints`."""

    kv_layout: Literal["NHD", "HND"] | None = None
    # 0.4.5-0.4.6: the engine's logical block size (a compressed layout's).
    inference_engine_logical_block_size: (
        Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)] | None
    ) = None


_ENGINES = frozenset({"vllm", "sglang", "trtllm", "mock"})

_key = msgspec.msgpack.Decoder(tk.KeyFields)
_hints = msgspec.msgpack.Decoder(_Hints | None)
_groups = msgspec.msgpack.Decoder(
    Annotated[list[tk.GroupInfo], msgspec.Meta(max_length=MAX_LAYERS)]
)
_pool = msgspec.msgpack.Decoder(tk.PoolFields)
_encoder = msgspec.msgpack.Encoder()


def _span(data: bytes, *, tp_size: int = 1, empty_ok: bool = False) -> TokenSpan:
    """A key's span. A lookup's read locks per object: one, or for MLA
    (a tensor-parallel size above the key's world size, which vLLM divides
    by it) one per tensor-parallel rank (lmcache 0.4's
    `compute_extra_count`)."""
    key = _key.decode(data)
    tp = tp_size if tp_size > 1 else key.world_size
    readers = tp if tp > key.world_size else 1
    return tk.token_span(key, readers=readers, empty_ok=empty_ok)


def _register(p: Sequence[bytes], *, engine: bool, groups: bool) -> Request:
    rest = list(p[4:])
    engine_type = tk.str_decoder.decode(rest.pop(0)) if engine else None

    def tensor(data: bytes) -> TensorRef:
        ref = load_wrapper_04(data)
        if isinstance(ref, HostTensorRef) and engine_type in (None, "vllm"):
            return _vllm_cpu_view(ref)
        return ref

    return tk.register_kv_cache(
        instance_id=tk.instance_id(p[0]),
        tensors=tk.tensors_decoder.decode(p[1]),
        tensor=tensor,
        model_name=tk.model_name(p[2]),
        world_size=tk.world_size(p[3]),
        engine=engine_type,
        engines=_ENGINES,
        hints=_hints.decode(rest.pop(0)),
        groups=_groups.decode(rest.pop(0)) if groups else [],
        # lmcache 0.4's heartbeat names no instance: never reaped.
        pings=False,
    )


def _vllm_cpu_view(ref: HostTensorRef) -> HostTensorRef:
    """lmcache 0.4 reads every vLLM KV cache on a CPU as HND (`[2, blocks,
    heads, block size, head size]`: vLLM's CPU attention backend), whatever
    its shape says; its own server gathers and scatters it so. The neutral
    reference names the same memory in vLLM's usual order (`[2, blocks,
    block size, heads, head size]`), which is contiguous only where heads
    or block size is 1: lmcd's host path serves no other, so any other is
    refused here, with the setting that avoids it, rather than misread."""
    if len(ref.shape) != 5:
        return ref  # MLA: [blocks, block size, latent], no heads to order
    stride = ref.stride
    if stride is None:
        stride = _row_major(ref.shape)
    two, blocks, heads, block_size, head = ref.shape
    shape = (two, blocks, block_size, heads, head)
    strides = (stride[0], stride[1], stride[3], stride[2], stride[4])
    if not _contiguous(shape, strides):
        raise UnsupportedDescriptor(
            "cpu_shm_hnd",
            "lmcache 0.4 reads a vLLM CPU KV cache as HND ([2, blocks, heads, "
            "block size, head size]), which lmcd's host path does not map; run "
            "the worker with lmcache.mp.mp_transfer_mode=data (the default for "
            "CPU KV caches), which lmcd serves through its shared-memory pool",
        )
    return attrs.evolve(ref, shape=shape, stride=strides)


def _contiguous(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Row-major contiguous, the stride of a dimension of size 1 free."""
    expected = 1
    for dim, step in zip(reversed(shape), reversed(strides), strict=True):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


def _row_major(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _block_ids(release: Release, data: bytes) -> tuple[tuple[int, ...], ...]:
    if release == "0.4.7":
        return tk.group_block_ids(data)
    return tk.flat_block_ids(data)


def _lookup_span(p: Sequence[bytes], *, empty_ok: bool = False) -> TokenSpan:
    return _span(p[0], tp_size=tk.tp_size(p[1]), empty_ok=empty_ok)


def _commit_store(release: Release, p: Sequence[bytes]) -> Request:
    span = _span(p[0])
    instance_id = tk.instance_id(p[1])
    if release != "0.4.6":
        if tk.bytes_decoder.decode(p[2]) != b"":  # refused before, by header
            raise ProtocolError("COMMIT_STORE with data is refused")
        return CommitStore(span, instance_id)
    data = msgspec.msgpack.decode(p[2], type=memoryview)
    return CommitStore(
        span, instance_id, chunks=load_tensors(data, max_bytes=DATA_FRAME)
    )


def _ops(release: Release) -> dict[str, list[Op]]:
    """Every operation of `release` that lmcd serves, by name (REGISTER of
    0.4.4-0.4.5 has two shapes)."""
    S, K = SMALL_FRAME, KEY_FRAME

    def store(p: Sequence[bytes]) -> Request:
        return StoreSpan(
            _span(p[0]),
            tk.instance_id(p[1]),
            _block_ids(release, p[2]),
            tk.event_handle(p[3]),
        )

    def retrieve(p: Sequence[bytes]) -> Request:
        span = _span(p[0])
        return RetrieveSpan(
            span,
            tk.instance_id(p[1]),
            _block_ids(release, p[2]),
            tk.event_handle(p[3]),
            skip_tokens=tk.skip_tokens(p[4], span),
        )

    def register_pool(p: Sequence[bytes]) -> Request:
        return tk.register_pool(
            _pool.decode(p[0]), pings=False, inline=release == "0.4.6"
        )

    ops = [
        Op(
            "UNREGISTER_KV_CACHE",
            (S,),
            "none",
            lambda p: UnregisterKVCache(tk.instance_id(p[0])),
        ),
        Op("STORE", (K, S, BLOCKS_FRAME, S), "copy", store),
        Op("RETRIEVE", (K, S, BLOCKS_FRAME, S, S), "copy", retrieve),
        Op("LOOKUP", (K, S), "none", lambda p: StartLookup(_lookup_span(p))),
        Op(
            "QUERY_PREFETCH_STATUS",
            (S,),
            "count",
            lambda p: QueryLookup(tk.request_id(p[0])),
        ),
        Op(
            "QUERY_PREFETCH_LOOKUP_HITS",
            (S,),
            "count",
            lambda p: QueryLookup(tk.request_id(p[0]), peek=True),
        ),
        Op(
            "FREE_LOOKUP_LOCKS",
            (K, S),
            "none",
            lambda p: FreeLookupLocks(_lookup_span(p, empty_ok=True)),
        ),
        Op("END_SESSION", (S,), "none", lambda p: EndSession(tk.request_id(p[0]))),
        Op("CLEAR", (), "none", lambda p: Clear(force=True)),
        Op("GET_CHUNK_SIZE", (), "chunk_size", lambda p: GetChunkSize()),
        Op("PING", (), "bool", lambda p: Ping()),
        Op("REPORT_BLOCK_ALLOCATION", (S, S, RECORDS_FRAME), "none", tk.report),
        Op("NOOP", (), "str", lambda p: Noop()),
    ]
    if release == "0.4.4":
        ops += [
            # 0.4.4: [id, tensors, model, world size, hints]; 0.4.5 adds the
            # engine type before the hints.
            Op(
                "REGISTER_KV_CACHE",
                (S, TENSORS_FRAME, S, S, S),
                "none",
                lambda p: _register(p, engine=False, groups=False),
            ),
            Op(
                "REGISTER_KV_CACHE",
                (S, TENSORS_FRAME, S, S, S, S),
                "none",
                lambda p: _register(p, engine=True, groups=False),
            ),
        ]
    else:
        inline = release == "0.4.6"
        ops += [
            Op(
                "REGISTER_KV_CACHE",
                (S, TENSORS_FRAME, S, S, S, S, *((S,) if not inline else ())),
                "none",
                lambda p: _register(p, engine=True, groups=not inline),
            ),
            # 0.4.6 declares no response to its registration.
            Op(
                "REGISTER_KV_CACHE_NON_GPU_CONTEXT",
                (S,),
                "none" if inline else "pool",
                register_pool,
            ),
            Op(
                "PREPARE_STORE",
                (K, S),
                "inline_prepare_store" if inline else "prepare_store",
                lambda p: PrepareStore(_span(p[0]), tk.instance_id(p[1])),
            ),
            Op(
                "COMMIT_STORE",
                (K, S, DATA_FRAME if inline else EMPTY_DATA_FRAME),
                "bool",
                lambda p: _commit_store(release, p),
            ),
            Op(
                "PREPARE_RETRIEVE",
                (K, S),
                "inline_prepare_retrieve" if inline else "prepare_retrieve",
                lambda p: PrepareRetrieve(_span(p[0]), tk.instance_id(p[1])),
            ),
            Op(
                "COMMIT_RETRIEVE",
                (K, S),
                "bool",
                lambda p: CommitRetrieve(_span(p[0]), tk.instance_id(p[1])),
            ),
        ]
    if release == "0.4.7":
        ops.append(
            Op(
                "UNREGISTER_KV_CACHE_NON_GPU_CONTEXT",
                (S,),
                "none",
                lambda p: UnregisterPool(tk.instance_id(p[0])),
            )
        )
    table: dict[str, list[Op]] = {}
    for op in ops:
        table.setdefault(op.name, []).append(op)
    return table


@attrs.frozen
class _Entry:
    """A type value of a release: its operation, the shapes lmcd serves
    (none: refused), and the payload counts the release sends."""

    name: str
    ops: tuple[Op, ...]
    counts: frozenset[int]


def _table(release: Release) -> dict[int, _Entry]:
    ops = _ops(release)
    table = {}
    for value, name in enumerate(ORDER[release], start=1):
        shapes = tuple(ops.get(name, ()))
        if shapes:
            counts = frozenset(len(op.limits) for op in shapes)
        else:
            counts = frozenset({_BLEND_PAYLOADS[name]})
        table[value] = _Entry(name, shapes, counts)
    return table


# -- the dialect -------------------------------------------------------------------

# `plausible` is asked only about a connection's first message (or the
# first after a daemon restart, when the client reconnects and resumes).
# Every 0.4 adapter's first message (uid 0) is GET_CHUNK_SIZE, which it
# never sends again. So the zero-payload messages that 0.4.6 and 0.4.7 both
# send are told apart by the uid: GET_CHUNK_SIZE only at uid 0, PING and
# CLEAR never (see the module docstring); and END_SESSION is never at uid 0,
# which leaves a fresh lmcache 0.5 client's `[0, 9, request_id]` (its
# query_prefetch_status) to 0.5. Other shared shapes (a later `[9, id]`,
# `[10, context]`, `[14, key, id]`) stay ambiguous: held until the
# connection binds (`DialectRouter.admit`; a 0.4 heartbeat binds within one
# interval), as a reply of another release's type would kill the client.
_FIRST_ONLY = {"0.4.7": frozenset({"GET_CHUNK_SIZE"})}
_NEVER_FIRST: dict[str, frozenset[str]] = {
    "0.4.4": frozenset({"END_SESSION"}),
    "0.4.6": frozenset({"PING", "END_SESSION"}),
    "0.4.7": frozenset({"CLEAR", "END_SESSION"}),
}

_uid_decoder = msgspec.msgpack.Decoder(int)


def _uid(message: Message) -> int:
    return _uid_decoder.decode(message.uid)  # `parse` checked it decodes


@attrs.define(slots=True, eq=False)
class Lmcache04:
    """One lmcache 0.4 release line's dialect (see the module docstring).
    Holds only its immutable type table, so one instance serves every
    connection."""

    release: Release
    name: str
    _table: dict[int, _Entry] = attrs.field(repr=False)

    @classmethod
    def of(cls, release: Release) -> Lmcache04:
        return cls(release, NAMES[release], _table(release))

    def operation(self, message: Message) -> str | None:
        """The operation a message asks for (None: not one of this release's)."""
        entry = self._entry(message)
        return None if entry is None else entry.name

    def _entry(self, message: Message) -> _Entry | None:
        op = message.op
        if type(op) is not int:
            return None
        return self._table.get(op)

    def plausible(self, message: Message) -> bool:
        entry = self._entry(message)
        if entry is None or len(message.payloads) not in entry.counts:
            return False
        first = _uid(message) == 0
        if first and entry.name in _NEVER_FIRST.get(self.release, ()):
            return False
        return first or entry.name not in _FIRST_ONLY.get(self.release, ())

    def decode(self, message: Message) -> Request:
        """Decode the payloads of a message whose header decoded.

        Raises `PayloadError` (with `failure`'s reply) for an unknown type
        value, a wrong payload count, or a payload that is too large,
        malformed or out of bounds; `Unsupported` for an operation lmcd
        does not offer (left unanswered) and tensors it cannot map (the
        registration is answered, as its declared response is None).
        """
        entry = self._entry(message)
        if entry is None:
            raise PayloadError(f"unknown {self.name} request type {message.op!r}", None)
        payloads = message.payloads
        if not entry.ops:
            if len(payloads) not in entry.counts:
                raise PayloadError(f"{entry.name} with {len(payloads)} payloads", None)
            raise Unsupported(f"{entry.name} (CacheBlend)", None)
        op = next((o for o in entry.ops if len(o.limits) == len(payloads)), None)
        if op is None:
            raise PayloadError(
                f"{entry.name} takes {sorted(entry.counts)} payloads, got "
                f"{len(payloads)}",
                self.failure(message, None),
            )
        if (
            op.name == "COMMIT_STORE"
            and self.release == "0.4.7"
            and tk.is_data(payloads[2])
        ):
            # The pickle path, which a 0.4.7 worker takes only when the
            # server offers no pool; lmcd always does.
            raise Unsupported(
                "COMMIT_STORE with data (the pickle transfer path)",
                self.failure(message, None),
            )
        try:
            tk.check_frames(op, payloads)
            return op.decode(payloads)
        except UnsupportedDescriptor as e:
            raise Unsupported(
                f"{entry.name} with {e.kind} tensors", message.reply(None)
            ) from e
        except (ProtocolError, msgspec.DecodeError, RecursionError) as e:
            raise PayloadError(
                f"bad {entry.name} payload: {e}", self.failure(message, None)
            ) from e

    def _response(self, message: Message) -> tuple[str, Response] | None:
        entry = self._entry(message)
        if entry is None or not entry.ops:
            return None
        return entry.name, entry.ops[0].response

    def encode(self, message: Message, request: Request, result: object) -> list[bytes]:
        """Reply frames for `result`, the outcome of serving `request` (the
        results `lmcd.wire.tokenkeys.reply_value` takes; an inline
        PREPARE_RETRIEVE a `PreparedSlots` with its chunks). Raises
        `TypeError` for a result of the wrong kind (a bug in the caller)."""
        found = self._response(message)
        if found is None:
            raise TypeError(f"no reply is encoded for {self.name} type {message.op!r}")
        name, response = found
        value: object
        if response == "inline_prepare_store":
            value = {"context": {}}
        elif response == "inline_prepare_retrieve":
            if not isinstance(result, PreparedSlots):
                raise TypeError(f"{name} cannot answer with {result!r}")
            if not result.ok or not result.chunks:
                value = tk.failure_value(response)
            else:
                data = dump_tensors(result.chunks)
                value = {"success": True, "data": data, "context": {}}
        else:
            value = tk.reply_value(name, response, result, _handle(request))
        return message.reply(None if value is None else _encoder.encode(value))

    def failure(self, message: Message, request: Request | None) -> list[bytes] | None:
        """The reply owed to a request that cannot be served: its declared
        response's typed failure (a copy: the client's own event handle and
        False; a count 0; a bool False; the pool registration no pool; a
        prepare nothing), the bare `[uid, type]` where the response is None,
        and nothing for GET_CHUNK_SIZE (no chunk size is better than a
        wrong one) or a type this release does not have."""
        found = self._response(message)
        if found is None:
            return None
        _, response = found
        if response == "chunk_size":
            return None
        handle = _handle(request)
        if request is None and response == "copy":
            handle = _event_of(message.payloads)
        value = tk.failure_value(response, handle)
        return message.reply(None if value is None else _encoder.encode(value))


def _handle(request: Request | None) -> bytes:
    if isinstance(request, StoreSpan | RetrieveSpan):
        return request.event_handle
    return b""


def _event_of(payloads: Sequence[bytes]) -> bytes:
    """The event handle of an undecodable STORE or RETRIEVE, if it decodes."""
    if len(payloads) < 4 or len(payloads[3]) > SMALL_FRAME:
        return b""
    try:
        return tk.event_handle(payloads[3])
    except (ProtocolError, msgspec.DecodeError):
        return b""


LMCACHE_044 = Lmcache04.of("0.4.4")
LMCACHE_046 = Lmcache04.of("0.4.6")
LMCACHE_047 = Lmcache04.of("0.4.7")
DIALECTS = (LMCACHE_044, LMCACHE_046, LMCACHE_047)
