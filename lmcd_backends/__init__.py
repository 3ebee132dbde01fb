"""Storage tiers behind one protocol (`protocol.StorageTier`)."""

from lmcd_backends.arena import Arena, align_up
from lmcd_backends.pinned_cpu import PinnedCpuTier
from lmcd_backends.protocol import ALIGNMENT, Extent, StorageTier, TierStatistics

__all__ = [
    "ALIGNMENT",
    "Arena",
    "Extent",
    "PinnedCpuTier",
    "StorageTier",
    "TierStatistics",
    "align_up",
]
