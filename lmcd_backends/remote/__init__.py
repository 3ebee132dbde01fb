"""The remote copy tier: chunks shared by several lmcd daemons through a
Valkey (or Redis) cluster or standalone server. See docs/valkey.md."""

from lmcd_backends.remote.tier import (
    RemoteUrl,
    ValkeyStatistics,
    ValkeyTier,
    parse_url,
    tier_from_env,
)

__all__ = ["RemoteUrl", "ValkeyStatistics", "ValkeyTier", "parse_url", "tier_from_env"]
