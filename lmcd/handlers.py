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
from collections.abc import Callable
from typing import Any

import attrs
import trio

from lmcd import __version__
from lmcd.errors import LmcdError, ProtocolError, RegistrationError, TransferError
from lmcd.ratelog import RateLimitedLog
from lmcd.scheduler import RetrieveJob, StoreJob, TransferScheduler
from lmcd.storage import StorageManager
from lmcd.wire import (
    Header,
    PayloadError,
    decode_header,
    decode_request,
    encode_reply,
    failure_reply,
)
from lmcd.wire.types import (
    Clear,
    GetChunkSize,
    Lookup,
    Noop,
    RegisterKVCache,
    Request,
    Retrieve,
    Stats,
    Store,
    UnregisterKVCache,
)

log = logging.getLogger(__name__)

Send = Callable[[list[bytes]], None]


@attrs.define(slots=True)
class Counters:
    requests: int = 0
    malformed_messages: int = 0
    failed_requests: int = 0
    by_type: dict[str, int] = attrs.field(factory=dict)


@attrs.define(slots=True, eq=False)
class Handlers:
    """Dispatches messages from the listener and sends their replies."""

    storage: StorageManager
    scheduler: TransferScheduler
    chunk_size: int
    send: Send
    started_at: float = attrs.field(factory=time.monotonic)
    counters: Counters = attrs.field(factory=Counters)
    extra_stats: Callable[[], dict[str, Any]] = lambda: {}
    _nursery: trio.Nursery | None = None
    _inflight: int = 0
    _log_limit: RateLimitedLog = attrs.field(factory=lambda: RateLimitedLog(log))
    _idle: trio.Event = attrs.field(factory=trio.Event)
    _closing: bool = False

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the nursery of data-plane request tasks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

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
        try:
            header = decode_header(frames)
        except ProtocolError as e:
            self._malformed(f"unanswerable message: {e}")
            return
        self.counters.requests += 1
        try:
            request = decode_request(header)
        except PayloadError as e:
            self._malformed(str(e))
            self._reply(identity, header, e.reply)
            return
        name = type(request).__name__
        self.counters.by_type[name] = self.counters.by_type.get(name, 0) + 1
        if isinstance(request, RegisterKVCache | UnregisterKVCache | Store | Retrieve):
            if self._closing:
                failed = self._failed(header, f"{name} refused: shutting down")
                self._reply(identity, header, failed)
                return
            # Copies are admitted here, in arrival order (validated, memory
            # reserved or pinned, counted in flight), before their task runs:
            # an UNREGISTER that arrives after a STORE then waits for it.
            try:
                job = self._admit(request)
            except (TransferError, ValueError) as e:
                self._reply(
                    identity, header, self._failed(header, f"{name} failed: {e}")
                )
                return
            except Exception:  # a bug must not take the listener down
                log.exception("%s crashed", name)
                self._reply(
                    identity, header, self._failed(header, f"{name} internal error")
                )
                return
            assert self._nursery is not None
            if not self._inflight:
                self._idle = trio.Event()
            self._inflight += 1
            self._nursery.start_soon(self._data_plane, identity, header, request, job)
            return
        try:
            value = self._control_plane(request)
        except LmcdError as e:
            value = self._failed(header, f"{name} failed: {e}")
        except Exception:  # a bug must not take the listener down
            log.exception("%s crashed", name)
            value = self._failed(header, f"{name} failed with an internal error")
        self._reply(identity, header, value)

    def on_oversized(self, identity: bytes, frames: list[bytes], what: str) -> None:
        """A message the listener dropped for its size, with the frames it
        kept: answered with its type's failure reply if uid and type were
        kept, counted as malformed either way."""
        try:
            header = decode_header(frames)
        except ProtocolError:
            self._malformed(f"unanswerable oversized message ({what})")
            return
        self.counters.requests += 1
        self._malformed(f"oversized message ({what})")
        value = None
        if header.type is not None:
            value = failure_reply(header.type, header.payloads)
        self._reply(identity, header, value)

    def _reply(self, identity: bytes, header: Header, value: object) -> None:
        self.send([identity, *encode_reply(header, value)])

    def _malformed(self, what: str) -> None:
        self.counters.malformed_messages += 1
        self._log_limit.warning("Malformed message: %s", what)

    def _failed(self, header: Header, what: str) -> object:
        self.counters.failed_requests += 1
        self._log_limit.warning("%s", what)
        assert header.type is not None
        return failure_reply(header.type, header.payloads)

    # -- control plane (inline) ----------------------------------------------

    def _control_plane(self, request: Request) -> object:
        if isinstance(request, Lookup):
            hits = self.storage.lookup(request.keys, request.lock)
            return [True] * hits + [False] * (len(request.keys) - hits)
        if isinstance(request, Noop):
            return "OK"
        if isinstance(request, GetChunkSize):
            return self.chunk_size
        if isinstance(request, Clear):
            dropped = self.storage.clear()
            log.info("Cleared %d chunks", dropped)
            return None
        if isinstance(request, Stats):
            return self.stats()
        raise ProtocolError(f"no control-plane handler for {request!r}")

    # -- data plane (one task each) ------------------------------------------

    def _admit(self, request: Request) -> StoreJob | RetrieveJob | None:
        if isinstance(request, Store):
            return self.scheduler.admit_store(request)
        if isinstance(request, Retrieve):
            return self.scheduler.admit_retrieve(request)
        return None

    async def _data_plane(
        self,
        identity: bytes,
        header: Header,
        request: Request,
        job: StoreJob | RetrieveJob | None,
    ) -> None:
        try:
            value = await self._serve_data(request, job)
        except (TransferError, RegistrationError, ValueError) as e:
            value = self._failed(header, f"{type(request).__name__} failed: {e}")
        except Exception:  # a bug must not take the daemon down
            log.exception("%s crashed", type(request).__name__)
            value = self._failed(header, f"{type(request).__name__} internal error")
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        self._reply(identity, header, value)

    async def _serve_data(
        self, request: Request, job: StoreJob | RetrieveJob | None
    ) -> object:
        if isinstance(job, StoreJob):
            return await self.scheduler.run_store(job)
        if isinstance(job, RetrieveJob):
            return await self.scheduler.run_retrieve(job)
        if isinstance(request, RegisterKVCache):
            # The protocol has no error channel for REGISTER: a failure is
            # logged and counted, and the client still gets its (empty) reply.
            try:
                await self.scheduler.register(request)
            except RegistrationError as e:
                self.counters.failed_requests += 1
                log.error(  # noqa: TRY400 - expected failure, no traceback
                    "Cannot register KV cache for GPU ID %d: %s", request.instance_id, e
                )
            return None
        if isinstance(request, UnregisterKVCache):
            await self.scheduler.unregister(request.instance_id)
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
            "inflight_requests": self._inflight,
            "models": {
                name: {"chunks": u.chunks, "bytes": u.bytes}
                for name, u in s.models.items()
            },
            "instances": [i.describe() for i in self.scheduler.instances()],
            **self.extra_stats(),
        }
