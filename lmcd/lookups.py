"""Sessions and lookup jobs of the token-addressed dialects (lmcache 0.4+).

Clients of these dialects send the whole prompt's token ids with every
request and leave the hashing to the server: chunk `i` is named by the
chain hash of chunks `0..i`. A `Session` per request id remembers the hashes
computed so far, so the lookup, every store and every retrieve of one
request hash each chunk once. Lookups are jobs: `start` runs one, `result`
hands its chunk count out exactly once.

Runs on the Trio thread (no locks); imports no trio, zmq or torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from lmcd.errors import ProtocolError
from lmcd.wire.types import TokenKey, TokenSpan

# How long an idle session is kept (lmcache: 600 s) and how much is kept.
DEFAULT_SESSION_TTL = 600.0
MAX_SESSIONS = 65_536
MAX_SESSION_TOKENS = 64 * 1024 * 1024
# Finished lookup jobs whose result nobody collected are dropped after this.
DEFAULT_JOB_TTL = 600.0
MAX_JOBS = 65_536


class ChainHasher(Protocol):
    """lmcache's token-hash chain (see `lmcd.tokens.TokenHasher`)."""

    chunk_size: int

    def extend(self, prefix: bytes | None, tokens: Sequence[int]) -> list[bytes]:
        """The hashes of the full chunks of `tokens`, continuing the chain
        after the chunk hashed `prefix` (None: the prompt's start). Raises
        `ValueError` for a token id outside 0..2**32-1."""
        ...


@attrs.define(slots=True, eq=False)
class Session:
    """What the daemon remembers of one request (one `request_id`)."""

    request_id: str
    tokens: tuple[int, ...] = ()
    hashes: list[bytes] = attrs.field(factory=list)
    last_used: float = 0.0
    # The last lookup's hit count (-1: none yet) and the span it locked.
    lookup_hits: int = -1
    lookup_span: TokenSpan | None = None


@attrs.frozen
class SessionStatistics:
    sessions: int
    cached_tokens: int
    hashed_chunks: int
    reused_chunks: int
    expired_sessions: int


@attrs.define(slots=True)
class Sessions:
    """Per-request hash caches, least recently used first, bounded."""

    hasher: ChainHasher
    clock: Callable[[], float]
    ttl: float = DEFAULT_SESSION_TTL
    max_sessions: int = MAX_SESSIONS
    max_tokens: int = MAX_SESSION_TOKENS
    _sessions: OrderedDict[str, Session] = attrs.field(factory=OrderedDict, init=False)
    _tokens: int = attrs.field(default=0, init=False)
    _hashed: int = attrs.field(default=0, init=False)
    _reused: int = attrs.field(default=0, init=False)
    _expired: int = attrs.field(default=0, init=False)

    def get(self, request_id: str) -> Session:
        """The session of `request_id`, created if new (and marked used)."""
        now = self.clock()
        self.expire(now)
        sessions = self._sessions
        session = sessions.get(request_id)
        if session is None:
            session = sessions[request_id] = Session(request_id)
        else:
            sessions.move_to_end(request_id)
        session.last_used = now
        return session

    def chunk_hashes(self, span: TokenSpan) -> list[bytes]:
        """The chain hashes of the full chunks of `span.token_ids[:span.end]`
        (from the prompt's start), reusing what the session already knows."""
        session = self.get(span.request_id)
        size = self.hasher.chunk_size
        tokens = span.token_ids
        full = (min(len(tokens), max(span.end, 0)) // size) * size
        known = len(session.hashes) * size
        if known and (known > len(tokens) or tokens[:known] != session.tokens[:known]):
            # The request's prompt changed under the same id: start over.
            self._forget_tokens(session)
            known = 0
        if full > known:
            hashes = session.hashes
            try:
                hashes += self.hasher.extend(
                    hashes[-1] if hashes else None, tokens[known:full]
                )
            except ValueError as e:
                self._forget_tokens(session)
                raise ProtocolError(str(e)) from e
            self._hashed += (full - known) // size
            self._tokens += full - len(session.tokens)
            session.tokens = tokens[:full]
            self._bound()
        else:
            self._reused += full // size
        return session.hashes[: full // size]

    def keys(self, span: TokenSpan) -> list[TokenKey]:
        """The objects of the chunks of `[span.start, span.end)` for the span's
        rank (which must be given), in chunk order."""
        assert span.worker_id is not None
        size = self.hasher.chunk_size
        hashes = self.chunk_hashes(span)
        first = -(-max(span.start, 0) // size)
        return [
            TokenKey(span.model_name, span.world_size, span.worker_id, h, span.salt)
            for h in hashes[first:]
        ]

    def end(self, request_id: str) -> Session | None:
        """Forget `request_id`'s session; returns it (None if unknown)."""
        session = self._sessions.pop(request_id, None)
        if session is not None:
            self._tokens -= len(session.tokens)
        return session

    def expire(self, now: float | None = None) -> None:
        """Drop sessions idle for longer than the TTL."""
        if now is None:
            now = self.clock()
        sessions = self._sessions
        while sessions:
            session = next(iter(sessions.values()))
            if now - session.last_used <= self.ttl:
                return
            self.end(session.request_id)
            self._expired += 1

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            sessions=len(self._sessions),
            cached_tokens=self._tokens,
            hashed_chunks=self._hashed,
            reused_chunks=self._reused,
            expired_sessions=self._expired,
        )

    def __len__(self) -> int:
        return len(self._sessions)

    def _forget_tokens(self, session: Session) -> None:
        self._tokens -= len(session.tokens)
        session.tokens = ()
        session.hashes = []

    def _bound(self) -> None:
        sessions = self._sessions
        while len(sessions) > 1 and (
            len(sessions) > self.max_sessions or self._tokens > self.max_tokens
        ):
            oldest = next(iter(sessions))
            self.end(oldest)
            self._expired += 1


@attrs.define(slots=True, eq=False)
class LookupJob:
    """One lookup of one request: its result (None while it runs)."""

    request_id: str
    created: float
    hits: int | None = None


@attrs.frozen
class LookupStatistics:
    jobs: int
    started: int
    collected: int
    unknown_queries: int
    dropped: int


@attrs.define(slots=True)
class LookupJobs:
    """Lookup jobs by request id; each result is handed out exactly once."""

    clock: Callable[[], float]
    ttl: float = DEFAULT_JOB_TTL
    max_jobs: int = MAX_JOBS
    _jobs: OrderedDict[str, LookupJob] = attrs.field(factory=OrderedDict, init=False)
    _started: int = attrs.field(default=0, init=False)
    _collected: int = attrs.field(default=0, init=False)
    _unknown: int = attrs.field(default=0, init=False)
    _dropped: int = attrs.field(default=0, init=False)

    def start(self, request_id: str) -> LookupJob:
        """A new job for `request_id` (replacing an uncollected one)."""
        now = self.clock()
        self._expire(now)
        jobs = self._jobs
        if jobs.pop(request_id, None) is not None:
            self._dropped += 1
        job = jobs[request_id] = LookupJob(request_id, now)
        self._started += 1
        while len(jobs) > self.max_jobs:
            jobs.popitem(last=False)
            self._dropped += 1
        return job

    def get(self, request_id: str) -> LookupJob | None:
        return self._jobs.get(request_id)

    def collect(self, request_id: str) -> int | None:
        """The finished job's chunk count, once (the job is then gone); None
        while it runs; 0 for an unknown or already collected id."""
        job = self._jobs.get(request_id)
        if job is None:
            self._unknown += 1
            return 0
        if job.hits is None:
            return None
        del self._jobs[request_id]
        self._collected += 1
        return job.hits

    def statistics(self) -> LookupStatistics:
        return LookupStatistics(
            jobs=len(self._jobs),
            started=self._started,
            collected=self._collected,
            unknown_queries=self._unknown,
            dropped=self._dropped,
        )

    def _expire(self, now: float) -> None:
        jobs = self._jobs
        while jobs:
            job = next(iter(jobs.values()))
            if now - job.created <= self.ttl:
                return
            jobs.popitem(last=False)
            self._dropped += 1
