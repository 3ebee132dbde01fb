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

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
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
    ) -> Completion:
        """Copy each chunk's buffer into its blocks of `kv`."""
        ...


@attrs.frozen
class HostCopier:
    """`/dev/shm` KV caches: the copy runs in a worker thread; its result is
    the completion (`Finished`, with the client's own event handle)."""

    async def store(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
    ) -> Completion:
        await trio.to_thread.run_sync(host.gather, kv, chunks, limiter=limiter)
        return Finished(event_handle)

    async def retrieve(
        self,
        kv: Any,
        event_handle: bytes,
        chunks: Chunks,
        chunk_tokens: int,
        limiter: trio.CapacityLimiter,
    ) -> Completion:
        await trio.to_thread.run_sync(host.scatter, kv, chunks, limiter=limiter)
        return Finished(event_handle)


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
    ) -> Completion:
        return await trio.to_thread.run_sync(
            cuda.retrieve, kv, event_handle, chunks, chunk_tokens, limiter=limiter
        )


COPIERS: dict[str, Copier] = {"host": HostCopier(), "cuda": CudaCopier()}


@attrs.define(slots=True, eq=False)
class Instance:
    """One registered KV cache (one vLLM worker)."""

    instance_id: int
    kind: Literal["cuda", "host"]
    kv: host.HostKV | cuda.CudaKV
    blocks_per_chunk: int
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
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _instances: dict[int, Instance] = attrs.field(factory=dict, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

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

        Raises `RegistrationError` when it cannot be opened.
        """
        if request.instance_id in self._instances:
            log.warning("GPU ID %d registered again; replacing", request.instance_id)
            await self.unregister(request.instance_id)
        refs = request.layers
        if all(isinstance(r, HostTensorRef) for r in refs):
            host_refs = [r for r in refs if isinstance(r, HostTensorRef)]
            kv: host.HostKV | cuda.CudaKV = await trio.to_thread.run_sync(
                host.open_host_kv, host_refs
            )
            kind: Literal["cuda", "host"] = "host"
        elif all(isinstance(r, CudaTensorRef) for r in refs):
            cuda_refs = [r for r in refs if isinstance(r, CudaTensorRef)]
            kv = await trio.to_thread.run_sync(
                cuda.open_cuda_kv, cuda_refs, self.staging_bytes
            )
            kind = "cuda"
        else:
            raise RegistrationError("KV cache mixes CUDA and host layers")
        try:
            blocks = kv.layout.blocks_per_chunk(self.chunk_size)
        except RegistrationError:
            kv.close()
            raise
        instance = Instance(request.instance_id, kind, kv, blocks)
        self._instances[request.instance_id] = instance
        log.info(
            "Registered KV cache for GPU ID %d with %d layers",
            request.instance_id,
            kv.layout.num_layers,
        )
        return instance

    async def unregister(self, instance_id: int) -> bool:
        """Wait for the instance's copies, then release everything it held.
        Returns False (and logs a warning) for an unknown instance."""
        instance = self._instances.get(instance_id)
        if instance is None:
            log.warning("No KV cache found for GPU ID %d to unregister", instance_id)
            return False
        instance.closing = True
        if instance.inflight:
            await instance.idle.wait()
        if self._instances.get(instance_id) is instance:
            del self._instances[instance_id]
        instance.kv.close()
        log.info("Unregistered KV cache for GPU ID %d", instance_id)
        return True

    def attach(self, instance: Instance) -> None:
        """Serve an already opened instance (for tests and other front ends
        that open KV caches themselves); replaces none."""
        if instance.instance_id in self._instances:
            raise RegistrationError(f"GPU ID {instance.instance_id} is registered")
        self._instances[instance.instance_id] = instance

    def _instance(self, instance_id: int) -> Instance:
        instance = self._instances.get(instance_id)
        if instance is None or instance.closing:
            raise TransferError(f"no KV cache registered for GPU ID {instance_id}")
        return instance

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

    def admit_store(self, request: Store) -> StoreJob:
        """Admit a STORE in arrival order (synchronously, on the Trio thread):
        validate it, reserve its chunks and count it in flight, so that an
        UNREGISTER that arrives after it waits for it.

        Raises `TransferError` for an unknown instance, bad block ids or a
        memory tier that fails (nothing stays reserved), and `ValueError`
        for a chunk that can never fit the buffer.
        """
        started = time.perf_counter()
        instance = self._instance(request.instance_id)
        plan = self._plan(instance, request.keys, request.block_ids)
        layout = instance.layout
        try:
            reservation = self.storage.reserve(
                request.keys, layout.chunk_bytes(self.chunk_size), layout.tag
            )
        except TierError as e:
            raise TransferError(f"store refused: {e}") from e
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

    async def run_store(self, job: StoreJob) -> list[object]:
        """Copy an admitted STORE's chunks and commit them once copied;
        returns the reply, `[event_handle, ok]`.

        Raises `TransferError` when the copy fails (its chunks are dropped).
        """
        instance, request, reservation = job.instance, job.request, job.reservation
        if not job.chunks:
            return [request.event_handle, reservation.ok]
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
        return [handle, reservation.ok]

    # -- retrieve ------------------------------------------------------------

    def admit_retrieve(self, request: Retrieve) -> RetrieveJob:
        """Admit a RETRIEVE in arrival order: validate it, pin the leading
        committed chunks and count it in flight (see `admit_store`).

        Raises `TransferError` for an unknown instance or bad block ids.
        """
        started = time.perf_counter()
        instance = self._instance(request.instance_id)
        plan = self._plan(instance, request.keys, request.block_ids)
        layout = instance.layout
        pin = self.storage.pin(
            request.keys, layout.chunk_bytes(self.chunk_size), layout.tag
        )
        try:
            chunks = [
                (plan[i], self.storage.buffer(e)) for i, e in enumerate(pin.entries)
            ]
        except BaseException as e:
            self.storage.unpin(pin, completed=False)
            if isinstance(e, MemoryError | OSError | LookupError):
                raise TransferError(f"retrieve refused: {e}") from e
            raise
        if chunks:
            self._begin(instance)
        return RetrieveJob(instance, request, pin, chunks, started)

    async def run_retrieve(self, job: RetrieveJob) -> list[object]:
        """Copy an admitted RETRIEVE's chunks into their blocks, then unpin;
        returns the reply, `[event_handle, found]` (true for the leading
        chunks copied).

        Raises `TransferError` when the copy fails.
        """
        instance, request, pin = job.instance, job.request, job.pin
        n = len(job.chunks)
        found = [True] * n + [False] * (len(request.keys) - n)
        if not n:
            return [request.event_handle, found]

        def finish(completed: bool) -> None:
            if completed:
                self._log("Retrieved", n, job.started)
            self.storage.unpin(pin, completed=completed)

        issue = functools.partial(
            instance.copier.retrieve,
            instance.kv,
            request.event_handle,
            job.chunks,
            self.chunk_size,
            self._limiter,
        )
        handle = await self._copy(instance, "retrieve", issue, finish)
        return [handle, found]

    # -- completion: one path for every kind of copy -------------------------

    async def _copy(
        self,
        instance: Instance,
        what: str,
        issue: Callable[[], Awaitable[Completion]],
        finish: Callable[[bool], None],
    ) -> bytes:
        """Issue a copy and settle it; returns the reply's event handle.

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
