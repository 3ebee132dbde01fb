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


# What `--dialect auto` detects: every dialect. Frames that several of them
# read differently (0.5's status query `[9, request_id]` is 0.4's
# END_SESSION) are held until the connection binds (`DialectRouter.admit`).
AUTO_DIALECTS = (
    lmcache03.NAME,
    *(d.name for d in lmcache04.DIALECTS),
    lmcache05.NAME,
)


def choices() -> list[str]:
    """Every single value `--dialect` accepts (it also takes a comma-separated
    list of dialect names)."""
    return [AUTO, *DIALECTS, *ALIASES]


def dialects_for(name: str) -> tuple[Dialect, ...]:
    """The dialects a daemon started with `--dialect name` speaks: `auto`,
    one dialect, or several named with commas (detected per connection
    among those).

    Raises `ConfigError` for an unknown or repeated name.
    """
    if name == AUTO:
        return tuple(DIALECTS[n] for n in AUTO_DIALECTS)
    found: list[Dialect] = []
    for part in name.split(","):
        dialect = DIALECTS.get(ALIASES.get(part.strip(), part.strip()))
        if dialect is None:
            raise ConfigError(
                f"--dialect takes {', '.join(choices())}, or several dialect "
                f"names separated by commas (got {name!r})"
            )
        if dialect in found:
            raise ConfigError(f"--dialect names {dialect.name} twice ({name!r})")
        found.append(dialect)
    return tuple(found)
