"""The dialects lmcd speaks, by `--dialect` name."""

from __future__ import annotations

from lmcd.errors import ConfigError
from lmcd.wire import lmcache03, lmcache04, lmcache05
from lmcd.wire.dialect import Dialect

AUTO = "auto"

DIALECTS: dict[str, Dialect] = {
    lmcache03.NAME: lmcache03.DIALECT,
    **{d.name: d for d in lmcache04.DIALECTS},
    lmcache05.NAME: lmcache05.DIALECT,
}

ALIASES = {"lmcache-0.4.5": lmcache04.LMCACHE_044.name}
"""Releases that speak another's dialect (0.4.5 numbers its types as 0.4.4)."""


# What `--dialect auto` detects. The 0.4 dialects number their requests so
# that a 0.5 client resuming mid-stream after a restart (its first message a
# query_prefetch_status, say) fits a 0.4 request too, and is left waiting
# until a message that tells; until the real 0.4 clients' integration tests
# land, they are served with an explicit `--dialect lmcache-0.4.x` only.
AUTO_DIALECTS = (lmcache03.NAME, lmcache05.NAME)


def choices() -> list[str]:
    """Every value `--dialect` accepts."""
    return [AUTO, *DIALECTS, *ALIASES]


def dialects_for(name: str) -> tuple[Dialect, ...]:
    """The dialects a daemon started with `--dialect name` speaks.

    Raises `ConfigError` for an unknown name.
    """
    if name == AUTO:
        return tuple(DIALECTS[n] for n in AUTO_DIALECTS)
    dialect = DIALECTS.get(ALIASES.get(name, name))
    if dialect is None:
        raise ConfigError(
            f"--dialect must be one of {', '.join(choices())} (got {name!r})"
        )
    return (dialect,)
