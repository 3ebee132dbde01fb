"""The dialects lmcd speaks, by `--dialect` name."""

from __future__ import annotations

from lmcd.errors import ConfigError
from lmcd.wire import lmcache03, lmcache05
from lmcd.wire.dialect import Dialect

AUTO = "auto"

DIALECTS: dict[str, Dialect] = {
    lmcache03.NAME: lmcache03.DIALECT,
    lmcache05.NAME: lmcache05.DIALECT,
}


def choices() -> list[str]:
    """Every value `--dialect` accepts."""
    return [AUTO, *DIALECTS]


def dialects_for(name: str) -> tuple[Dialect, ...]:
    """The dialects a daemon started with `--dialect name` speaks.

    Raises `ConfigError` for an unknown name.
    """
    if name == AUTO:
        return tuple(DIALECTS.values())
    dialect = DIALECTS.get(name)
    if dialect is None:
        raise ConfigError(
            f"--dialect must be one of {', '.join(choices())} (got {name!r})"
        )
    return (dialect,)
