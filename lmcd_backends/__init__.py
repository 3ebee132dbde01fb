"""Storage tiers behind two protocols: memory tiers (`protocol.StorageTier`)
and tiers that hold copies (`protocol.CopyTier`: `lmcd_backends.disk.DiskTier`)."""

from lmcd_backends.arena import Arena, align_up
from lmcd_backends.pinned_cpu import PinnedCpuTier
from lmcd_backends.protocol import (
    ALIGNMENT,
    CopyTier,
    CopyTierUsage,
    Extent,
    ObjectId,
    StorageTier,
    TierHealth,
    TierStatistics,
)

__all__ = [
    "ALIGNMENT",
    "Arena",
    "CopyTier",
    "CopyTierUsage",
    "Extent",
    "ObjectId",
    "PinnedCpuTier",
    "StorageTier",
    "TierHealth",
    "TierStatistics",
    "align_up",
]
