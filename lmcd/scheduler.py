"""The transfer scheduler: owns registered KV caches and every in-flight copy.

It runs on the Trio thread. A STORE reserves chunks in the storage manager,
hands the copy plan (block ids and reserved buffers) to the instance's
`Copier`, which issues the copy (worker threads behind a
`CapacityLimiter(max_workers)`) and returns a `Completion`. One code path
then settles every copy, whatever its kind (`_copy`, `_settle`): commit when
the completion's `wait()` returns, abort when it fails or is cancelled, and
only then count the copy as ended, which UNREGISTER waits for. A RETRIEVE
pins its chunks for the copy and unpins (releasing lookup locks only when
the copy completed) the same way. Workers never touch the index.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

import attrs
import trio

from lmcd.errors import LmcdError, RegistrationError, TierError, TransferError
from lmcd.storage import Pin, Reservation, StorageManager
from lmcd.transfer import cuda, host
from lmcd.transfer.completion import Completion, Finished
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

Chunks = Sequence[tuple[Sequence[int], Any]]


class Copier(Protocol):
    """Issues the copies of one kind of KV cache.

    `chunks` is `[(block_ids, uint8 buffer)]`; each method returns once the
    copy is issued (the host path: done) and raises `LmcdError`,
    `RuntimeError`, `ValueError` or `OSError` when it cannot be.
    """

    async def store(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
    ) -> Completion:
        """Copy each chunk's blocks out of `kv` into its buffer."""
        ...

    async def retrieve(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
        skip: Sequence[int] = (),
    ) -> Completion:
        """Copy each chunk's buffer into its blocks of `kv`; `skip[i]` (when
        given) is chunk i's first token to write."""
        ...


@attrs.frozen
class HostCopier:
    """`/dev/shm` KV caches: the copy runs in worker threads; their result
    is the completion (`Finished`: no device event)."""

    async def store(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
    ) -> Completion:
        await trio.to_thread.run_sync(host.gather, kv, chunks, limiter=limiter)
        return Finished()

    async def retrieve(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
        skip: Sequence[int] = (),
    ) -> Completion:
        await trio.to_thread.run_sync(host.scatter, kv, chunks, skip, limiter=limiter)
        return Finished()


@attrs.frozen
class CudaCopier:
    """CUDA IPC KV caches: a worker thread issues the stream work; the
    completion is the recorded interprocess event (`EventCompletion`)."""

    async def store(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
    ) -> Completion:
        return await trio.to_thread.run_sync(
            cuda.store, kv, event_handle, chunks, chunk_tokens, limiter=limiter
        )

    async def retrieve(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
        skip: Sequence[int] = (),
    ) -> Completion:
        return await trio.to_thread.run_sync(
            cuda.retrieve,
            kv,
            event_handle,
            chunks,
            chunk_tokens,
            skip,
            limiter=limiter,
        )


COPIERS: dict[str, Copier] = {"host": HostCopier(), "cuda": CudaCopier()}


class EngineRegistry(Protocol):
    """Engines registered outside the scheduler (lmcd.enginepool's
    engine-driven workers): they count for `serves` and take heartbeats."""

    def serves(self, model_name: str, world_size: int) -> bool: ...

    def touch(self, instance_id: int) -> bool: ...


@attrs.define(slots=True, eq=False)
class RegistrationTurn:
    """A REGISTER's or UNREGISTER's place in its instance id's queue, taken
    when the request arrives (`Scheduler.take_turn`): they take effect one
    at a time, in arrival order."""

    instance_id: int
    after: trio.Event | None
    done: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(slots=True, eq=False)
class _IdQueue:
    """The registration queue of one instance id: the last turn's event and
    how many turns are taken and not yet over."""

    last: trio.Event | None = None
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
    copier: Copier = attrs.field()

    @copier.default
    def _copier_of_kind(self) -> Copier:
        return COPIERS[self.kind]

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
    # The first token to write of each chunk in `chunks` (empty: all of
    # them): the request's skipped tokens. Pinned chunks that are skipped
    # whole are not in `chunks` but count as retrieved.
    skip: list[int] = attrs.field(factory=list)
    # One part of a RETRIEVE served in parts: not logged on its own.
    part: bool = False


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
    _registrations: dict[int, _IdQueue] = attrs.field(factory=dict, init=False)
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

    async def register(
        self, request: RegisterKVCache, turn: RegistrationTurn | None = None
    ) -> Instance:
        """Open the request's KV cache (replacing one of the same id).

        REGISTERs and UNREGISTERs of one instance id run one at a time in
        the order of their turns (`take_turn`, on arrival; taken here when
        `turn` is None), so two that arrive together leave exactly one open
        registration, the later one, and every replaced one is closed.

        Raises `RegistrationError` when it cannot be opened.
        """
        async with self.turn(turn or self.take_turn(request.instance_id)):
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
                heartbeat=request.pings,
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
                f"{limit} open at once ({self._shm_files} are; three quarters "
                "of the open-file limit, ulimit -n)"
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

    async def unregister(
        self, instance_id: int, turn: RegistrationTurn | None = None
    ) -> bool:
        """Wait for the instance's copies, then release everything it held
        (every descriptor and mapping). Returns False (and logs a warning)
        for an unknown instance. Ordered with REGISTERs as `register` is."""
        async with self.turn(turn or self.take_turn(instance_id)):
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

    def take_turn(self, instance_id: int) -> RegistrationTurn:
        """A place in `instance_id`'s registration queue, behind every turn
        taken before it; pass it to `register`/`unregister` (or `turn`)."""
        entry = self._registrations.get(instance_id)
        if entry is None:
            entry = self._registrations[instance_id] = _IdQueue()
        turn = RegistrationTurn(instance_id, entry.last)
        entry.last = turn.done
        entry.users += 1
        return turn

    @contextlib.asynccontextmanager
    async def turn(self, turn: RegistrationTurn) -> AsyncIterator[None]:
        """Wait until every earlier turn of the id is over, then hold this
        one; the id's entry is dropped once no turn is left, so ids do not
        accumulate."""
        try:
            if turn.after is not None:
                await turn.after.wait()
            yield
        finally:
            turn.done.set()
            entry = self._registrations[turn.instance_id]
            entry.users -= 1
            if not entry.users:
                del self._registrations[turn.instance_id]

    def attach(self, instance: Instance) -> None:
        """Serve an already opened instance (for tests and other front ends
        that open KV caches themselves); replaces none."""
        if instance.instance_id in self._instances:
            raise RegistrationError(f"GPU ID {instance.instance_id} is registered")
        self._instances[instance.instance_id] = instance

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

        Raises `TransferError` for an unknown instance, bad block ids, a
        memory tier that fails (nothing stays reserved) or (all or nothing)
        a full buffer, and `ValueError` for a chunk that can never fit the
        buffer.
        """
        started = time.perf_counter()
        instance = self.instance(request.instance_id)
        plan = self._plan(instance, request.keys, request.block_ids)
        layout = instance.layout
        try:
            reservation = self.storage.reserve(
                request.keys, layout.chunk_bytes(self.chunk_size), layout.tag
            )
        except TierError as e:
            raise TransferError(f"store refused: {e}") from e
        if all_or_nothing and not reservation.ok:
            why = self.storage.full_reason()  # before the abort frees room
            self.storage.abort(reservation)
            raise TransferError(
                f"no room for {reservation.refused} of {len(request.keys)} "
                f"chunks: {why}"
            )
        try:
            chunks = [
                (plan[i], self.storage.buffer(entry))
                for i, entry in zip(
                    reservation.indices, reservation.entries, strict=True
                )
            ]
        except BaseException as e:
            self.storage.abort(reservation)
            if isinstance(e, MemoryError | OSError | LookupError):
                raise TransferError(f"store refused: {e}") from e
            raise
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
        n = len(job.chunks)

        def finish(completed: bool) -> None:
            if completed:
                self.storage.commit(reservation)
                self._log("Stored", n, job.started)
            else:
                self.storage.abort(reservation)

        issue = functools.partial(
            instance.copier.store,
            instance.kv,
            request.event_handle,
            job.chunks,
            self.chunk_size,
            self._limiter,
        )
        handle = await self._copy(instance, "store", issue, finish)
        return CopyResult(reservation.ok, handle)

    # -- retrieve ------------------------------------------------------------

    def admit_retrieve(self, request: Retrieve, part: bool = False) -> RetrieveJob:
        """Admit a RETRIEVE in arrival order: validate it, pin the leading
        committed chunks and count it in flight (see `admit_store`).
        `part`: one part of a RETRIEVE served in parts (`retrieve_parts`),
        neither counted in the statistics nor logged on its own.

        Raises `TransferError` for an unknown instance or bad block ids.
        """
        started = time.perf_counter()
        instance = self.instance(request.instance_id)
        plan = self._plan(instance, request.keys, request.block_ids)
        layout = instance.layout
        pin = self.storage.pin(
            request.keys,
            layout.chunk_bytes(self.chunk_size),
            layout.tag,
            counted=not part,
        )
        size = self.chunk_size
        skip = request.skip_tokens
        try:
            chunks = [
                (plan[i], self.storage.buffer(e))
                for i, e in enumerate(pin.entries)
                if skip < (i + 1) * size
            ]
        except BaseException as e:
            self.storage.unpin(pin, completed=False)
            if isinstance(e, MemoryError | OSError | LookupError):
                raise TransferError(f"retrieve refused: {e}") from e
            raise
        firsts: list[int] = []
        if skip:
            whole = len(pin.entries) - len(chunks)
            firsts = [max(0, skip - i * size) for i in range(whole, len(pin.entries))]
        if pin.entries:
            self._begin(instance)
        return RetrieveJob(instance, request, pin, chunks, started, firsts, part)

    def check_retrieve(self, request: Retrieve) -> Instance:
        """Validate a RETRIEVE as `admit_retrieve` does, pinning nothing:
        its instance (raises `TransferError` for an unknown one or bad
        block ids)."""
        instance = self.instance(request.instance_id)
        self._plan(instance, request.keys, request.block_ids)
        return instance

    def retrieve_parts(
        self, asked: int, pinned: int, copied: int, started: float
    ) -> None:
        """Count and log, once, a RETRIEVE of `asked` chunks served in parts
        (each admitted with `part=True`): `pinned` were found, `copied`
        were copied."""
        self.storage.count_retrieve(asked, pinned)
        if copied:
            self._log("Retrieved", copied, started)

    async def run_retrieve(self, job: RetrieveJob) -> CopyResult:
        """Copy an admitted RETRIEVE's chunks into their blocks, then unpin;
        the result counts the leading chunks copied.

        Raises `TransferError` when the copy fails.
        """
        instance, request, pin = job.instance, job.request, job.pin
        n = len(pin.entries)
        if not job.chunks:
            # Nothing to write (no chunk found, or every found one skipped).
            if n:
                self.storage.unpin(pin, completed=True)
                self._end(instance)
            return CopyResult(n == len(request.keys), None, n)

        def finish(completed: bool) -> None:
            if completed and not job.part:
                self._log("Retrieved", n, job.started)
            self.storage.unpin(pin, completed=completed)

        issue = functools.partial(
            instance.copier.retrieve,
            instance.kv,
            request.event_handle,
            job.chunks,
            self.chunk_size,
            self._limiter,
            job.skip,
        )
        handle = await self._copy(instance, "retrieve", issue, finish)
        return CopyResult(n == len(request.keys), handle, n)

    # -- completion: one path for every kind of copy -------------------------

    async def _copy(
        self,
        instance: Instance,
        what: str,
        issue: Callable[[], Awaitable[Completion]],
        finish: Callable[[bool], None],
    ) -> bytes | None:
        """Issue a copy and settle it; returns the reply's event handle
        (None: no device work pending, the host path).

        `finish(completed)` runs exactly once: True once the completion's
        `wait()` returned, False when issuing or waiting failed or was
        cancelled; the instance's in-flight count drops after it. A
        detached completion is settled in the scheduler's nursery after
        this returns; any other before. Raises `TransferError` when the
        copy fails before the reply.
        """
        try:
            completion = await issue()
        except BaseException as e:
            try:
                finish(False)
            finally:
                self._end(instance)
            if isinstance(e, LmcdError | RuntimeError | ValueError | OSError):
                raise TransferError(f"{what} copy failed: {e}") from e
            raise
        if completion.detached:
            if self._nursery is None:
                await self._settle(instance, what, completion, finish)
            else:
                self._nursery.start_soon(
                    self._settle, instance, what, completion, finish
                )
        else:
            try:
                await self._settle(instance, what, completion, finish, report=False)
            except TransferError as e:
                raise TransferError(f"{what} copy failed: {e}") from e
        return completion.reply_handle

    async def _settle(
        self,
        instance: Instance,
        what: str,
        completion: Completion,
        finish: Callable[[bool], None],
        *,
        report: bool = True,
    ) -> None:
        # On cancellation (shutdown) a CUDA copy may still be running: its
        # chunks are aborted anyway, since nothing reuses the memory after.
        completed = False
        try:
            await completion.wait()
            completed = True
        except TransferError as e:
            if not report:
                raise
            log.warning("A %s copy failed after its reply: %s", what, e)
        finally:
            try:
                finish(completed)
            finally:
                completion.release()
                self._end(instance)

    def _log(self, verb: str, chunks: int, started: float) -> None:
        log.info(
            "%s %d tokens in %.3f seconds",
            verb,
            chunks * self.chunk_size,
            time.perf_counter() - started,
        )
