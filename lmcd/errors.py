"""The few exceptions lmcd raises.

Low-level errors (msgspec, pickle, zmq, torch, OSError) are translated into
these at the boundary where they happen, so the listener and handlers only
ever see an `LmcdError`.
"""

from __future__ import annotations


class LmcdError(Exception):
    """Base class of every error lmcd raises on purpose."""


class ConfigError(LmcdError):
    """A command-line flag or setting is out of range."""


class ProtocolError(LmcdError):
    """A message does not follow the wire protocol (counted as malformed)."""


class RegistrationError(LmcdError):
    """A KV cache cannot be registered or opened (bad tensor, no GPU...)."""


class TransferError(LmcdError):
    """A STORE or RETRIEVE cannot be carried out (bad block ids, unknown instance)."""


class StorageFull(LmcdError):
    """No room can be made for a chunk: everything evictable is already gone."""


class TierError(LmcdError):
    """A copy-holding tier (disk, remote) cannot serve at all right now."""
