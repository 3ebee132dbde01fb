"""Test doubles: a tier with bookkeeping but no memory, and a settable clock."""

from __future__ import annotations

import attrs

from lmcd_backends.arena import Arena, arena_statistics
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

    def too_large(self, nbytes: int) -> str | None:
        if self.arena.fits(nbytes):
            return None
        return f"a {nbytes}-byte chunk is larger than a segment"

    def allocate(self, nbytes: int) -> Extent | None:
        return self.arena.allocate(nbytes)

    def free(self, extent: Extent) -> None:
        self.arena.release(extent)

    def buffer(self, extent: Extent) -> object:
        raise NotImplementedError("ArenaTier has no memory")

    def statistics(self) -> TierStatistics:
        return arena_statistics(self.arena)
