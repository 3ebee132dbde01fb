"""What the log says about a request: a short name for it, a short outcome,
and `--log-level debug`'s per-request lines (rate-limited per type).

Core module: no trio, zmq or torch. A failed request is logged once, at
warning level, as `<describe(request)> failed: <reason>`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import attrs

from lmcd.ratelog import RateLimitedLog
from lmcd.wire.types import (
    CacheKey,
    Lookup,
    RegisterKVCache,
    Request,
    Retrieve,
    RetrieveSpan,
    Store,
    StoreSpan,
    TokenSpan,
)

# Request class -> the operation name operators know from the protocol docs.
_OPS: dict[str, str] = {
    "Store": "STORE",
    "Retrieve": "RETRIEVE",
    "StoreSpan": "STORE",
    "RetrieveSpan": "RETRIEVE",
    "Lookup": "LOOKUP",
    "RegisterKVCache": "REGISTER_KV_CACHE",
    "UnregisterKVCache": "UNREGISTER_KV_CACHE",
    "StartLookup": "LOOKUP",
    "QueryLookup": "QUERY_LOOKUP",
    "FreeLookupLocks": "FREE_LOOKUP_LOCKS",
    "EndSession": "END_SESSION",
    "GetChunkSize": "GET_CHUNK_SIZE",
    "Noop": "NOOP",
    "Ping": "PING",
    "Clear": "CLEAR",
    "Stats": "STATS",
    "DropChunks": "DROP",
    "ResetStats": "RESET_STATS",
    "RegisterPool": "REGISTER_POOL",
    "UnregisterPool": "UNREGISTER_POOL",
    "PrepareStore": "PREPARE_STORE",
    "CommitStore": "COMMIT_STORE",
    "PrepareRetrieve": "PREPARE_RETRIEVE",
    "CommitRetrieve": "COMMIT_RETRIEVE",
}


def human_bytes(n: float) -> str:
    """`n` bytes as an operator reads them: "512 B", "4 KiB", "40 MiB",
    "1.5 GiB" (binary units, at most three significant digits)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.3g} {unit}"
    return f"{int(n)} B"


def op_name(request: Request) -> str:
    """The protocol name of `request`'s operation ("STORE", "LOOKUP")."""
    name = type(request).__name__
    return _OPS.get(name, name)


def _model(keys: Sequence[CacheKey]) -> str:
    models = {k.model_name for k in keys}
    if len(models) == 1:
        return f"model {next(iter(models))!r}"
    return f"{len(models)} models" if models else "no keys"


def _span(span: TokenSpan) -> str:
    tokens = max(0, span.end - span.start)
    return f"request {span.request_id!r}, {tokens} tokens of model {span.model_name!r}"


def describe(request: Request) -> str:
    """A short, bounded name for `request` in a log line, e.g.
    "STORE of 4 chunks from GPU ID 7 (model 'llama')". Never includes
    payloads (hashes, token ids, paths)."""
    op = op_name(request)
    if isinstance(request, Store | Retrieve):
        n = len(request.keys)
        return (
            f"{op} of {n} chunk{'' if n == 1 else 's'} "
            f"{'from' if isinstance(request, Store) else 'into'} "
            f"GPU ID {request.instance_id} ({_model(request.keys)})"
        )
    if isinstance(request, StoreSpan | RetrieveSpan):
        return f"{op} for GPU ID {request.instance_id} ({_span(request.span)})"
    if isinstance(request, Lookup):
        return f"{op} of {len(request.keys)} chunks ({_model(request.keys)})"
    if isinstance(request, RegisterKVCache):
        layers = len(request.layers)
        return f"{op} for GPU ID {request.instance_id} ({layers} layers)"
    instance = getattr(request, "instance_id", None)
    if isinstance(instance, int):
        return f"{op} for GPU ID {instance}"
    return op


def outcome(value: object) -> str:
    """A short summary of a reply value for a debug line."""
    if value is None:
        return "done"
    if isinstance(value, bool):
        return "ok" if value else "refused"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value[:40]
    if isinstance(value, list | tuple):
        if all(isinstance(v, bool) for v in value):
            return f"{sum(1 for v in value if v)} of {len(value)} found"
        return f"{len(value)} items"
    if isinstance(value, dict):
        return f"{len(value)} fields"
    ok = getattr(value, "ok", None)
    if isinstance(ok, bool):
        found = getattr(value, "found", None)
        if isinstance(found, int) and not isinstance(found, bool):
            return f"{found} chunks, {'all' if ok else 'not all'} copied"
        return "ok" if ok else "partly refused"
    return type(value).__name__


def _result(request: Request, value: object) -> str:
    ok = getattr(value, "ok", None)
    if isinstance(request, Lookup) and isinstance(value, int):
        return f"{value} of {len(request.keys)} found"
    if isinstance(request, Store | StoreSpan) and isinstance(ok, bool):
        return "stored" if ok else "not all stored"
    if isinstance(request, Retrieve) and isinstance(ok, bool):
        found = getattr(value, "found", 0)
        return f"{found} of {len(request.keys)} copied"
    return outcome(value)


@attrs.define(slots=True)
class RequestDebugLog:
    """`--log-level debug`: one line per answered request, rate-limited per
    operation (so a busy daemon writes a sample of each kind, with a count
    of the lines left out), naming the request, its bytes and duration."""

    logger: logging.Logger
    per_second: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _by_op: dict[str, RateLimitedLog] = attrs.field(factory=dict, init=False)

    @property
    def enabled(self) -> bool:
        """Whether lines would be written (callers skip the work otherwise)."""
        return self.logger.isEnabledFor(logging.DEBUG)

    def answered(
        self,
        request: Request,
        value: object,
        seconds: float,
        nbytes: int | None = None,
    ) -> None:
        """Log that `request` was answered with `value` after `seconds`;
        `nbytes`: the bytes it copied, when it copied any."""
        if not self.enabled:
            return
        op = op_name(request)
        limited = self._by_op.get(op)
        if limited is None:
            limited = RateLimitedLog(self.logger, self.per_second, self.clock)
            self._by_op[op] = limited
        size = "" if nbytes is None else f", {human_bytes(nbytes)}"
        result = _result(request, value)
        limited.log(
            logging.DEBUG,
            "%s: %s in %.2f ms%s",
            describe(request),
            result,
            seconds * 1e3,
            size,
        )
