"""The transfer scheduler: owns registered KV caches and every in-flight copy.

It runs on the Trio thread. A STORE reserves chunks in the storage manager,
hands the copy plan (block ids and reserved buffers) to a worker thread
behind a `CapacityLimiter(max_workers)`, and commits the chunks only once
the copy has finished — for the CUDA path, once the recorded event has
completed, polled here without blocking Trio. A RETRIEVE pins its chunks for
the copy and unpins (releasing lookup locks) when it is done. Workers never
touch the index.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, Protocol

import attrs
import trio

from lmcd.errors import LmcdError, RegistrationError, TransferError
from lmcd.storage import Pin, Reservation, StorageManager
from lmcd.transfer import cuda, host
from lmcd.transfer.layouts import KVLayout, chunk_block_ids
from lmcd.wire.types import (
    CacheKey,
    CopyResult,
    CudaTensorRef,
    HostTensorRef,
    RegisterKVCache,
    Retrieve,
    Store,
)

log = logging.getLogger(__name__)

# How often an unfinished CUDA event is polled (seconds, doubling to the max).
_POLL_MIN = 0.0002
_POLL_MAX = 0.005


class EngineRegistry(Protocol):
    """Engines registered outside the scheduler (lmcd.enginepool's
    engine-driven workers): they count for `serves` and take heartbeats."""

    def serves(self, model_name: str, world_size: int) -> bool: ...

    def touch(self, instance_id: int) -> bool: ...


@attrs.define(slots=True, eq=False)
class _IdLock:
    """The registration lock of one instance id and how many tasks use it."""

    lock: trio.Lock = attrs.field(factory=trio.Lock)
    users: int = 0


@attrs.define(slots=True, eq=False)
class Instance:
    """One registered KV cache (one vLLM worker)."""

    instance_id: int
    kind: Literal["cuda", "host"]
    kv: host.HostKV | cuda.CudaKV
    blocks_per_chunk: int
    model_name: str | None = None
    world_size: int | None = None
    # Heartbeat-era clients (lmcache 0.4+) ping; one that goes silent is
    # reaped. `pinged`: it has pinged at least once (lmcache's reap rule).
    heartbeat: bool = False
    pinged: bool = False
    last_seen: float = attrs.field(factory=time.monotonic)
    inflight: int = 0
    closing: bool = False
    idle: trio.Event = attrs.field(factory=trio.Event)

    @property
    def layout(self) -> KVLayout:
        return self.kv.layout

    def describe(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "instance_id": self.instance_id,
            "kind": self.kind,
            "model_name": self.model_name,
            "world_size": self.world_size,
            "layout": layout.kind,
            "layers": layout.num_layers,
            "dtype": layout.dtype,
            "block_size": layout.block_size,
            "num_blocks": layout.num_blocks,
            "hidden": layout.hidden,
            "inflight": self.inflight,
        }


@attrs.frozen
class StoreJob:
    """An admitted STORE: its reserved chunks and their block ids."""

    instance: Instance
    request: Store
    reservation: Reservation
    chunks: list[tuple[Sequence[int], Any]]
    started: float


@attrs.frozen
class RetrieveJob:
    """An admitted RETRIEVE: its pinned chunks and their block ids."""

    instance: Instance
    request: Retrieve
    pin: Pin
    chunks: list[tuple[Sequence[int], Any]]
    started: float


@attrs.define(slots=True)
class TransferScheduler:
    """Registers KV caches and runs STORE and RETRIEVE copies."""

    storage: StorageManager
    chunk_size: int
    max_workers: int = 1
    staging_bytes: int = cuda.DEFAULT_STAGING_BYTES
    # uids whose /dev/shm files may be registered (None: any); --shm-owners.
    shm_owners: frozenset[int] | None = None
    # Shared-memory files held open at once, over all registrations (each is
    # a descriptor); None: `host.default_file_limit()`.
    shm_file_limit: int | None = None
    # Told of every registration that opened (its request) and every one
    # that closed (None), so they can be remembered across a restart
    # (lmcd.tiering.Registrations).
    on_registration: Callable[[int, RegisterKVCache | None], None] | None = None
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _instances: dict[int, Instance] = attrs.field(factory=dict, init=False)
    _registrations: dict[int, _IdLock] = attrs.field(factory=dict, init=False)
    _shm_files: int = attrs.field(default=0, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    peers: list[EngineRegistry] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.max_workers)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the nursery in which CUDA completions are awaited."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for instance in self._instances.values():
                instance.kv.close()
            self._instances.clear()

    @property
    def busy_workers(self) -> int:
        return int(self._limiter.borrowed_tokens)

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    # -- registration --------------------------------------------------------

    async def register(self, request: RegisterKVCache) -> Instance:
        """Open the request's KV cache (replacing one of the same id).

        REGISTERs and UNREGISTERs of one instance id run one at a time, so
        two that arrive together leave exactly one open registration (the
        one that ran last) and every replaced one is closed.

        Raises `RegistrationError` when it cannot be opened.
        """
        async with self._serialized(request.instance_id):
            if request.instance_id in self._instances:
                log.warning(
                    "GPU ID %d registered again; replacing", request.instance_id
                )
                await self._unregister(request.instance_id)
            reserved = self._reserve_files(request)
            try:
                kv = await self._open(request)
            finally:
                self._shm_files -= reserved
            if isinstance(kv, host.HostKV):
                self._shm_files += len(kv.files)
            try:
                blocks = kv.layout.blocks_per_chunk(self.chunk_size)
            except RegistrationError:
                self._close(kv)
                raise
            kind: Literal["cuda", "host"] = (
                "host" if isinstance(kv, host.HostKV) else "cuda"
            )
            if len(request.groups) > 1:
                self._close(kv)
                raise RegistrationError(
                    f"{len(request.groups)} KV-cache groups; lmcd serves engines "
                    "whose layers form one group (standard attention models)"
                )
            instance = Instance(
                request.instance_id,
                kind,
                kv,
                blocks,
                model_name=request.model_name,
                world_size=request.world_size,
                heartbeat=request.refresh,
            )
            self._instances[request.instance_id] = instance
            if self.on_registration is not None:
                self.on_registration(request.instance_id, request)
        log.info(
            "Registered KV cache for GPU ID %d with %d layers",
            request.instance_id,
            kv.layout.num_layers,
        )
        return instance

    def _reserve_files(self, request: RegisterKVCache) -> int:
        """Count the request's shared-memory files against the limit before
        opening them (so concurrent REGISTERs cannot overshoot it)."""
        wanted = len({r.path for r in request.layers if isinstance(r, HostTensorRef)})
        limit = self.shm_file_limit
        if limit is None:
            limit = host.default_file_limit()
        if wanted and self._shm_files + wanted > limit:
            raise RegistrationError(
                f"{wanted} more shared-memory files would exceed the limit of "
                f"{limit} open at once ({self._shm_files} are)"
            )
        self._shm_files += wanted
        return wanted

    def _close(self, kv: host.HostKV | cuda.CudaKV) -> None:
        if isinstance(kv, host.HostKV):
            self._shm_files -= len(kv.files)
        kv.close()

    async def _open(self, request: RegisterKVCache) -> host.HostKV | cuda.CudaKV:
        refs = request.layers
        if all(isinstance(r, HostTensorRef) for r in refs):
            host_refs = [r for r in refs if isinstance(r, HostTensorRef)]
            # Not cancellable: a descriptor opened in the thread is always
            # handed back, so it is always closed or registered.
            return await trio.to_thread.run_sync(
                functools.partial(host.open_host_kv, host_refs, owners=self.shm_owners)
            )
        if all(isinstance(r, CudaTensorRef) for r in refs):
            cuda_refs = [r for r in refs if isinstance(r, CudaTensorRef)]
            return await trio.to_thread.run_sync(
                cuda.open_cuda_kv, cuda_refs, self.staging_bytes
            )
        raise RegistrationError("KV cache mixes CUDA and host layers")

    async def unregister(self, instance_id: int) -> bool:
        """Wait for the instance's copies, then release everything it held
        (every descriptor and mapping). Returns False (and logs a warning)
        for an unknown instance."""
        async with self._serialized(instance_id):
            return await self._unregister(instance_id)

    async def _unregister(self, instance_id: int) -> bool:
        instance = self._instances.get(instance_id)
        if instance is None:
            log.warning("No KV cache found for GPU ID %d to unregister", instance_id)
            return False
        instance.closing = True
        if instance.inflight:
            await instance.idle.wait()
        if self._instances.get(instance_id) is instance:
            del self._instances[instance_id]
            if self.on_registration is not None:
                self.on_registration(instance_id, None)
        self._close(instance.kv)
        log.info("Unregistered KV cache for GPU ID %d", instance_id)
        return True

    @contextlib.asynccontextmanager
    async def _serialized(self, instance_id: int) -> AsyncIterator[None]:
        """Hold the per-id registration lock (FIFO); the entry is dropped
        once nobody holds or waits for it, so ids do not accumulate."""
        entry = self._registrations.get(instance_id)
        if entry is None:
            entry = self._registrations[instance_id] = _IdLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._registrations[instance_id]

    def instance(self, instance_id: int) -> Instance:
        """The registered instance (its last activity refreshed). Raises
        `TransferError` for an unknown or closing one."""
        instance = self._instances.get(instance_id)
        if instance is None or instance.closing:
            raise TransferError(f"no KV cache registered for GPU ID {instance_id}")
        instance.last_seen = time.monotonic()
        return instance

    def touch(self, instance_id: int) -> bool:
        """A heartbeat from `instance_id`; False if it is not registered."""
        instance = self._instances.get(instance_id)
        if instance is None or instance.closing:
            return False
        instance.last_seen = time.monotonic()
        instance.pinged = True
        return True

    def heartbeat(self, instance_id: int) -> bool:
        """A ping from `instance_id`, whichever registry holds it (`touch`
        only refreshes the scheduler's own KV caches)."""
        found = self.touch(instance_id)
        for peer in self.peers:
            found = peer.touch(instance_id) or found
        return found

    def serves(self, model_name: str, world_size: int) -> bool:
        """Whether some registered engine runs this model at this world size."""
        return any(
            i.model_name == model_name and i.world_size == world_size
            for i in self._instances.values()
        ) or any(p.serves(model_name, world_size) for p in self.peers)

    def silent_instances(self, now: float, timeout: float, grace: float) -> list[int]:
        """Heartbeat clients silent for longer than `timeout` (after their
        first ping) or `grace` (never pinged): the ones to reap."""
        return [
            i.instance_id
            for i in self._instances.values()
            if i.heartbeat
            and not i.closing
            and now - i.last_seen > (timeout if i.pinged else grace)
        ]

    def _plan(
        self, instance: Instance, keys: Sequence[CacheKey], block_ids: Sequence[int]
    ) -> list[Sequence[int]]:
        if any(k.worker_id is None for k in keys):
            raise TransferError("STORE and RETRIEVE keys must name a worker (rank)")
        return chunk_block_ids(
            block_ids, len(keys), instance.blocks_per_chunk, instance.layout.num_blocks
        )

    def _begin(self, instance: Instance) -> None:
        if not instance.inflight:
            instance.idle = trio.Event()
        instance.inflight += 1

    def _end(self, instance: Instance) -> None:
        instance.inflight -= 1
        if not instance.inflight:
            instance.idle.set()

    # -- store ---------------------------------------------------------------

    def admit_store(self, request: Store, all_or_nothing: bool = False) -> StoreJob:
        """Admit a STORE in arrival order (synchronously, on the Trio thread):
        validate it, reserve its chunks and count it in flight, so that an
        UNREGISTER that arrives after it waits for it. `all_or_nothing`: a
        STORE that cannot reserve every chunk reserves none.

        Raises `TransferError` for an unknown instance, bad block ids or (all
        or nothing) a full buffer, and `ValueError` for a chunk that can
        never fit the buffer.
        """
        started = time.perf_counter()
        instance = self.instance(request.instance_id)
        plan = self._plan(instance, request.keys, request.block_ids)
        layout = instance.layout
        reservation = self.storage.reserve(
            request.keys, layout.chunk_bytes(self.chunk_size), layout.tag
        )
        if all_or_nothing and not reservation.ok:
            self.storage.abort(reservation)
            raise TransferError(
                f"no room for {reservation.refused} of {len(request.keys)} chunks"
            )
        chunks = [
            (plan[i], self.storage.buffer(entry))
            for i, entry in zip(reservation.indices, reservation.entries, strict=True)
        ]
        if chunks:
            self._begin(instance)
        return StoreJob(instance, request, reservation, chunks, started)

    async def run_store(self, job: StoreJob) -> CopyResult:
        """Copy an admitted STORE's chunks and commit them once copied.

        Raises `TransferError` when the copy fails (its chunks are dropped).
        """
        instance, request, reservation = job.instance, job.request, job.reservation
        if not job.chunks:
            return CopyResult(reservation.ok)
        try:
            if isinstance(instance.kv, host.HostKV):
                await trio.to_thread.run_sync(
                    host.gather, instance.kv, job.chunks, limiter=self._limiter
                )
                reply = CopyResult(reservation.ok)
                done = None
            else:
                done, keep = await trio.to_thread.run_sync(
                    cuda.store,
                    instance.kv,
                    request.event_handle,
                    job.chunks,
                    self.chunk_size,
                    limiter=self._limiter,
                )
                reply = CopyResult(reservation.ok, bytes(done.ipc_handle()))
        except BaseException as e:
            self.storage.abort(reservation)
            self._end(instance)
            if isinstance(e, LmcdError | RuntimeError | ValueError):
                raise TransferError(f"store copy failed: {e}") from e
            raise
        if done is None:
            self.storage.commit(reservation)
            self._end(instance)
            self._log("Stored", len(job.chunks), job.started)
        else:
            assert self._nursery is not None
            self._nursery.start_soon(
                self._commit_when_done,
                instance,
                done,
                keep,
                reservation,
                len(job.chunks),
                job.started,
            )
        return reply

    async def _commit_when_done(
        self,
        instance: Instance,
        done: Any,
        keep: list[Any],
        reservation: Any,
        n: int,
        started: float,
    ) -> None:
        try:
            await _wait_event(done)
        except BaseException:
            self.storage.abort(reservation)
            raise
        else:
            self.storage.commit(reservation)
            self._log("Stored", n, started)
        finally:
            keep.clear()
            self._end(instance)

    # -- retrieve ------------------------------------------------------------

    def admit_retrieve(self, request: Retrieve) -> RetrieveJob:
        """Admit a RETRIEVE in arrival order: validate it, pin the leading
        committed chunks and count it in flight (see `admit_store`).

        Raises `TransferError` for an unknown instance or bad block ids.
        """
        started = time.perf_counter()
        instance = self.instance(request.instance_id)
        plan = self._plan(instance, request.keys, request.block_ids)
        layout = instance.layout
        pin = self.storage.pin(
            request.keys, layout.chunk_bytes(self.chunk_size), layout.tag
        )
        chunks = [(plan[i], self.storage.buffer(e)) for i, e in enumerate(pin.entries)]
        if chunks:
            self._begin(instance)
        return RetrieveJob(instance, request, pin, chunks, started)

    async def run_retrieve(self, job: RetrieveJob) -> CopyResult:
        """Copy an admitted RETRIEVE's chunks into their blocks, then unpin;
        the result counts the leading chunks copied.

        Raises `TransferError` when the copy fails.
        """
        instance, request, pin = job.instance, job.request, job.pin
        n = len(job.chunks)
        found = CopyResult(n == len(request.keys), None, n)
        if not n:
            return found
        try:
            if isinstance(instance.kv, host.HostKV):
                await trio.to_thread.run_sync(
                    host.scatter, instance.kv, job.chunks, limiter=self._limiter
                )
                done = None
                reply = found
            else:
                done, keep = await trio.to_thread.run_sync(
                    cuda.retrieve,
                    instance.kv,
                    request.event_handle,
                    job.chunks,
                    self.chunk_size,
                    limiter=self._limiter,
                )
                reply = CopyResult(found.ok, bytes(done.ipc_handle()), n)
        except BaseException as e:
            self.storage.unpin(pin, completed=False)
            self._end(instance)
            if isinstance(e, LmcdError | RuntimeError | ValueError):
                raise TransferError(f"retrieve copy failed: {e}") from e
            raise
        if done is None:
            self.storage.unpin(pin, completed=True)
            self._end(instance)
            self._log("Retrieved", n, job.started)
        else:
            assert self._nursery is not None
            self._nursery.start_soon(
                self._unpin_when_done, instance, done, keep, pin, n, job.started
            )
        return reply

    async def _unpin_when_done(
        self,
        instance: Instance,
        done: Any,
        keep: list[Any],
        pin: Any,
        n: int,
        started: float,
    ) -> None:
        completed = False
        try:
            await _wait_event(done)
            completed = True
            self._log("Retrieved", n, started)
        finally:
            self.storage.unpin(pin, completed=completed)
            keep.clear()
            self._end(instance)

    def _log(self, verb: str, chunks: int, started: float) -> None:
        log.info(
            "%s %d tokens in %.3f seconds",
            verb,
            chunks * self.chunk_size,
            time.perf_counter() - started,
        )


async def _wait_event(event: Any) -> None:
    delay = _POLL_MIN
    while not cuda.query(event):
        await trio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)
