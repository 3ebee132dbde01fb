"""Request handlers: decoded requests in, reply values out.

Control-plane requests (LOOKUP, NOOP, GET_CHUNK_SIZE, CLEAR, STATS) touch
only in-memory state on the Trio thread and are answered inline, without a
task. Data-plane requests (REGISTER, UNREGISTER, STORE, RETRIEVE) wait on
copies or threads, so each gets its own short task; STORE and RETRIEVE are
admitted (validated, memory reserved or pinned) on arrival, before their
task, so that requests take effect in the order they arrived. Every request
whose uid and type decode is answered, failures included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from lmcd import __version__
from lmcd.enginepool import EnginePools, PoolJob
from lmcd.errors import LmcdError, ProtocolError, RegistrationError, TransferError
from lmcd.lookups import LookupJob, LookupJobs, Sessions
from lmcd.ratelog import RateLimitedLog
from lmcd.reqlog import RequestDebugLog, describe
from lmcd.scheduler import (
    Instance,
    RegistrationTurn,
    RetrieveJob,
    StoreJob,
    TransferScheduler,
)
from lmcd.storage import Reservation, StorageManager
from lmcd.tiering import LocalLookup, Promotion, Tiering
from lmcd.wire import Dialect, Message, Unsupported, parse
from lmcd.wire.detect import Ambiguous, DialectRouter, Routed
from lmcd.wire.types import (
    MAX_EXPANDED_KEYS,
    CacheKey,
    Capabilities,
    Clear,
    CommitRetrieve,
    CommitStore,
    CopyResult,
    DropChunks,
    EndSession,
    FreeLookupLocks,
    GetChunkSize,
    Lookup,
    Noop,
    Ping,
    PrepareRetrieve,
    PrepareStore,
    QueryLookup,
    RegisterKVCache,
    RegisterPool,
    ReportBlockAllocation,
    Request,
    ResetStats,
    Retrieve,
    RetrieveSpan,
    StartLookup,
    Stats,
    Store,
    StoreSpan,
    TokenKey,
    TokenSpan,
    UnregisterKVCache,
    UnregisterPool,
)

log = logging.getLogger(__name__)
# Instance ids remembered as "told unhealthy once" (see Handlers._ping).
MAX_UNKNOWN_PINGS = 4096

# What a data-plane request gets when admitted on arrival.
_Admitted = StoreJob | RetrieveJob | PoolJob | RegistrationTurn

Send = Callable[[list[bytes]], None]


@attrs.frozen
class Later:
    """A control-plane answer that has to wait (a lower tier's round trip, a
    lookup job still promoting): awaited in a task of its own, then sent."""

    answer: Callable[[], Awaitable[object]]


@attrs.frozen
class _AfterPromotion:
    """A RETRIEVE admitted once the promotions of its chunks are done."""

    promotions: list[Promotion]


@attrs.define(slots=True)
class Counters:
    requests: int = 0
    malformed_messages: int = 0
    failed_requests: int = 0
    ambiguous_messages: int = 0
    unsupported_requests: int = 0
    reaped_workers: int = 0
    stream_control_frames: int = 0
    by_type: dict[str, int] = attrs.field(factory=dict)
    by_dialect: dict[str, int] = attrs.field(factory=dict)


@attrs.define(slots=True, eq=False)
class Handlers:
    """Dispatches messages from the listener and sends their replies."""

    storage: StorageManager
    scheduler: TransferScheduler
    chunk_size: int
    send: Send
    router: DialectRouter
    sessions: Sessions
    jobs: LookupJobs
    started_at: float = attrs.field(factory=time.monotonic)
    counters: Counters = attrs.field(factory=Counters)
    extra_stats: Callable[[], dict[str, Any]] = lambda: {}
    pools: EnginePools | None = None
    # Disk and remote tiers (lmcd.tiering), when configured.
    tiers: Tiering | None = None
    _nursery: trio.Nursery | None = None
    # Lookup jobs still promoting, by request id (set when they finish).
    _job_done: dict[str, trio.Event] = attrs.field(factory=dict)
    _inflight: int = 0
    _log_limit: RateLimitedLog = attrs.field(factory=lambda: RateLimitedLog(log))
    _debug: RequestDebugLog = attrs.field(factory=lambda: RequestDebugLog(log))
    _idle: trio.Event = attrs.field(factory=trio.Event)
    _unsupported_seen: set[str] = attrs.field(factory=set)
    # Instance ids that pinged without a registration and were answered
    # False once (see `_ping`).
    _unknown_pings: set[int] = attrs.field(factory=set)
    _closing: bool = False
    # Set when the router starts holding a message (its deadline to watch).
    _holding: trio.Event = attrs.field(factory=trio.Event)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the nursery of data-plane request tasks, and drop messages
        held past their deadline (`DialectRouter.admit`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_held)
            task_status.started()
            await trio.sleep_forever()

    async def _expire_held(self) -> None:
        router = self.router
        while True:
            deadline = router.next_deadline()
            if deadline is None:
                self._holding = trio.Event()
                await self._holding.wait()
                continue
            await trio.sleep_until(deadline)
            dropped = router.expire(trio.current_time())
            self._count_dropped(len(dropped), dropped[0][1].op if dropped else None)

    def _count_dropped(self, n: int, op: int | str | None) -> None:
        if not n:
            return
        self.counters.ambiguous_messages += n
        self._log_limit.warning(
            "%d message(s) of an undetected client (type %r first) left "
            "unanswered: its connection did not bind within %.0f s",
            n,
            op,
            self.router.hold_seconds,
        )

    async def drain(self) -> None:
        """Wait until no request task is running."""
        if self._inflight:
            await self._idle.wait()

    @property
    def inflight(self) -> int:
        return self._inflight

    def begin_shutdown(self) -> None:
        """From now on, answer data-plane requests with their failure reply
        instead of starting them (control-plane ones are still served)."""
        self._closing = True

    # -- entry point from the listener ---------------------------------------

    def on_message(self, identity: bytes, frames: list[bytes]) -> None:
        if len(frames) == 3 and frames[1] == b"":
            # lmcache 0.5's stream credit/cancel frames (`[uid, b"", b"ack"
            # | b"cancel"]`); lmcd ends every stream at once, so a client may
            # still send a cancel after the end. Nothing to answer.
            self.counters.stream_control_frames += 1
            return
        try:
            message = parse(frames)
        except ProtocolError as e:
            self._malformed(f"unanswerable message: {e}")
            return
        self.counters.requests += 1
        router = self.router
        now = trio.current_time()
        dropped = router.expire(now)  # what `admit` would drop unseen
        self._count_dropped(len(dropped), dropped[0][1].op if dropped else None)
        try:
            released = router.admit(identity, message, now)
        except Ambiguous as e:
            self.counters.ambiguous_messages += 1
            self._log_limit.warning(
                "Message of type %r from an undetected client left unanswered: %s",
                message.op,
                e,
            )
            return
        if not released:
            self._holding.set()
        for r in released:
            self._serve(identity, r.message, r.routed)

    def _serve(self, identity: bytes, message: Message, routed: Routed) -> None:
        """Answer one routed message (inline, or in a task of its own)."""
        dialect = routed.dialect
        request = routed.request
        counts = self.counters.by_dialect
        counts[dialect.name] = counts.get(dialect.name, 0) + 1
        if request is None:
            error = routed.error
            assert error is not None
            if isinstance(error, Unsupported):
                self._unsupported(dialect, error)
            else:
                self._malformed(f"{dialect.name}: {error}")
            if error.reply is not None:
                self.send([identity, *error.reply])
            return
        name = type(request).__name__
        self.counters.by_type[name] = self.counters.by_type.get(name, 0) + 1
        if isinstance(request, _DATA_PLANE):
            self._on_data_plane(identity, dialect, message, request)
            return
        started = time.perf_counter()
        try:
            value = self._control_plane(request)
        except LmcdError as e:
            self._fail(identity, dialect, message, request, e)
            return
        except Exception:  # a bug must not take the listener down
            self._crashed(identity, dialect, message, request)
            return
        if isinstance(value, Later):
            self._spawn(identity, dialect, message, request, value, started)
            return
        self._debug.answered(request, value, time.perf_counter() - started)
        self.send([identity, *dialect.encode(message, request, value)])

    def _on_data_plane(
        self, identity: bytes, dialect: Dialect, message: Message, request: Request
    ) -> None:
        # Copies are admitted here, in arrival order (validated, memory
        # reserved or pinned, counted in flight), before their task runs:
        # an UNREGISTER that arrives after a STORE then waits for it.
        # A RETRIEVE of chunks coming up from a lower tier is admitted
        # once they have arrived.
        started = time.perf_counter()
        try:
            job: _Admitted | _AfterPromotion | None
            waits = self._promotions_for(request)
            job = _AfterPromotion(waits) if waits else self._admit(request)
        except (TransferError, ValueError) as e:
            self._fail(identity, dialect, message, request, e)
            return
        except Exception:  # a bug must not take the listener down
            self._crashed(identity, dialect, message, request)
            return
        self._warn_refused(request, job)
        self._spawn(identity, dialect, message, request, job, started)

    def _spawn(
        self,
        identity: bytes,
        dialect: Dialect,
        message: Message,
        request: Request,
        job: _Admitted | _AfterPromotion | Later | None,
        started: float,
    ) -> None:
        """Serve `request` in a task of its own (counted in flight)."""
        assert self._nursery is not None
        if not self._inflight:
            self._idle = trio.Event()
        self._inflight += 1
        self._nursery.start_soon(
            self._data_plane, identity, dialect, message, request, job, started
        )

    def _fail(
        self,
        identity: bytes,
        dialect: Dialect,
        message: Message,
        request: Request,
        reason: Exception | None,
    ) -> None:
        """Count, log (one warning naming the request and `reason`; None:
        already logged) and answer a failed request."""
        self.counters.failed_requests += 1
        if reason is not None:
            self._log_limit.warning("%s failed: %s", describe(request), reason)
        reply = dialect.failure(message, request)
        if reply is not None:
            self.send([identity, *reply])

    def _crashed(
        self, identity: bytes, dialect: Dialect, message: Message, request: Request
    ) -> None:
        """A bug while serving `request` (called from its `except`): one
        error line with the traceback, and the request's failure reply."""
        self._log_limit.error(
            "%s crashed (a bug in lmcd; please report it)",
            describe(request),
            exc_info=True,
        )
        self._fail(identity, dialect, message, request, None)

    def _warn_refused(self, request: Request, job: object) -> None:
        """One warning for an admitted STORE whose chunks did not all find
        room (it is answered as partly stored, not as failed)."""
        reservation = getattr(job, "reservation", None)
        if not isinstance(reservation, Reservation) or not reservation.refused:
            return
        total = len(reservation.entries) + reservation.present + reservation.refused
        self._log_limit.warning(
            "%s: %d of %d chunks not stored: %s",
            describe(request),
            reservation.refused,
            total,
            self.storage.full_reason(),
        )

    def on_oversized(self, identity: bytes, frames: list[bytes], what: str) -> None:
        """A message the listener dropped for its size, with the frames it
        kept: answered with its dialect's failure reply when uid and type
        were kept and the dialect is known (the connection's, or the one
        reply every enabled dialect would give); counted as malformed."""
        try:
            message = parse(frames)
        except ProtocolError:
            self._malformed(f"unanswerable oversized message ({what})")
            return
        self.counters.requests += 1
        self._malformed(f"oversized message ({what})")
        bound = self.router.dialect_of(identity)
        dialects = (bound,) if bound is not None else self.router.dialects
        replies = [d.failure(message, None) for d in dialects]
        if any(r != replies[0] for r in replies):
            self.counters.ambiguous_messages += 1
            return
        if replies[0] is not None:
            self.send([identity, *replies[0]])

    def _malformed(self, what: str) -> None:
        self.counters.malformed_messages += 1
        self._log_limit.warning("Malformed message: %s", what)

    def _unsupported(self, dialect: Dialect, error: Unsupported) -> None:
        self.counters.unsupported_requests += 1
        key = f"{dialect.name}:{error.operation}"
        if key not in self._unsupported_seen:
            self._unsupported_seen.add(key)
            log.warning(
                "%s client asked for %s, which lmcd does not offer%s "
                "(logged once; every one is counted)",
                dialect.name,
                error.operation,
                "" if error.reply is None else "; refused",
            )

    # -- control plane (inline) ----------------------------------------------

    def _control_plane(self, request: Request) -> object:
        if isinstance(request, Lookup):
            if self.tiers is not None:
                return self._tiered_lookup(request)
            return self.storage.lookup(request.keys, request.lock)
        if isinstance(request, Noop):
            return "OK"
        if isinstance(request, GetChunkSize):
            return self.chunk_size
        if isinstance(request, Clear):
            dropped = self.storage.clear(force=request.force)
            if self.tiers is not None:
                dropped += self.tiers.clear()
            log.info("Cleared %d chunks", dropped)
            return None
        if isinstance(request, Stats):
            return self.stats()
        if isinstance(request, DropChunks):
            dropped = self.storage.clear(force=False, model=request.model)
            which = "" if request.model is None else f" of model {request.model!r}"
            log.info("Dropped %d chunks%s (DROP)", dropped, which)
            return dropped
        if isinstance(request, ResetStats):
            self.storage.reset_counters()
            self.counters = Counters()
            log.info("Statistics counters reset (RESET_STATS)")
            return True
        if isinstance(request, StartLookup):
            self._start_lookup(request.span)
            return None
        if isinstance(request, QueryLookup):
            if request.peek:
                # lmcache 0.4's QUERY_PREFETCH_LOOKUP_HITS: the count without
                # collecting the job (None while it runs).
                job = self.jobs.get(request.request_id)
                return 0 if job is None else job.hits
            # A job finishes as it starts unless it promotes chunks from a
            # lower tier; a wait for such a one waits in a task.
            done = self._job_done.get(request.request_id)
            if done is not None and request.wait and not done.is_set():
                return Later(lambda: self._wait_job(request, done))
            return self.jobs.collect(request.request_id)
        if isinstance(request, FreeLookupLocks):
            self._free_lookup_locks(request.span)
            return None
        if isinstance(request, EndSession):
            self.sessions.end(request.request_id)
            return None
        if isinstance(request, Ping):
            if request.instance_id is None:
                return True
            return self._ping(request.instance_id)
        if isinstance(request, Capabilities):
            return []
        if isinstance(request, ReportBlockAllocation):
            return None
        # -- engine-driven pools (lmcd.enginepool): no copy, answered inline --
        if isinstance(request, PrepareStore):
            return self._pools().prepare_store(request)
        if isinstance(request, CommitRetrieve):
            return self._pools().commit_retrieve(request)
        # -- end of engine-driven pools --
        raise ProtocolError(f"no control-plane handler for {request!r}")

    def _ping(self, instance_id: int) -> bool:
        """A heartbeat from a worker (lmcache 0.5 pings with its id).

        A worker this daemon holds no registration for (it restarted, and
        engine-driven pools are not remembered; or it reaped the worker as
        silent) is answered False once, then True: lmcache 0.5's heartbeat
        re-registers its KV caches on exactly that unhealthy-to-healthy
        edge, so the worker comes back by itself within two heartbeats
        instead of sending requests for an instance that no longer exists.
        """
        if self.scheduler.heartbeat(instance_id):
            self._unknown_pings.discard(instance_id)
            return True
        if instance_id in self._unknown_pings:
            return True
        if len(self._unknown_pings) >= MAX_UNKNOWN_PINGS:
            self._unknown_pings.clear()  # bounded: ids come from clients
        self._unknown_pings.add(instance_id)
        self._log_limit.warning(
            "Ping from worker %d, which has no registration here: answered "
            "unhealthy once, so that it registers again",
            instance_id,
        )
        return False

    # -- lower tiers (lmcd.tiering) ---------------------------------------------

    def _tiered_lookup(self, request: Lookup) -> object:
        """A 0.3 LOOKUP over the tiers: answered at once from memory (disk
        hits promoted in the background, RETRIEVE waits for them), or in a
        task when keys the local tiers miss must be asked of the remote
        tier."""
        tiers = self.tiers
        assert tiers is not None
        local = tiers.lookup(request.keys, request.lock)
        if local.remote:
            return Later(lambda: tiers.settle(request.keys, local, request.lock))
        if request.lock:
            tiers.settle_soon(request.keys, local)
        return local.hits

    async def _wait_job(self, request: QueryLookup, done: trio.Event) -> object:
        with trio.move_on_after(request.wait or 0):
            await done.wait()
        return self.jobs.collect(request.request_id)

    async def _settle_job(
        self, job: LookupJob, span: TokenSpan, keys: list[TokenKey], local: LocalLookup
    ) -> None:
        tiers = self.tiers
        assert tiers is not None
        done = self._job_done[span.request_id]
        hits = 0
        try:
            hits = await tiers.settle(keys, local, True, span.readers)
        finally:
            if self.jobs.get(span.request_id) is job:
                job.hits = hits
                self.sessions.get(span.request_id).lookup_hits = hits
            done.set()
            if self._job_done.get(span.request_id) is done:
                del self._job_done[span.request_id]

    def _promotions_for(self, request: Request) -> list[Promotion]:
        """What a RETRIEVE must wait for: its chunks' promotions."""
        if self.tiers is None or not isinstance(request, Retrieve | RetrieveSpan):
            return []
        if isinstance(request, RetrieveSpan):
            try:
                keys: tuple[CacheKey, ...] = self._span_retrieve(request).keys
            except LmcdError:
                return []  # admitted at once, and refused there
        else:
            keys = request.keys
        return self.tiers.before_retrieve(keys)

    def _pools(self) -> EnginePools:
        if self.pools is None:
            raise TransferError("engine-driven transfers are not served here")
        return self.pools

    # -- token-addressed lookups (lmcache 0.4+) ----------------------------------

    def _start_lookup(self, span: TokenSpan) -> None:
        """Run the lookup job of `span.request_id`: how many leading chunks
        of the prompt (up to `span.end`) every rank holds, each found object
        read-locked `span.readers` times."""
        job = self.jobs.start(span.request_id)
        session = self.sessions.get(span.request_id)
        # A lookup that fails still finishes, with 0 hits: a job left
        # running would keep its client polling until its own timeout.
        job.hits = 0
        session.lookup_hits = 0
        session.lookup_span = span
        if not self.scheduler.serves(span.model_name, span.world_size):
            return  # lmcache answers 0 for a model no worker has registered
        hashes = self.sessions.chunk_hashes(span)
        if len(hashes) * span.world_size > MAX_EXPANDED_KEYS:
            raise ProtocolError(
                f"lookup of {len(hashes)} chunks x {span.world_size} ranks "
                f"is over {MAX_EXPANDED_KEYS} objects (a fixed limit)"
            )
        keys = [
            TokenKey(span.model_name, span.world_size, span.worker_id, h, span.salt)
            for h in hashes
        ]
        if self.tiers is not None:
            self._job_done.pop(span.request_id, None)
            local = self.tiers.lookup(keys, True, span.readers)
            session.lookup_hits = local.hits
            if local.pending and self._nursery is not None:
                # Finished once its promotions are: with the count of the
                # chunks that really arrived.
                job.hits = None
                self._job_done[span.request_id] = trio.Event()
                self._nursery.start_soon(self._settle_job, job, span, keys, local)
            else:
                job.hits = local.hits
            return
        job.hits = session.lookup_hits = self.storage.lookup(
            keys, True, readers=span.readers
        )

    def _free_lookup_locks(self, span: TokenSpan) -> None:
        """Release the read locks the request's lookup took on the chunks of
        `[span.start, span.end)` (`span.readers` each)."""
        session = self.sessions.get(span.request_id)
        if session.lookup_hits < 0:
            self.jobs.collect(span.request_id)
            if session.lookup_hits < 0:
                return
        size = self.chunk_size
        first = span.start // size
        last = min(session.lookup_hits, span.end // size)
        if first >= last:
            return
        hashes = self.sessions.chunk_hashes(span)[first:last]
        keys = [
            TokenKey(span.model_name, span.world_size, span.worker_id, h, span.salt)
            for h in hashes
        ]
        self.storage.release(keys, span.readers)

    def _span_chunks(
        self, request: StoreSpan | RetrieveSpan
    ) -> tuple[list[TokenKey], tuple[int, ...], int]:
        """The keys of a token-addressed copy's chunks, its block ids and
        the blocks per chunk; raises `TransferError` for a span without a
        rank or too few block ids."""
        instance = self.scheduler.instance(request.instance_id)
        span = request.span
        if span.worker_id is None:
            raise TransferError("store and retrieve keys must name a worker (rank)")
        keys = self.sessions.keys(span)
        ids = _single_group(request.block_ids)
        per = instance.blocks_per_chunk
        if len(ids) < len(keys) * per:
            raise TransferError(
                f"{len(ids)} block ids for {len(keys)} chunks of {per} blocks"
            )
        return keys, ids, per

    def _span_store(self, request: StoreSpan) -> Store:
        """The chunk-addressed STORE of a token-addressed one: its chunks'
        keys and block ids, chunks made only of null blocks left out."""
        keys, ids, per = self._span_chunks(request)
        kept: list[TokenKey] = []
        blocks: list[int] = []
        for i, key in enumerate(keys):
            chunk = ids[i * per : (i + 1) * per]
            if any(chunk):  # block 0 is the engine's null block
                kept.append(key)
                blocks.extend(chunk)
        return Store(tuple(kept), request.instance_id, tuple(blocks), b"")

    def _span_retrieve(self, request: RetrieveSpan) -> Retrieve:
        """The chunk-addressed RETRIEVE of a token-addressed one."""
        keys, ids, per = self._span_chunks(request)
        return Retrieve(
            tuple(keys),
            request.instance_id,
            tuple(ids[: len(keys) * per]),
            b"",
            skip_tokens=request.skip_tokens,
        )

    # -- data plane (one task each) ------------------------------------------

    def _admit(self, request: Request) -> _Admitted | None:
        if self._closing:
            raise TransferError("not started: shutting down")
        if isinstance(request, Store):
            return self.scheduler.admit_store(request)
        if isinstance(request, Retrieve):
            return self.scheduler.admit_retrieve(request)
        if isinstance(request, StoreSpan):
            # lmcache 0.4+: all or nothing.
            return self.scheduler.admit_store(
                self._span_store(request), all_or_nothing=True
            )
        if isinstance(request, RetrieveSpan):
            try:
                return self.scheduler.admit_retrieve(self._span_retrieve(request))
            except LmcdError:
                self._release_span(request)
                raise
        if isinstance(request, RegisterKVCache):
            return self.scheduler.take_turn(request.instance_id)
        if isinstance(request, UnregisterKVCache):
            pools = self.pools
            if pools is not None and pools.registered(request.instance_id):
                return None  # an engine-driven context (lmcache 0.4.6)
            return self.scheduler.take_turn(request.instance_id)
        # -- engine-driven pools: admitted in arrival order, like copies --
        if isinstance(
            request, RegisterPool | UnregisterPool | CommitStore | PrepareRetrieve
        ):
            return self._pools().admit(request)
        # -- end of engine-driven pools --
        return None

    def _release_span(self, request: RetrieveSpan, done: int = 0) -> None:
        """A token-addressed RETRIEVE that did not copy every chunk still
        gives up its read lock on the chunks it did not copy (as lmcache's
        server does), so that a failed retrieve leaks no lock until TTL."""
        span = request.span
        if span.worker_id is None:
            return
        keys = self.sessions.keys(span)[done:]
        if keys:
            self.storage.release(keys, 1)

    async def _data_plane(
        self,
        identity: bytes,
        dialect: Dialect,
        message: Message,
        request: Request,
        job: _Admitted | _AfterPromotion | Later | None,
        started: float,
    ) -> None:
        try:
            if isinstance(job, Later):
                value = await job.answer()
            elif isinstance(job, _AfterPromotion):
                value = await self._retrieve_after_promotion(request, job)
            else:
                value = await self._serve_data(request, job)
        except (TransferError, RegistrationError, ValueError) as e:
            self._fail(identity, dialect, message, request, e)
            return
        except Exception:  # a bug must not take the daemon down
            self._crashed(identity, dialect, message, request)
            return
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        if self._debug.enabled:
            self._debug.answered(
                request, value, time.perf_counter() - started, _copied_bytes(job)
            )
        self.send([identity, *dialect.encode(message, request, value)])

    async def _retrieve_after_promotion(
        self, request: Request, waiting: _AfterPromotion
    ) -> object:
        tiers = self.tiers
        assert tiers is not None
        parts = self._in_parts(request, waiting.promotions)
        if parts is not None:
            return await self._retrieve_in_parts(request, *parts)
        try:
            await tiers.wait(waiting.promotions)
            job = self._admit(request)
        finally:
            tiers.after_retrieve(waiting.promotions)
        return await self._serve_data(request, job)

    def _in_parts(
        self, request: Request, promotions: list[Promotion]
    ) -> tuple[Retrieve, list[list[Promotion]]] | None:
        """A RETRIEVE that can be copied in parts as its chunks arrive (into
        a host-path KV cache: a CUDA reply carries one event recorded after
        every copy, so those wait for all their chunks): its chunk-addressed
        form and each chunk's promotions; None for any other."""
        try:
            if isinstance(request, RetrieveSpan):
                full = self._span_retrieve(request)
            elif isinstance(request, Retrieve):
                full = request
            else:
                return None
            if self.scheduler.instance(full.instance_id).kind != "host":
                return None
        except LmcdError:
            return None  # refused at admission, as any other
        waits: list[list[Promotion]] = [[] for _ in full.keys]
        j = 0
        for i, key in enumerate(full.keys):
            for rank_key in key.ranks():
                if j < len(promotions) and promotions[j].key == rank_key:
                    waits[i].append(promotions[j])
                    j += 1
        if j < len(promotions):
            return None  # not in request order: wait for them all
        return full, waits

    async def _retrieve_in_parts(
        self, request: Request, full: Retrieve, waits: list[list[Promotion]]
    ) -> CopyResult:
        """Serve a RETRIEVE whose chunks are being promoted in parts: each
        leading run of chunks that have arrived is admitted and copied while
        the later ones arrive. The reply is what one RETRIEVE admitted once
        they all had arrived would get: the leading chunks found, ended by a
        promotion that failed or ran past `promotion_timeout`; a
        token-addressed RETRIEVE gives up its locks as `_serve_data` does."""
        tiers = self.tiers
        assert tiers is not None
        started = time.perf_counter()
        keys = full.keys
        n = len(keys)
        size = self.chunk_size
        deadline = trio.current_time() + tiers.promotion_timeout
        start = found = pinned = given = 0
        instance: Instance | None = None
        try:
            while start < n:
                if not await _arrived(waits[start], deadline):
                    self._log_limit.warning(
                        "chunk promotions still running after --promotion-timeout "
                        "%g s: those chunks are misses",
                        tiers.promotion_timeout,
                    )
                    break
                end = start + 1
                while end < n and all(p.done.is_set() for p in waits[end]):
                    end += 1
                if instance is None:
                    if self._closing:
                        raise TransferError("not started: shutting down")
                    instance = self.scheduler.check_retrieve(full)
                per = instance.blocks_per_chunk
                part = Retrieve(
                    keys[start:end],
                    full.instance_id,
                    full.block_ids[start * per : end * per],
                    full.event_handle,
                    skip_tokens=max(0, full.skip_tokens - start * size),
                )
                job = self.scheduler.admit_retrieve(part, part=True)
                pinned += len(job.pin.entries)
                # Pinned: the promotions' own locks can go (before the
                # copy, whose end gives up the lookup's lock).
                tiers.give_back([p for w in waits[start:end] for p in w])
                given = end
                result = await self.scheduler.run_retrieve(job)
                found += result.found
                if result.found < end - start:
                    break
                start = end
        finally:
            tiers.give_back([p for w in waits[given:] for p in w])
            if isinstance(request, RetrieveSpan):
                self._release_span(request, found)
            if instance is not None:
                self.scheduler.retrieve_parts(n, pinned, found, started)
        return CopyResult(found == n, None, found)

    async def _serve_data(self, request: Request, job: _Admitted | None) -> object:
        if isinstance(job, PoolJob):  # engine-driven pools
            return await self._pools().run(job)
        if isinstance(job, StoreJob):
            return await self.scheduler.run_store(job)
        if isinstance(job, RetrieveJob):
            if not isinstance(request, RetrieveSpan):
                return await self.scheduler.run_retrieve(job)
            found = 0
            try:
                result = await self.scheduler.run_retrieve(job)
                found = result.found
            finally:
                self._release_span(request, found)
            return result
        if isinstance(request, RegisterKVCache):
            # The protocol has no error channel for REGISTER: a failure is
            # logged and counted, and the client still gets its (empty) reply.
            if request.refresh and self.scheduler.touch(request.instance_id):
                # lmcache 0.5: registering a known instance only refreshes it
                # (after the id's earlier REGISTERs and UNREGISTERs).
                async with self.scheduler.turn(_turn(job)):
                    return None
            try:
                await self.scheduler.register(request, _turn(job))
            except RegistrationError as e:
                self.counters.failed_requests += 1
                self._log_limit.warning("%s failed: %s", describe(request), e)
            return None
        if isinstance(request, UnregisterKVCache):
            if job is None:
                # lmcache 0.4.6 unregisters its engine-driven context so.
                await self._pools().unregister(request.instance_id)
            else:
                await self.scheduler.unregister(request.instance_id, _turn(job))
            return None
        raise ProtocolError(f"no data-plane handler for {request!r}")

    # -- statistics ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The STATS map (PROTOCOL.md): counters and gauges, no scans."""
        s = self.storage.statistics()
        tier = s.tier
        return {
            "version": __version__,
            "uptime_s": time.monotonic() - self.started_at,
            "chunk_size": self.chunk_size,
            "capacity_bytes": tier.capacity_bytes,
            "used_bytes": tier.used_bytes,
            "free_bytes": tier.free_bytes,
            "allocated_bytes": tier.materialized_bytes,
            "segments": tier.segments,
            "chunks": s.chunks,
            "chunk_bytes": s.bytes,
            "tokens": s.chunks * self.chunk_size,
            "reserved_chunks": s.reserved_chunks,
            "locked_chunks": s.locked_chunks,
            "pinned_chunks": s.pinned_chunks,
            "lookups": s.lookups,
            "lookup_hit_chunks": s.lookup_hit_chunks,
            "lookup_miss_chunks": s.lookup_miss_chunks,
            "stores": s.stores,
            "stored_chunks": s.stored_chunks,
            "stored_bytes": s.stored_bytes,
            "store_skipped_chunks": s.store_skipped_chunks,
            "store_refused_chunks": s.store_refused_chunks,
            "retrieves": s.retrieves,
            "retrieved_chunks": s.retrieved_chunks,
            "retrieved_bytes": s.retrieved_bytes,
            "retrieve_miss_chunks": s.retrieve_miss_chunks,
            "evicted_chunks": s.evicted_chunks,
            "evicted_bytes": s.evicted_bytes,
            "lock_expiries": s.lock_expiries,
            "cleared_chunks": s.cleared_chunks,
            "requests": self.counters.requests,
            "requests_by_type": dict(self.counters.by_type),
            "failed_requests": self.counters.failed_requests,
            "malformed_messages": self.counters.malformed_messages,
            "ambiguous_messages": self.counters.ambiguous_messages,
            "held_messages": self.router.held,
            "released_messages": self.router.released_messages,
            "unsupported_requests": self.counters.unsupported_requests,
            "reaped_workers": self.counters.reaped_workers,
            "requests_by_dialect": dict(self.counters.by_dialect),
            "connections_by_dialect": self.router.connections(),
            "dialects": [d.name for d in self.router.dialects],
            "inflight_requests": self._inflight,
            "sessions": attrs.asdict(self.sessions.statistics()),
            "lookup_jobs": attrs.asdict(self.jobs.statistics()),
            "models": {
                name: {"chunks": u.chunks, "bytes": u.bytes}
                for name, u in s.models.items()
            },
            "instances": [i.describe() for i in self.scheduler.instances()],
            **self.extra_stats(),
        }


_DATA_PLANE = (
    RegisterKVCache,
    UnregisterKVCache,
    Store,
    Retrieve,
    StoreSpan,
    RetrieveSpan,
    # engine-driven pools: a file to create, a copy or a wait
    RegisterPool,
    UnregisterPool,
    CommitStore,
    PrepareRetrieve,
)


async def _arrived(promotions: list[Promotion], deadline: float) -> bool:
    """Wait (until `deadline`, Trio time) for `promotions` to finish;
    whether they all did."""
    with trio.move_on_at(deadline):
        for p in promotions:
            await p.done.wait()
    return all(p.done.is_set() for p in promotions)


def _copied_bytes(job: object) -> int | None:
    """The bytes a STORE or RETRIEVE job copies (None for other requests)."""
    if isinstance(job, StoreJob):
        return sum(e.nbytes for e in job.reservation.entries)
    if isinstance(job, RetrieveJob):
        return sum(e.nbytes for e in job.pin.entries)
    return None


def _turn(job: object) -> RegistrationTurn:
    # REGISTER and UNREGISTER take their turn when admitted (`_admit`).
    assert isinstance(job, RegistrationTurn)
    return job


def _single_group(block_ids: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    # Registration refuses engines with several KV-cache groups, so a
    # request for a registered instance names exactly one.
    if len(block_ids) != 1:
        raise TransferError(
            f"block ids for {len(block_ids)} KV-cache groups; lmcd serves "
            "engines with one group"
        )
    return block_ids[0]
