"""The neutral types every dialect decodes into: keys, tensor references,
requests and results.

Handlers, scheduler and storage see only these; a dialect module
(`lmcd.wire.lmcache03`, `lmcd.wire.lmcache05`, ...) turns its frames into
them and their results back into its reply shapes. Nothing here imports
trio, zmq or torch.
"""

from __future__ import annotations

from typing import Annotated, TypeAlias

import attrs
import msgspec

# Caps on what one message can make the daemon allocate. A key with a nil
# worker id expands to `world_size` per-rank keys, so both are bounded.
MAX_WORLD_SIZE = 1024
MAX_KEYS_PER_REQUEST = 65_536
MAX_BLOCK_IDS_PER_REQUEST = 1 << 20
MAX_EXPANDED_KEYS = 1 << 20
MAX_LAYERS = 4096
MAX_MODEL_NAME = 1024
MAX_CHUNK_HASH = 1024
MAX_EVENT_HANDLE = 1024


class CacheKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One chunk of one rank's KV cache (lmcache's `IPCCacheEngineKey`).

    A msgspec Struct rather than an attrs class: it is decoded straight from
    the wire and used as a dict key on the hot path, hashable and without a
    conversion step. `worker_id` None means "every rank 0..world_size-1".
    """

    # Bounds are checked by msgspec while decoding, in C.
    model_name: Annotated[str, msgspec.Meta(max_length=MAX_MODEL_NAME)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
    worker_id: Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD_SIZE)] | None
    chunk_hash: Annotated[bytes, msgspec.Meta(max_length=MAX_CHUNK_HASH)]

    def ranks(self) -> list[CacheKey]:
        """The per-rank keys this key stands for (itself when it names a rank)."""
        if self.worker_id is not None:
            return [self]
        replace = msgspec.structs.replace
        return [replace(self, worker_id=rank) for rank in range(self.world_size)]


class TokenKey(CacheKey, frozen=True):
    """A chunk named by lmcache's token-hash chain (dialects 0.4 and later).

    `chunk_hash` is the daemon-computed chain hash of the chunk's tokens and
    `salt` the client's `cache_salt` (part of the identity). A `TokenKey`
    never equals a `CacheKey` (msgspec compares the type), so a 0.3 client's
    block hashes and the token-hash space cannot collide or be forged into
    one another.
    """

    salt: str = ""


@attrs.frozen
class CudaTensorRef:
    """A CUDA tensor shared by IPC (lmcache's pickled `CudaIPCWrapper`, or
    an lmcache 0.5.6 `cuda` descriptor).

    `handle` is torch's `_share_cuda_()` 8-tuple. `stride` (elements; None:
    row-major contiguous) and `storage_offset` (elements into the shared
    storage) are the view of the storage that the tensor is; lmcache 0.5.6
    sends them, older pickles imply contiguous at offset 0.
    """

    handle: tuple[object, ...]
    dtype: str
    shape: tuple[int, ...]
    device: int | None
    device_uuid: str | None
    stride: tuple[int, ...] | None = None
    storage_offset: int = 0


@attrs.frozen
class HostTensorRef:
    """A tensor in a shared-memory file (lmcd's extension code 2, or an
    lmcache 0.5 `cpu_shm` descriptor).

    `path` is `/dev/shm/<name>`; `offset` is in bytes (for lmcache:
    `storage_offset * itemsize`); `stride` is in elements, None meaning
    row-major contiguous (the host path accepts only contiguous strides).
    """

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    stride: tuple[int, ...] | None = None


TensorRef: TypeAlias = CudaTensorRef | HostTensorRef


# -- requests -------------------------------------------------------------------
#
# One class per operation, whatever dialect asked for it. Fields that only
# some dialects send have defaults; a handler never needs to know which
# dialect a request came from.


@attrs.frozen
class TokenSpan:
    """A token-addressed key (lmcache 0.4+): a range of one request's prompt.

    The daemon hashes `token_ids` chunk by chunk (lmcache's chain) and the
    chunks of `[start, end)` are the objects meant. `worker_id` None means
    every rank; `readers` is how many read locks a lookup takes per object
    (each retrieve releases one).
    """

    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: tuple[int, ...]
    start: int
    end: int
    request_id: str
    salt: str = ""
    readers: int = 1


@attrs.frozen
class EngineGroup:
    """One KV-cache group of an engine (lmcache's `EngineGroupInfo`)."""

    group_id: int
    layer_indices: tuple[int, ...]
    tokens_per_block: int
    sliding_window_tokens: int | None = None
    extra_tag: int = 0
    """lmcache's `extra_object_group_tag`: 0 for a regular group, > 0 for
    a connector-private extra group (e.g. CacheBlend's)."""
    recurrent: bool = False
    """The pages hold recurrent state (Mamba and the like), not attention KV."""


@attrs.frozen
class LayoutHints:
    """How an engine lays out its KV tensors (lmcache's `LayoutHints`);
    None where the engine gave no hint."""

    kv_layout: str | None = None
    """"NHD" (tokens before heads), "HND", "BLHNC" or "BLNHC"."""
    num_kv_heads: int | None = None
    tokens_per_block: int | None = None
    kv_list_layout: str | None = None
    """SGLang's outer list organisation: "k_v" or "unified"."""
    head_dim: int | None = None


@attrs.frozen
class RegisterKVCache:
    """Open an engine's KV cache (one tensor per layer) under `instance_id`.

    `refresh` (lmcache 0.5): registering a known instance again only
    refreshes it; otherwise (0.3) the old registration is replaced.
    `groups` () means a single group of every layer (what lmcache makes of
    an empty `engine_group_infos`); `engine` and `hints` are what lmcache
    0.5 clients say about the tensors' layout.
    """

    instance_id: int
    layers: tuple[TensorRef, ...]
    model_name: str | None = None
    world_size: int | None = None
    groups: tuple[EngineGroup, ...] = ()
    refresh: bool = False
    engine: str | None = None
    """Which engine registers (lmcache 0.5: "vllm", "sglang", ...)."""
    hints: LayoutHints = LayoutHints()
    pings: bool = attrs.field(
        default=attrs.Factory(lambda self: self.refresh, takes_self=True)
    )
    """The worker pings with its instance id, so a silent one has died and
    is reaped (lmcache 0.5). By default as `refresh`; lmcache 0.4 refreshes
    but pings without an id, so its workers are never reaped."""


@attrs.frozen
class UnregisterKVCache:
    instance_id: int


@attrs.frozen
class Store:
    """Copy chunks out of an engine's blocks: `keys[i]` from the blocks of
    `block_ids[i*b:(i+1)*b]` (b = blocks per chunk)."""

    keys: tuple[CacheKey, ...]
    instance_id: int
    block_ids: tuple[int, ...]
    event_handle: bytes


@attrs.frozen
class Retrieve:
    """Copy the leading present chunks of `keys` into an engine's blocks;
    the first `skip_tokens` tokens are already in the engine and are not
    written."""

    keys: tuple[CacheKey, ...]
    instance_id: int
    block_ids: tuple[int, ...]
    event_handle: bytes
    skip_tokens: int = 0


@attrs.frozen
class StoreSpan:
    """A token-addressed STORE: the chunks of `span`, all or nothing, from
    `block_ids[g]` of each engine group `g`."""

    span: TokenSpan
    instance_id: int
    block_ids: tuple[tuple[int, ...], ...]
    event_handle: bytes


@attrs.frozen
class RetrieveSpan:
    """A token-addressed RETRIEVE of the chunks of `span`; the first
    `skip_tokens` tokens are already in the engine and are not written."""

    span: TokenSpan
    instance_id: int
    block_ids: tuple[tuple[int, ...], ...]
    event_handle: bytes
    skip_tokens: int = 0


@attrs.frozen
class Lookup:
    """How many leading `keys` are present (synchronous, lmcache 0.3)."""

    keys: tuple[CacheKey, ...]
    lock: bool


@attrs.frozen
class StartLookup:
    """Start a lookup job for `span` (lmcache 0.4+); its result is collected
    by `QueryLookup` under `span.request_id`."""

    span: TokenSpan


@attrs.frozen
class QueryLookup:
    """The chunk count of a finished lookup job, exactly once; None while
    it runs, 0 for an unknown job. With `wait`, wait up to that many seconds.
    With `peek` (lmcache 0.4's QUERY_PREFETCH_LOOKUP_HITS) the job stays
    for the query that collects it."""

    request_id: str
    wait: float | None = None
    peek: bool = False


@attrs.frozen
class FreeLookupLocks:
    """Release the read locks a lookup took on the chunks of `span`."""

    span: TokenSpan


@attrs.frozen
class EndSession:
    """The request `request_id` is finished: drop its session state."""

    request_id: str


@attrs.frozen
class Ping:
    """Heartbeat; `instance_id` (when given) is a live worker."""

    instance_id: int | None = None


@attrs.frozen
class ReportBlockAllocation:
    """The engine's block allocation for some requests (informational)."""

    instance_id: int
    model_name: str
    records: int


@attrs.frozen
class Capabilities:
    """Which optional features the daemon offers (lmcache `get_experimental`)."""


@attrs.frozen
class RegisterPool:
    """Engine-driven transfers (lmcache 0.4.7+): the engine copies its KV
    into slots of a daemon-owned shared-memory pool and commits them."""

    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden: int
    dtype: str
    mla: bool
    slots_per_chunk: int | None = None
    pings: bool = True
    """The worker pings with its instance id (lmcache 0.5): a silent one
    is reaped. lmcache 0.4 pings without one."""
    inline: bool = False
    """No pool: the chunks travel in the messages (lmcache 0.4.6's pickle
    transport, through `lmcd.wire.tensorpickle`): `CommitStore.chunks` in,
    `PreparedSlots.chunks` out."""


@attrs.frozen
class UnregisterPool:
    instance_id: int


@attrs.frozen
class PrepareStore:
    """Reserve pool slots for the chunks of `span` not yet stored."""

    span: TokenSpan
    instance_id: int


@attrs.frozen
class ChunkData:
    """One chunk that travels in a message (an inline engine-driven
    transfer): a C-contiguous tensor of `shape` and `dtype` whose bytes
    are `data`."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class CommitStore:
    """The engine filled the slots `PrepareStore` gave it: store them. For
    an inline instance `chunks` are the chunks of the span themselves."""

    span: TokenSpan
    instance_id: int
    chunks: tuple[ChunkData, ...] | None = None


@attrs.frozen
class PrepareRetrieve:
    """Copy the chunks of `span` into pool slots for the engine to read."""

    span: TokenSpan
    instance_id: int


@attrs.frozen
class CommitRetrieve:
    """The engine has read the slots `PrepareRetrieve` gave it."""

    span: TokenSpan
    instance_id: int


@attrs.frozen
class Clear:
    """Drop every chunk not in use (`force`: lmcache 0.5's flag)."""

    force: bool = False


@attrs.frozen
class DropChunks:
    """lmcd's DROP extension: drop every chunk not in use, or only those of
    `model`; the result is the number dropped."""

    model: str | None = None


@attrs.frozen
class ResetStats:
    """lmcd's RESET_STATS extension: zero the counters (not the gauges)."""


@attrs.frozen
class GetChunkSize:
    pass


@attrs.frozen
class Noop:
    pass


@attrs.frozen
class Stats:
    pass


Request: TypeAlias = (
    RegisterKVCache
    | UnregisterKVCache
    | Store
    | Retrieve
    | StoreSpan
    | RetrieveSpan
    | Lookup
    | StartLookup
    | QueryLookup
    | FreeLookupLocks
    | EndSession
    | Ping
    | ReportBlockAllocation
    | Capabilities
    | RegisterPool
    | UnregisterPool
    | PrepareStore
    | CommitStore
    | PrepareRetrieve
    | CommitRetrieve
    | Clear
    | DropChunks
    | ResetStats
    | GetChunkSize
    | Noop
    | Stats
)


# -- results ----------------------------------------------------------------------


@attrs.frozen
class CopyResult:
    """The outcome of a STORE or RETRIEVE.

    `event_handle` is the IPC handle of an event that completes with the
    device copy, or None when no device work is pending (host paths, or
    nothing to copy): each dialect decides what its clients get then.
    `ok`: every chunk was stored / retrieved. `found` (RETRIEVE): how many
    leading chunks were copied.
    """

    ok: bool
    event_handle: bytes | None = None
    found: int = 0


@attrs.frozen
class PoolSlot:
    """Where one chunk lies in an engine-driven pool."""

    offset: int
    length: int
    shape: tuple[int, ...]
    dtype: str


@attrs.frozen
class PoolInfo:
    """The reply to `RegisterPool`."""

    shm_name: str
    pool_size: int


@attrs.frozen
class PreparedSlots:
    """The reply to `PrepareStore` / `PrepareRetrieve`: the slots of the
    chunks to fill (store: `chunk_indices` says which chunks of the span
    they are) or to read (retrieve; `ok` False when not all are present)."""

    slots: tuple[PoolSlot, ...]
    chunk_indices: tuple[int, ...] = ()
    ok: bool = True
    chunks: tuple[ChunkData, ...] = ()
    """An inline instance's retrieved chunks (it has no slots)."""
