"""Test doubles: a tier with bookkeeping but no memory, and a settable clock."""

from __future__ import annotations

import attrs

from lmcd_backends.arena import Arena
from lmcd_backends.protocol import Extent, TierStatistics


@attrs.define
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@attrs.define
class ArenaTier:
    """A `StorageTier` over an `Arena` with no memory behind it."""

    capacity_bytes: int
    segment_bytes: int
    arena: Arena = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.arena = Arena(self.capacity_bytes, self.segment_bytes)

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    def fits(self, nbytes: int) -> bool:
        return self.arena.fits(nbytes)

    def allocate(self, nbytes: int) -> Extent | None:
        return self.arena.allocate(nbytes)

    def free(self, extent: Extent) -> None:
        self.arena.release(extent)

    def buffer(self, extent: Extent) -> object:
        raise NotImplementedError("ArenaTier has no memory")

    def statistics(self) -> TierStatistics:
        a = self.arena
        return TierStatistics(
            capacity_bytes=a.capacity,
            used_bytes=a.used,
            free_bytes=a.free,
            segments=a.opened_segments,
            segment_bytes=a.segment_bytes,
            materialized_bytes=a.opened_bytes,
            extents=a.live_extents,
            largest_free_bytes=a.largest_free(),
        )
