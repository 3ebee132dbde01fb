"""The wire edge: frames in, neutral requests out; neutral results in, frames out.

`dialect` defines what a dialect is, `detect` binds each connection to one,
and each supported lmcache release line has a module of its own
(`lmcache03`, `lmcache05`). Nothing past this package sees a type number, a
dialect's key class or a reply shape.
"""

from lmcd.wire.dialect import Dialect, Message, PayloadError, Unsupported, parse
from lmcd.wire.types import CacheKey, TokenKey

__all__ = [
    "CacheKey",
    "Dialect",
    "Message",
    "PayloadError",
    "TokenKey",
    "Unsupported",
    "parse",
]
