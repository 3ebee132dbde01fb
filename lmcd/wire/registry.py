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


# What `--dialect auto` detects: 0.3 and 0.5. A 0.5 scheduler resuming after
# a daemon restart sends status queries (`[9, request_id]`) that are also
# lmcache 0.4's END_SESSION; with the 0.4 dialects detected too they wait for
# its next heartbeat (at most 10 s) to bind the connection. So the 0.4
# dialects are named: alone, or in a list of the dialects to detect among.
AUTO_DIALECTS = (lmcache03.NAME, lmcache05.NAME)


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
