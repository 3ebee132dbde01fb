"""The storage-tier protocol: what the storage manager needs from a tier.

A tier owns a pool of memory (host RAM now; a disk or remote tier later) and
hands out byte ranges (`Extent`) for chunks. It knows nothing about keys,
locks or eviction order: the manager (`lmcd.storage`) decides what lives
where, and an eviction policy decides what goes.
"""

from __future__ import annotations

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

    def buffer(self, extent: Extent) -> Any:
        """The memory of `extent`, as a 1-D uint8 tensor of `extent.size` bytes."""
        ...

    def statistics(self) -> TierStatistics:
        """A snapshot of the tier's memory."""
        ...
