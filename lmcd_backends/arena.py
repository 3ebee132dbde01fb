"""Address-space bookkeeping for a tier: segments and free ranges, no memory.

The arena splits `capacity` bytes into segments of `segment_bytes` (the last
one may be shorter) and carves aligned extents out of them with best fit and
coalescing. Only "opened" segments hold extents. A segment is opened either
by `allocate` itself, the first time an extent does not fit the opened ones
(`grow=True`), or explicitly by `open_segment`, once the tier behind the
arena has obtained that segment's memory: then the arena never describes
memory that does not exist.
"""

from __future__ import annotations

import bisect

import attrs

from lmcd_backends.protocol import ALIGNMENT, Extent, TierStatistics


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


@attrs.define(slots=True)
class _Segment:
    size: int
    # Free ranges: sorted start offsets and start -> length.
    starts: list[int]
    lengths: dict[int, int]

    @classmethod
    def empty(cls, size: int) -> _Segment:
        return cls(size=size, starts=[0], lengths={0: size})

    def best_fit(self, size: int) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        for start in self.starts:
            length = self.lengths[start]
            if length >= size and (best is None or length < best[1]):
                best = (start, length)
                if length == size:
                    break
        return best

    def take(self, start: int, length: int, size: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        del self.starts[i]
        del self.lengths[start]
        if length > size:
            self.starts.insert(i, start + size)
            self.lengths[start + size] = length - size

    def give_back(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] < start + size:
            raise ValueError("extent overlaps a free range")
        if i > 0:
            prev = self.starts[i - 1]
            if prev + self.lengths[prev] > start:
                raise ValueError("extent overlaps a free range")
        end = start + size
        # Coalesce with the following free range.
        if i < len(self.starts) and self.starts[i] == end:
            size += self.lengths.pop(end)
            del self.starts[i]
        # Coalesce with the preceding free range.
        if i > 0:
            prev = self.starts[i - 1]
            if prev + self.lengths[prev] == start:
                self.lengths[prev] += size
                return
        self.starts.insert(i, start)
        self.lengths[start] = size

    def largest_free(self) -> int:
        return max(self.lengths.values(), default=0)


@attrs.define(slots=True)
class Arena:
    """Best-fit allocator over lazily opened segments.

    Invariants (checked by the property tests): live extents never overlap
    and lie inside their segment; `used + free == capacity`.
    """

    capacity: int
    segment_bytes: int
    alignment: int = ALIGNMENT
    _segments: list[_Segment] = attrs.field(factory=list, init=False)
    _live: dict[Extent, None] = attrs.field(factory=dict, init=False)
    _used: int = attrs.field(default=0, init=False)
    _opened: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.capacity <= 0 or self.segment_bytes <= 0:
            raise ValueError("capacity and segment size must be positive")
        # Segments are whole multiples of the alignment.
        self.segment_bytes = min(
            align_up(self.segment_bytes, self.alignment),
            align_up(self.capacity, self.alignment),
        )
        self.capacity = self.capacity // self.alignment * self.alignment

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.capacity - self._used

    @property
    def opened_segments(self) -> int:
        return len(self._segments)

    @property
    def opened_bytes(self) -> int:
        return self._opened

    @property
    def unopened_bytes(self) -> int:
        """Capacity not yet in any opened segment."""
        return self.capacity - self._opened

    @property
    def opened_free(self) -> int:
        """Free bytes in opened segments (possibly fragmented)."""
        return self._opened - self._used

    def next_segment_size(self, planned: int = 0) -> int:
        """The size the next segment gets once `planned` more bytes are
        opened (segments of `segment_bytes`, the last one shorter); 0 when
        the capacity would be all opened."""
        return max(0, min(self.segment_bytes, self.unopened_bytes - planned))

    @property
    def live_extents(self) -> int:
        return len(self._live)

    def open_all(self) -> None:
        """Open every segment now (for tiers that allocate eagerly)."""
        while self.unopened_bytes:
            self.open_segment(self.next_segment_size())

    def open_segment(self, size: int) -> int:
        """Open one more segment of `size` bytes (a multiple of the alignment,
        at most `segment_bytes`, within the capacity); returns its index.
        Raises `ValueError` for a size that does not fit."""
        if (
            not 0 < size <= self.segment_bytes
            or size % self.alignment
            or size > self.unopened_bytes
        ):
            raise ValueError(
                f"cannot open a {size}-byte segment "
                f"({self.unopened_bytes} bytes of capacity left unopened)"
            )
        self._segments.append(_Segment.empty(size))
        self._opened += size
        return len(self._segments) - 1

    def segment_size(self, index: int) -> int:
        return self._segments[index].size

    def fits(self, nbytes: int) -> bool:
        return (
            0
            < align_up(nbytes, self.alignment)
            <= min(self.segment_bytes, self.capacity)
        )

    def allocate(self, nbytes: int, *, grow: bool = True) -> Extent | None:
        """An extent of at least `nbytes`, or None if no free range fits.

        Opened segments are tried first (best fit across all of them); with
        `grow`, a new segment is opened when none fits and capacity remains.
        Raises `ValueError` for a size that can never fit a segment.
        """
        size = -(-nbytes // self.alignment) * self.alignment
        if not 0 < size <= self.segment_bytes:
            raise ValueError(
                f"{nbytes} bytes can never fit a {self.segment_bytes}-byte segment"
            )
        if size > self.capacity - self._used:
            return None  # a full cache: the caller evicts, no need to search
        best: tuple[int, int, int] | None = None  # (segment, start, length)
        for index, segment in enumerate(self._segments):
            fit = segment.best_fit(size)
            if fit is not None and (best is None or fit[1] < best[2]):
                best = (index, fit[0], fit[1])
        if best is None:
            new_size = self.next_segment_size()
            if not grow or new_size < size:
                return None
            best = (self.open_segment(new_size), 0, new_size)
        index, start, length = best
        self._segments[index].take(start, length, size)
        extent = Extent(segment=index, offset=start, size=size)
        self._live[extent] = None
        self._used += size
        return extent

    def release(self, extent: Extent) -> None:
        """Give `extent` back; raises `ValueError` if it is not live."""
        if extent not in self._live:
            raise ValueError(f"{extent} is not a live extent of this arena")
        del self._live[extent]
        self._segments[extent.segment].give_back(extent.offset, extent.size)
        self._used -= extent.size

    def largest_free(self) -> int:
        unopened = self.unopened_bytes
        opened = max((s.largest_free() for s in self._segments), default=0)
        return max(opened, min(unopened, self.segment_bytes))

    def live(self) -> list[Extent]:
        """Every live extent (for invariant checks)."""
        return list(self._live)


def arena_statistics(arena: Arena) -> TierStatistics:
    """A tier's statistics as its arena sees them (bytes, segments, extents)."""
    return TierStatistics(
        capacity_bytes=arena.capacity,
        used_bytes=arena.used,
        free_bytes=arena.free,
        segments=arena.opened_segments,
        segment_bytes=arena.segment_bytes,
        materialized_bytes=arena.opened_bytes,
        extents=arena.live_extents,
        largest_free_bytes=arena.largest_free(),
    )
