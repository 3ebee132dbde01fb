"""Request, key and tensor-reference types of the wire protocol.

Nothing here imports trio, zmq or torch: these are plain values that the
codec builds and the rest of the daemon consumes.
"""

from __future__ import annotations

import enum
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


class RequestType(enum.IntEnum):
    """Request type values of the lmcache 0.3.10-0.3.13 dialect (+ lmcd's STATS)."""

    REGISTER_KV_CACHE = 1
    UNREGISTER_KV_CACHE = 2
    STORE = 3
    RETRIEVE = 4
    LOOKUP = 5
    CLEAR = 6
    GET_CHUNK_SIZE = 7
    NOOP = 8
    STATS = 1000


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
}


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
        return [
            CacheKey(self.model_name, self.world_size, rank, self.chunk_hash)
            for rank in range(self.world_size)
        ]


@attrs.frozen
class CudaTensorRef:
    """A CUDA tensor shared by IPC (lmcache's pickled `CudaIPCWrapper`)."""

    handle: tuple[object, ...]
    dtype: str
    shape: tuple[int, ...]
    device: int | None
    device_uuid: str | None


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


@attrs.frozen
class RegisterKVCache:
    instance_id: int
    layers: tuple[TensorRef, ...]


@attrs.frozen
class UnregisterKVCache:
    instance_id: int


@attrs.frozen
class Store:
    keys: tuple[CacheKey, ...]
    instance_id: int
    block_ids: tuple[int, ...]
    event_handle: bytes


@attrs.frozen
class Retrieve:
    keys: tuple[CacheKey, ...]
    instance_id: int
    block_ids: tuple[int, ...]
    event_handle: bytes


@attrs.frozen
class Lookup:
    keys: tuple[CacheKey, ...]
    lock: bool


@attrs.frozen
class Clear:
    pass


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
    | Lookup
    | Clear
    | GetChunkSize
    | Noop
    | Stats
)
