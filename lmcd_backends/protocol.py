"""The storage-tier protocol: what the storage manager needs from a tier.

A tier owns a pool of memory (host RAM now; a disk or remote tier later) and
hands out byte ranges (`Extent`) for chunks. It knows nothing about keys,
locks or eviction order: the manager (`lmcd.storage`) decides what lives
where, and an eviction policy decides what goes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import attrs

# O_DIRECT disk I/O needs 4 KiB-aligned buffers and sizes; so does every dtype.
ALIGNMENT = 4096


@attrs.frozen(cache_hash=True)
class Extent:
    """A byte range of a tier: `size` bytes at `offset` of segment `segment`.

    `size` is the aligned size that the range occupies; the chunk it holds
    may be shorter.
    """

    segment: int
    offset: int
    size: int


@attrs.frozen
class TierStatistics:
    """A snapshot of a tier's memory (all figures in bytes, except counts)."""

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    segments: int
    segment_bytes: int
    materialized_bytes: int
    extents: int
    largest_free_bytes: int


class StorageTier(Protocol):
    """A pool of memory that hands out extents for chunks.

    Implementations are used from one thread (the Trio thread) only; the
    memory behind an extent may be read or written by worker threads while
    the manager holds it reserved or pinned.
    """

    @property
    def capacity(self) -> int:
        """Total bytes the tier may hold (it may materialize them lazily)."""
        ...

    def allocate(self, nbytes: int) -> Extent | None:
        """Reserve at least `nbytes` (> 0) contiguous bytes.

        Returns the extent, or None when no free range is large enough (the
        caller may evict and try again). Raises `ValueError` when `nbytes`
        can never fit (larger than a segment) and `MemoryError` when the
        memory behind a new segment cannot be obtained.
        """
        ...

    def free(self, extent: Extent) -> None:
        """Return an extent obtained from `allocate`. Raises `ValueError` for
        an extent this tier did not hand out (or already freed)."""
        ...

    def fits(self, nbytes: int) -> bool:
        """Whether an extent of `nbytes` could ever be allocated here."""
        ...

    def too_large(self, nbytes: int) -> str | None:
        """None when `fits(nbytes)`; otherwise why not, for the operator:
        the limit and the setting that sets it ("a 40 MiB chunk is larger
        than a segment (--segment-mb 16)")."""
        ...

    def buffer(self, extent: Extent) -> Any:
        """The memory of `extent`, as a 1-D uint8 tensor of `extent.size` bytes."""
        ...

    def statistics(self) -> TierStatistics:
        """A snapshot of the tier's memory."""
        ...


# -- tiers that hold copies (disk, remote) -------------------------------------


@attrs.frozen(cache_hash=True)
class ObjectId:
    """What a copy-holding tier files a chunk under.

    `key` is the storage manager's neutral key, already encoded to bytes by
    the manager (model, world size, rank, content hash and salt: see
    `lmcd.tiering.object_id`); `layout` is the chunk layout tag and `nbytes`
    the chunk's exact length. A tier must return a chunk only for the same
    (key, layout, nbytes): a reader with another layout gets a miss, never
    bytes of the wrong shape.
    """

    key: bytes
    layout: str
    nbytes: int

    def name(self) -> str:
        """A stable, file- and URL-safe name (hex of a 128-bit digest of
        all three fields). Not a security boundary: tiers store and check
        the full id next to the payload."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.key, self.layout.encode(), str(self.nbytes).encode()):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part)
        return h.hexdigest()


@attrs.frozen
class CopyTierUsage:
    """A snapshot of a copy-holding tier (bytes and counts).

    Counters count chunks since the tier was created: `reads`/`read_bytes`
    the chunks served (payload bytes), `writes`/`written_bytes` the chunks
    stored.
    """

    capacity_bytes: int  # 0: the tier does not know (a remote cluster)
    used_bytes: int  # on the tier, overheads included; in-flight writes count
    objects: int
    reads: int
    read_bytes: int
    writes: int
    written_bytes: int
    read_failures: int  # I/O errors and failed verifications: served as misses
    verify_failures: int  # the part of read_failures that failed a check
    queue_depth: int  # chunk operations submitted and not finished
    write_failures: int = 0  # puts that failed (I/O error, unstorable id)
    refused_writes: int = 0  # puts refused because they would pass capacity


@attrs.frozen
class TierHealth:
    """Whether a tier is serving, and why not."""

    healthy: bool
    detail: str = ""


class CopyTier(Protocol):
    """A tier that holds copies of chunks under an `ObjectId` (disk, remote).

    Unlike `StorageTier` it hands out no memory: the storage manager passes
    the bytes in (`put`) and the buffer to fill (`get_into`). Every method is
    batched and awaited on the Trio thread; implementations run blocking I/O
    in worker threads and never return (nor get cancelled out) while a worker
    still touches a caller's buffer. Locks, pins, capacity decisions and LRU
    order stay with the storage manager: a tier never evicts on its own,
    except a remote tier whose engine evicts by itself (its `contains` then
    just says no).

    Failures of single objects are results (False, a miss), not exceptions:
    a chunk that cannot be read or does not verify is a miss, never wrong
    bytes. `TierError` is raised only when the tier as a whole cannot serve
    (and by the batched methods after `aclose`; `health` then reports
    unhealthy, `usage` still answers); `ValueError` for a buffer that is
    not `id.nbytes` long (a caller bug), before any I/O of the batch.

    Construction does no I/O: the first method awaited opens the tier
    (connects, or claims and recovers a directory); start-up calls `scan()`
    first. A cancelled call may have taken effect for some items and not for
    others; its buffers are released all the same.
    """

    name: str

    async def contains(self, ids: Sequence[ObjectId]) -> list[bool]:
        """Whether each id is held (may be a cheap index check, no I/O)."""
        ...

    async def put(self, items: Sequence[tuple[ObjectId, Any]]) -> list[bool]:
        """Store each `(id, buffer)` (a 1-D uint8 tensor or bytes-like of
        `id.nbytes`); the buffer is read before this returns and must not be
        changed meanwhile. Returns per item whether it is now held (an id
        names immutable content: one already held need not be rewritten). A put
        that would pass the tier's capacity is refused (False) rather than
        evicting: the manager deletes and retries."""
        ...

    async def get_into(self, items: Sequence[tuple[ObjectId, Any]]) -> list[bool]:
        """Fill each `(id, buffer)` (writable, `id.nbytes` bytes) with the
        verified chunk. Returns per item whether the buffer now holds it; a
        False leaves the buffer's contents unspecified."""
        ...

    async def delete(self, ids: Sequence[ObjectId]) -> None:
        """Forget each id (no error for one not held); `usage()` stops
        counting its bytes once this returns."""
        ...

    def usage(self) -> CopyTierUsage:
        """A snapshot of capacity, use and counters (no I/O)."""
        ...

    async def scan(self) -> list[tuple[ObjectId, int]]:
        """Every object held, with its size on the tier, oldest write first,
        for recovery at start-up (a tier that cannot list, such as a shared
        cluster, returns an empty list). Objects need not be verified here:
        a bad one is a miss at its first `get_into`."""
        ...

    async def health(self) -> TierHealth:
        """Whether the tier is serving now."""
        ...

    async def aclose(self) -> None:
        """Finish or abandon queued work safely and release resources."""
        ...
