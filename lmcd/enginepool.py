"""Engine-driven transfers through daemon-owned shared-memory pools.

lmcache 0.4.7+ workers with CPU KV caches default to the *engine-driven*
mode: the worker gathers its KV blocks into chunk-shaped buffers itself and
scatters them back, and the server hands out buffers and keeps chunks.
lmcd serves that mode only through shared-memory pools it owns, never
through the pickle variant (its commit payload is fed to `torch.load` by
lmcache's server: code execution).

    RegisterPool       -> PoolInfo(name, size): the worker maps the pool
    PrepareStore       -> slots for the span's chunks that are not stored yet
                          (the worker writes its chunks into them)
    CommitStore        -> slot bytes copied into storage, chunks committed
    PrepareRetrieve    -> every chunk of the span copied into slots, or none
                          (the worker reads them)
    CommitRetrieve     -> slots freed, one lookup lock released per chunk
    UnregisterPool     -> everything the instance holds freed, pool removed

Design (docs/engine-driven.md has the threat model):

- One pool per registered instance, `/dev/shm/lmcd-pool-<pid>-<n>`,
  created with O_EXCL, mode 0600, fully backed (posix_fallocate: a full
  tmpfs is a failed registration, not a SIGBUS later) and flock'ed by the
  daemon while it lives, so start-up clean-up can tell a live pool of
  another daemon (another PID namespace) from a dead one's leftover.
- The daemon never maps a pool: slot bytes are copied with pread/pwrite on
  its descriptor in worker threads, so a worker that truncates or replaces
  the file makes a copy fail, never the daemon crash.
- Slots are 4 KiB-aligned extents of an `Arena` over the pool. A slot holds
  one chunk in lmcd's chunk format `[K, layers, tokens, hidden]` (lmcache's
  MLA shape `[layers, tokens, hidden]` is the same bytes), so chunks stored
  through a pool are found by host-path and CUDA instances of the same
  model and vice versa (same `KVLayout.tag`, same size).
- Storage is reserved at PrepareStore (chunks present or in flight are
  skipped, as lmcache's server does; no room is a failure before the
  worker copies anything) and committed at CommitStore once the slots are
  copied. When only some chunks fit (pool or storage), the leading ones are
  granted: a stored prefix is still a cache hit.
- A prepare not committed is freed when the same transfer is prepared
  again, at unregistration or reaping, and after `ttl` seconds.
- *Inline* instances (lmcache 0.4.6, whose engine-driven transport is a
  pickle in the message) have no pool: CommitStore carries the chunks
  (decoded by `lmcd.wire.tensorpickle`, which builds no objects but bytes)
  and PrepareRetrieve returns them; CommitRetrieve has nothing to free.
- lmcache 0.4 workers ping without their instance id: their instances are
  registered with `pings` False and never reaped.

Everything but the copies runs on the Trio thread; the copies never touch
the storage index.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
import trio

from lmcd.errors import ProtocolError, RegistrationError, TierError, TransferError
from lmcd.lookups import Sessions
from lmcd.storage import Pin, Reservation, StorageManager
from lmcd.transfer.host import SHM_ROOT
from lmcd.transfer.layouts import DTYPE_SIZES, KVLayout
from lmcd.wire.types import (
    ChunkData,
    CommitRetrieve,
    CommitStore,
    PoolInfo,
    PoolSlot,
    PreparedSlots,
    PrepareRetrieve,
    PrepareStore,
    RegisterPool,
    TokenKey,
    TokenSpan,
    UnregisterPool,
)
from lmcd_backends.arena import Arena
from lmcd_backends.protocol import ALIGNMENT, Extent

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_POOL_BYTES = 1024 * MiB
# A prepared transfer the worker never commits is freed after this long
# (lmcache's workers wait up to 300 s for any reply).
DEFAULT_PREPARE_TTL = 300.0
# Registrations are cheap to send and each commits a whole pool of /dev/shm:
# a bound keeps a flood of them from filling it (a worker each, so this is
# generous).
DEFAULT_MAX_POOLS = 64

POOL_PREFIX = "lmcd-pool-"
_POOL_NAME = re.compile(r"lmcd-pool-(\d+)-(\d+)")
_names = itertools.count()
# Pools this process created and has not removed: start-up clean-up never
# touches them, whatever their pid says.
_live_names: set[str] = set()

TransferKind = Literal["store", "retrieve"]
TransferKey = tuple[TransferKind, str, int, int]


# -- pool files (no trio: called in worker threads or at start-up) ------------


def create_pool_file(size: int, root: str = SHM_ROOT) -> tuple[str, int]:
    """Create a new pool file of `size` bytes, fully backed, mode 0600 and
    flock'ed; returns its name (under `root`) and descriptor.

    Raises `RegistrationError` when it cannot be created or backed (a
    `root` without `size` bytes free).
    """
    uid = os.geteuid()
    for _ in range(64):
        name = f"{POOL_PREFIX}{os.getpid()}-{next(_names)}"
        path = f"{root}/{name}"
        try:
            fd = os.open(
                path,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except FileExistsError:
            continue  # someone holds the name: take the next one
        except OSError as e:
            raise RegistrationError(f"cannot create {path}: {e.strerror}") from e
        try:
            _back(fd, path, uid, size)
        except BaseException as e:
            _unlink_if_same(path, fd)
            os.close(fd)
            if isinstance(e, OSError):
                raise RegistrationError(
                    f"cannot back a {size / MiB:.0f} MiB pool in {root}: "
                    f"{e.strerror} (lower --pool-size or give {root} more room)"
                ) from e
            raise
        _live_names.add(name)
        return name, fd
    raise RegistrationError(f"no free pool name in {root}")


def _back(fd: int, path: str, uid: int, size: int) -> None:
    os.fchmod(fd, 0o600)  # whatever the umask made of it
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_nlink != 1:
        raise RegistrationError(f"{path} is not a new file of ours")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.posix_fallocate(fd, 0, size)


def _unlink_if_same(path: str, fd: int) -> None:
    """Unlink `path` if it is still the file open as `fd` (a worker of the
    same uid may have replaced it)."""
    try:
        mine, now = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return
    if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_stale_pools(root: str = SHM_ROOT) -> list[str]:
    """Remove pool files left by daemons that died without cleaning up.

    A file is removed only if its name has the pool pattern, it was not
    created by this process, the pid in its name is not running (or is this
    process's: a restarted container reuses pids), it is a regular file of
    this uid, and no process holds its lock (a live daemon in another PID
    namespace does). Returns the removed names.
    """
    uid, me = os.geteuid(), os.getpid()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed: list[str] = []
    for name in names:
        match = _POOL_NAME.fullmatch(name)
        if match is None or name in _live_names:
            continue
        pid = int(match.group(1))
        if pid != me and _alive(pid):
            continue
        path = f"{root}/{name}"
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(path, flags)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live daemon holds it
            _unlink_if_same(path, fd)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except (OverflowError, ValueError):
        return False  # beyond any pid
    return True


def _as_bytes(buffer: Any, nbytes: int) -> memoryview:
    """The first `nbytes` of a storage buffer (a uint8 CPU tensor)."""
    return memoryview(buffer.numpy()).cast("B")[:nbytes]


def read_slots(fd: int, copies: Sequence[tuple[int, int, Any]]) -> None:
    """Copy `(pool offset, nbytes, storage buffer)` from the pool file into
    the buffers. Raises `TransferError` if the file is shorter than a slot
    (a worker truncated it)."""
    for offset, nbytes, buffer in copies:
        view = _as_bytes(buffer, nbytes)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise TransferError(
                    f"pool file ends inside the slot at {offset} (truncated)"
                )
            done += n


def write_slots(fd: int, copies: Sequence[tuple[int, int, Any]]) -> None:
    """Copy storage buffers into the pool file at the slots' offsets."""
    for offset, nbytes, buffer in copies:
        view = _as_bytes(buffer, nbytes)
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, view[done:], offset + done)


def write_buffers(
    copies: Sequence[tuple[bytes | memoryview, Any]], nbytes: int
) -> None:
    """Copy chunk bytes into storage buffers (inline transfers)."""
    for data, buffer in copies:
        _as_bytes(buffer, nbytes)[:] = data


def read_buffers(buffers: Sequence[Any], nbytes: int) -> list[bytes]:
    """The first `nbytes` of each storage buffer, copied (inline transfers)."""
    return [bytes(_as_bytes(buffer, nbytes)) for buffer in buffers]


# -- bookkeeping (Trio thread) ------------------------------------------------


@attrs.define(slots=True, eq=False)
class Pool:
    """One instance's pool file. The descriptor stays open while a copy
    uses it, even after the file is removed."""

    name: str
    fd: int
    size: int
    arena: Arena
    users: int = 0
    removed: bool = False

    @property
    def path(self) -> str:
        return f"{SHM_ROOT}/{self.name}"

    def remove(self) -> None:
        """Unlink the file (workers that mapped it keep their map) and close
        the descriptor as soon as no copy uses it."""
        if not self.removed:
            self.removed = True
            _unlink_if_same(self.path, self.fd)
            _live_names.discard(self.name)
        self._close_if_unused()

    def release_user(self) -> None:
        self.users -= 1
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self.removed and not self.users and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@attrs.define(slots=True, eq=False)
class Pending:
    """A prepared transfer: its slots, and the reservation (store) or pin
    (retrieve) behind them. `busy` while a copy into or out of the slots
    runs (it cannot expire or be replaced then)."""

    kind: TransferKind
    instance: PoolInstance
    key: TransferKey
    chunks: tuple[TokenKey, ...]
    slots: list[Extent]
    reservation: Reservation | None = None
    pin: Pin | None = None
    deadline: float = 0.0
    busy: bool = False


@attrs.define(slots=True, eq=False)
class PoolInstance:
    """One registered engine-driven worker."""

    instance_id: int
    model_name: str
    world_size: int
    layout: KVLayout
    chunk_bytes: int
    slot_shape: tuple[int, ...]
    last_seen: float
    pool: Pool | None = None
    pinged: bool = False
    closing: bool = False
    inflight: int = 0
    idle: trio.Event = attrs.field(factory=trio.Event)
    ready: trio.Event = attrs.field(factory=trio.Event)
    pending: dict[TransferKey, Pending] = attrs.field(factory=dict)
    warned_short: bool = False
    pings: bool = True
    """It pings with its instance id: silence means it died (`RegisterPool`)."""
    inline: bool = False
    """No pool: chunks travel in the messages (`RegisterPool.inline`)."""

    def describe(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "instance_id": self.instance_id,
            "model_name": self.model_name,
            "world_size": self.world_size,
            "layout": self.layout.tag,
            "pool": None if pool is None else pool.name,
            "inline": self.inline,
            "pool_bytes": 0 if pool is None else pool.size,
            "slot_bytes_used": 0 if pool is None else pool.arena.used,
            "pending": len(self.pending),
            "inflight": self.inflight,
        }


@attrs.define(slots=True)
class PoolCounters:
    registered: int = 0
    unregistered: int = 0
    prepared_stores: int = 0
    committed_stores: int = 0
    stored_chunks: int = 0
    present_chunks: int = 0
    short_chunks: int = 0
    prepared_retrieves: int = 0
    committed_retrieves: int = 0
    retrieved_chunks: int = 0
    retrieve_misses: int = 0
    expired_prepares: int = 0
    replaced_prepares: int = 0
    failed_copies: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@attrs.frozen
class PoolJob:
    """What is left to do, off the admission path, for an admitted request."""

    op: Literal[
        "create",
        "refresh",
        "commit_store",
        "prepare_retrieve",
        "inline_store",
        "inline_retrieve",
        "unregister",
        "done",
    ]
    instance: PoolInstance | None = None
    pending: Pending | None = None
    result: object = None
    # Inline transfers: the chunks to store, with their reservation, or the
    # pinned chunks to read.
    data: tuple[ChunkData, ...] = ()
    reservation: Reservation | None = None
    pin: Pin | None = None
    keys: tuple[TokenKey, ...] = ()


@attrs.define(slots=True, eq=False)
class EnginePools:
    """Engine-driven workers, their pools and prepared transfers.

    `pool_bytes` is each instance's pool size (0: engine-driven transfers
    are refused), `max_pools` how many instances may hold one at once;
    `clock` stamps liveness and prepare deadlines.
    """

    storage: StorageManager
    sessions: Sessions
    chunk_size: int
    pool_bytes: int = DEFAULT_POOL_BYTES
    max_workers: int = 1
    clock: Callable[[], float] = time.monotonic
    ttl: float = DEFAULT_PREPARE_TTL
    max_pools: int = DEFAULT_MAX_POOLS
    counters: PoolCounters = attrs.field(factory=PoolCounters)
    _instances: dict[int, PoolInstance] = attrs.field(factory=dict, init=False)
    # Uncommitted, not busy prepares in order of deadline (the TTL is
    # constant, so insertion order is deadline order).
    _waiting: dict[Pending, None] = attrs.field(factory=dict, init=False)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.pool_bytes % ALIGNMENT:
            raise ValueError(f"pool size must be a multiple of {ALIGNMENT}")
        self._limiter = trio.CapacityLimiter(self.max_workers)

    # -- lifetime -------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Remove dead daemons' pools, then free expired prepares until
        cancelled; every pool is removed on the way out."""
        try:
            removed = await trio.to_thread.run_sync(remove_stale_pools)
            if removed:
                log.info(
                    "Removed %d pool files of dead daemons: %s",
                    len(removed),
                    ", ".join(sorted(removed)),
                )
            self._check_room()
            task_status.started()
            period = min(10.0, self.ttl / 4)
            while True:
                await trio.sleep(period)
                self.expire()
        finally:
            self.close()

    def _check_room(self) -> None:
        if not self.pool_bytes:
            return
        try:
            st = os.statvfs(SHM_ROOT)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < self.pool_bytes:
            log.warning(
                "%s has %.0f MiB free, less than one %.0f MiB engine-driven pool: "
                "engine-driven workers will fail to register (lower --pool-size "
                "or give %s more room)",
                SHM_ROOT,
                free / MiB,
                self.pool_bytes / MiB,
                SHM_ROOT,
            )

    def close(self) -> None:
        """Free every prepared transfer that is not being copied and remove
        every pool (descriptors close as their last copy ends)."""
        for instance in list(self._instances.values()):
            instance.closing = True
            for pending in list(instance.pending.values()):
                if not pending.busy:
                    self._abandon(pending, release_locks=True)
            if instance.pool is not None:
                instance.pool.remove()
        self._instances.clear()

    # -- instances ------------------------------------------------------------

    def instances(self) -> list[PoolInstance]:
        return list(self._instances.values())

    def serves(self, model_name: str, world_size: int) -> bool:
        """Whether an engine-driven worker runs this model at this world size."""
        return any(
            i.model_name == model_name and i.world_size == world_size and not i.closing
            for i in self._instances.values()
        )

    def touch(self, instance_id: int) -> bool:
        """A heartbeat from `instance_id`; False if it is not registered here."""
        instance = self._instances.get(instance_id)
        if instance is None or instance.closing:
            return False
        instance.last_seen = self.clock()
        instance.pinged = True
        return True

    def silent_instances(self, now: float, timeout: float, grace: float) -> list[int]:
        """Workers silent for longer than `timeout` (after their first ping)
        or `grace` (never pinged): the ones to reap."""
        return [
            i.instance_id
            for i in self._instances.values()
            if i.pings
            and not i.closing
            and now - i.last_seen > (timeout if i.pinged else grace)
        ]

    def registered(self, instance_id: int) -> bool:
        """Whether `instance_id` is an engine-driven worker registered here."""
        return instance_id in self._instances

    def _instance(self, instance_id: int) -> PoolInstance:
        instance = self._instances.get(instance_id)
        if (
            instance is None
            or instance.closing
            or (instance.pool is None and not instance.inline)
        ):
            raise TransferError(f"no engine-driven pool registered for {instance_id}")
        instance.last_seen = self.clock()
        return instance

    # -- admission (Trio thread, in arrival order) ----------------------------

    def admit(
        self, request: RegisterPool | UnregisterPool | CommitStore | PrepareRetrieve
    ) -> PoolJob:
        """Admit a request that needs a task (file creation, a copy, a wait):
        validate it and take what it needs now, so that requests take effect
        in arrival order. Raises `RegistrationError` / `TransferError`."""
        if isinstance(request, RegisterPool):
            return self._admit_register(request)
        if isinstance(request, UnregisterPool):
            instance = self._instances.get(request.instance_id)
            if instance is None:
                raise TransferError(
                    f"no engine-driven pool registered for {request.instance_id}"
                )
            instance.closing = True
            return PoolJob("unregister", instance)
        if isinstance(request, CommitStore):
            return self._admit_commit_store(request)
        return self._admit_prepare_retrieve(request)

    async def run(self, job: PoolJob) -> object:
        """Finish an admitted request; returns its result."""
        if job.op == "done":
            return job.result
        instance = job.instance
        assert instance is not None
        if job.op == "create":
            return await self._create(instance)
        if job.op == "refresh":
            await instance.ready.wait()
            if instance.pool is None:
                raise RegistrationError(
                    f"registration of {instance.instance_id} failed"
                )
            return PoolInfo(instance.pool.name, instance.pool.size)
        if job.op == "unregister":
            await self.unregister(instance.instance_id)
            return None
        if job.op == "inline_store":
            return await self._inline_store(job)
        if job.op == "inline_retrieve":
            return await self._inline_retrieve(job)
        assert job.pending is not None
        if job.op == "commit_store":
            return await self._commit_store(job.pending)
        return await self._prepare_retrieve(job.pending)

    # -- registration ---------------------------------------------------------

    def _admit_register(self, request: RegisterPool) -> PoolJob:
        instance = self._instances.get(request.instance_id)
        if instance is not None:
            if instance.closing:
                raise RegistrationError(
                    f"{request.instance_id} is being unregistered; register again"
                )
            # lmcache: registering a known instance only refreshes it.
            instance.last_seen = self.clock()
            if instance.inline:
                return PoolJob("done", result=PoolInfo("", 0))
            return PoolJob("refresh", instance)
        if request.inline:
            return self._register_inline(request)
        if not self.pool_bytes:
            raise RegistrationError(
                "engine-driven transfers are off (--pool-size 0); run the worker "
                "with lmcache.mp.mp_transfer_mode=lmcache_driven"
            )
        instance = self._new_instance(request, "hold pools")
        self._instances[request.instance_id] = instance
        self._begin(instance)
        return PoolJob("create", instance)

    def _new_instance(self, request: RegisterPool, held: str) -> PoolInstance:
        """A worker's instance record (not yet listed), within the limit on
        engine-driven workers; `held` says what the others do in the
        refusal ("hold pools", "are registered")."""
        layout, shape = self._layout(request)
        if len(self._instances) >= self.max_pools:
            raise RegistrationError(
                f"{len(self._instances)} engine-driven workers {held} already "
                f"(at most {self.max_pools}, a fixed limit)"
            )
        return PoolInstance(
            request.instance_id,
            request.model_name,
            request.world_size,
            layout,
            layout.chunk_bytes(self.chunk_size),
            shape,
            self.clock(),
            pings=request.pings,
            inline=request.inline,
        )

    def _register_inline(self, request: RegisterPool) -> PoolJob:
        instance = self._new_instance(request, "are registered")
        instance.ready.set()
        self._instances[request.instance_id] = instance
        self.counters.registered += 1
        log.info(
            "Registered engine-driven worker %d (%s, world size %d, %s); its "
            "chunks travel in its messages (no pool)",
            instance.instance_id,
            instance.model_name,
            instance.world_size,
            instance.layout.tag,
        )
        return PoolJob("done", result=PoolInfo("", 0))

    def _layout(self, request: RegisterPool) -> tuple[KVLayout, tuple[int, ...]]:
        """The chunk layout of a registration, and its slot shape as lmcache
        views it. Raises `RegistrationError` for one lmcd cannot serve."""
        size = self.chunk_size
        if request.dtype not in DTYPE_SIZES:
            raise RegistrationError(f"unsupported dtype {request.dtype!r}")
        if request.num_layers < 1 or request.hidden < 1 or request.block_size < 1:
            raise RegistrationError("layers, hidden size and block size must be > 0")
        if request.slots_per_chunk not in (None, size):
            raise RegistrationError(
                f"the worker's chunks hold {request.slots_per_chunk} token slots; "
                f"lmcd's hold {size} tokens (--chunk-size)"
            )
        # No paged cache is opened on this path (num_blocks 0): the layout
        # names the chunk format, which must be the one every other path of
        # the same model stores.
        layout = KVLayout(
            "mla" if request.mla else "mha",
            request.num_layers,
            0,
            request.block_size,
            request.hidden,
            request.dtype,
        )
        layout.blocks_per_chunk(size)  # the block size must divide the chunk
        nbytes = layout.chunk_bytes(size)
        if nbytes > self.pool_bytes and not request.inline:
            raise RegistrationError(
                f"a {nbytes / MiB:.1f} MiB chunk does not fit a "
                f"{self.pool_bytes / MiB:.0f} MiB pool (raise --pool-size)"
            )
        shape: tuple[int, ...] = layout.chunk_shape(size)
        if request.mla:
            shape = shape[1:]  # lmcache views single-plane chunks in 3 dims
        return layout, shape

    async def _create(self, instance: PoolInstance) -> PoolInfo:
        try:
            name, fd = await trio.to_thread.run_sync(create_pool_file, self.pool_bytes)
        except BaseException:
            if self._instances.get(instance.instance_id) is instance:
                del self._instances[instance.instance_id]
            instance.ready.set()
            self._end(instance)
            raise
        size = self.pool_bytes
        instance.pool = Pool(name, fd, size, Arena(size, size))
        instance.ready.set()
        self._end(instance)
        self.counters.registered += 1
        log.info(
            "Registered engine-driven worker %d (%s, world size %d, %s) with "
            "pool %s (%.0f MiB)",
            instance.instance_id,
            instance.model_name,
            instance.world_size,
            instance.layout.tag,
            name,
            size / MiB,
        )
        return PoolInfo(name, size)

    async def unregister(self, instance_id: int) -> bool:
        """Wait for the instance's copies, then free everything it holds and
        remove its pool. False for an unknown instance."""
        instance = self._instances.get(instance_id)
        if instance is None:
            return False
        instance.closing = True
        if instance.inflight:
            await instance.idle.wait()
        for pending in list(instance.pending.values()):
            self._abandon(pending, release_locks=True)
        if self._instances.get(instance_id) is instance:
            del self._instances[instance_id]
            self.counters.unregistered += 1
            log.info("Unregistered engine-driven worker %d", instance_id)
        if instance.pool is not None:
            instance.pool.remove()
        return True

    def _begin(self, instance: PoolInstance) -> None:
        if not instance.inflight:
            instance.idle = trio.Event()
        instance.inflight += 1

    def _end(self, instance: PoolInstance) -> None:
        instance.inflight -= 1
        if not instance.inflight:
            instance.idle.set()

    # -- store ----------------------------------------------------------------

    def prepare_store(self, request: PrepareStore) -> PreparedSlots:
        """Reserve storage and slots for the span's chunks that are neither
        stored nor in flight; `chunk_indices` says which chunks of the span
        the slots are for. No slots: nothing to write (all present). Raises
        `TransferError` when none of the missing chunks find room."""
        instance = self._instance(request.instance_id)
        if instance.inline:
            # Nothing to prepare: the chunks come with the commit.
            self.counters.prepared_stores += 1
            return PreparedSlots(())
        pool = instance.pool
        assert pool is not None
        span = request.span
        keys = self._keys(instance, span)
        self.expire()
        key = _transfer_key("store", span)
        self._replace(instance, key)
        self.counters.prepared_stores += 1
        if not keys:
            return PreparedSlots(())
        try:
            reservation = self.storage.reserve(
                keys, instance.chunk_bytes, instance.layout.tag
            )
        except (ValueError, TierError) as e:  # TierError: memory refused
            raise TransferError(str(e)) from e
        entries = reservation.entries
        slots: list[Extent] = []
        for _ in entries:
            extent = pool.arena.allocate(instance.chunk_bytes)
            if extent is None:
                break
            slots.append(extent)
        granted = len(slots)
        if granted < len(entries):
            self.storage.abort(
                Reservation(entries[granted:], reservation.indices[granted:], 0, 0)
            )
        kept = Reservation(
            entries[:granted], reservation.indices[:granted], reservation.present, 0
        )
        self.counters.present_chunks += reservation.present
        short = len(keys) - reservation.present - granted
        if short:
            self.counters.short_chunks += short
            what = (
                f"{pool.arena.used / MiB:.0f} of {pool.size / MiB:.0f} MiB of "
                f"pool {pool.name} in use"
                if granted < len(entries)
                else self.storage.full_reason()
            )
            if not granted:
                raise TransferError(
                    f"no room for any of {short} chunks of request "
                    f"{span.request_id!r} ({what})"
                )
            (log.debug if instance.warned_short else log.warning)(
                "Engine-driven store of request %r: %d of %d chunks not stored (%s)",
                span.request_id,
                short,
                len(keys),
                what,
            )
            instance.warned_short = True
        if not granted:
            return PreparedSlots(())
        pending = Pending("store", instance, key, tuple(keys), slots, reservation=kept)
        self._wait(pending)
        return PreparedSlots(
            tuple(self._slot(instance, e) for e in slots), kept.indices
        )

    def _admit_commit_store(self, request: CommitStore) -> PoolJob:
        instance = self._instance(request.instance_id)
        if instance.inline:
            return self._admit_inline_store(instance, request)
        if request.chunks is not None:
            raise TransferError(
                f"commit_store with data for {instance.instance_id}, whose chunks "
                "go through its pool"
            )
        span = request.span
        key = _transfer_key("store", span)
        pending = instance.pending.get(key)
        if pending is None or pending.busy:
            raise TransferError(
                f"commit_store of request {span.request_id!r} "
                f"[{span.start}, {span.end}) without a pending prepare_store"
            )
        if tuple(self._keys(instance, span)) != pending.chunks:
            # The slots hold other tokens than the ones reserved for.
            self._abandon(pending, release_locks=False)
            raise TransferError(
                f"commit_store of request {span.request_id!r} names other tokens "
                "than its prepare_store"
            )
        self._start_copy(pending)
        return PoolJob("commit_store", instance, pending)

    async def _commit_store(self, pending: Pending) -> bool:
        instance, reservation = pending.instance, pending.reservation
        pool = instance.pool
        assert reservation is not None
        assert pool is not None
        nbytes = instance.chunk_bytes
        copies = [
            (slot.offset, nbytes, self.storage.buffer(entry))
            for slot, entry in zip(pending.slots, reservation.entries, strict=True)
        ]
        try:
            await trio.to_thread.run_sync(
                read_slots, pool.fd, copies, limiter=self._limiter
            )
        except BaseException as e:
            self.storage.abort(reservation)
            self._finish(pending)
            if isinstance(e, OSError | TransferError):
                self.counters.failed_copies += 1
                raise TransferError(f"commit_store copy failed: {e}") from e
            raise
        self.storage.commit(reservation)
        self._finish(pending)
        self.counters.committed_stores += 1
        self.counters.stored_chunks += len(copies)
        self.counters.bytes_in += nbytes * len(copies)
        return True

    # -- retrieve -------------------------------------------------------------

    def _admit_prepare_retrieve(self, request: PrepareRetrieve) -> PoolJob:
        instance = self._instance(request.instance_id)
        if instance.inline:
            return self._admit_inline_retrieve(instance, request)
        pool = instance.pool
        assert pool is not None
        span = request.span
        keys = self._keys(instance, span)
        self.expire()
        key = _transfer_key("retrieve", span)
        self._replace(instance, key)
        self.counters.prepared_retrieves += 1
        miss = PoolJob("done", result=PreparedSlots((), ok=False))
        if not keys:
            return miss
        pin = self.storage.pin(keys, instance.chunk_bytes, instance.layout.tag)
        if len(pin.entries) < len(keys):
            # All or nothing, and nothing held: the worker cannot take part of
            # a span, and it will not retry this one.
            self.storage.unpin(pin, completed=False)
            self.storage.release(keys, 1)
            self.counters.retrieve_misses += 1
            return miss
        slots: list[Extent] = []
        for _ in keys:
            extent = pool.arena.allocate(instance.chunk_bytes)
            if extent is None:
                for s in slots:
                    pool.arena.release(s)
                self.storage.unpin(pin, completed=False)
                self.storage.release(keys, 1)
                raise TransferError(
                    f"no room in pool {pool.name} for {len(keys)} chunks "
                    f"({pool.arena.used / MiB:.0f} of {pool.size / MiB:.0f} MiB "
                    "in use)"
                )
            slots.append(extent)
        pending = Pending("retrieve", instance, key, tuple(keys), slots, pin=pin)
        instance.pending[key] = pending
        self._start_copy(pending)
        return PoolJob("prepare_retrieve", instance, pending)

    async def _prepare_retrieve(self, pending: Pending) -> PreparedSlots:
        instance, pin = pending.instance, pending.pin
        pool = instance.pool
        assert pin is not None
        assert pool is not None
        nbytes = instance.chunk_bytes
        copies = [
            (slot.offset, nbytes, self.storage.buffer(entry))
            for slot, entry in zip(pending.slots, pin.entries, strict=True)
        ]
        try:
            await trio.to_thread.run_sync(
                write_slots, pool.fd, copies, limiter=self._limiter
            )
        except BaseException as e:
            self._finish(pending, release_locks=True)
            if isinstance(e, OSError):
                self.counters.failed_copies += 1
                raise TransferError(f"prepare_retrieve copy failed: {e}") from e
            raise
        if instance.closing:
            self._finish(pending, release_locks=True)
            raise TransferError(
                f"{instance.instance_id} was unregistered during prepare_retrieve"
            )
        pool.release_user()
        self._end(instance)
        pending.busy = False
        self._wait(pending)
        self.counters.bytes_out += nbytes * len(copies)
        return PreparedSlots(tuple(self._slot(instance, e) for e in pending.slots))

    def commit_retrieve(self, request: CommitRetrieve) -> bool:
        """The worker has read the slots: free them and release one lookup
        lock per chunk. False when nothing was prepared (a worker commits
        after a failed prepare_retrieve too)."""
        instance = self._instance(request.instance_id)
        if instance.inline:
            return True  # prepare_retrieve gave the chunks away already
        pending = instance.pending.get(_transfer_key("retrieve", request.span))
        if pending is None:
            return False
        if pending.busy:
            raise TransferError(
                f"commit_retrieve of request {request.span.request_id!r} before "
                "its prepare_retrieve was answered"
            )
        pin = pending.pin
        assert pin is not None
        self._drop(pending)
        self.storage.unpin(pin, completed=True)
        self.counters.committed_retrieves += 1
        self.counters.retrieved_chunks += len(pin.entries)
        return True

    # -- inline transfers (no pool) -------------------------------------------

    def _admit_inline_store(
        self, instance: PoolInstance, request: CommitStore
    ) -> PoolJob:
        """Reserve storage for the span's chunks that are not stored yet,
        to be filled from the chunks in the message (lmcache 0.4.6's server
        takes the leading chunks it is given, one per key, and ignores the
        rest)."""
        chunks = request.chunks
        if chunks is None:
            raise TransferError(
                f"commit_store without data for {instance.instance_id}, which has "
                "no pool"
            )
        keys = self._keys(instance, request.span)
        dtype = instance.layout.dtype
        for i, chunk in enumerate(chunks[: len(keys)]):
            if (
                chunk.shape != instance.slot_shape
                or chunk.dtype != dtype
                or len(chunk.data) != instance.chunk_bytes
            ):
                raise TransferError(
                    f"chunk {i} of request {request.span.request_id!r} is "
                    f"{chunk.dtype} {list(chunk.shape)}; the worker registered "
                    f"{dtype} {list(instance.slot_shape)}"
                )
        given = keys[: len(chunks)]
        self.counters.committed_stores += 1
        self.counters.short_chunks += len(keys) - len(given)
        try:
            reservation = self.storage.reserve(
                given, instance.chunk_bytes, instance.layout.tag
            )
        except ValueError as e:
            raise TransferError(str(e)) from e
        self.counters.present_chunks += reservation.present
        self._begin(instance)
        return PoolJob(
            "inline_store",
            instance,
            data=tuple(chunks[i] for i in reservation.indices),
            reservation=reservation,
            keys=tuple(keys),
        )

    async def _inline_store(self, job: PoolJob) -> bool:
        instance, reservation = job.instance, job.reservation
        assert instance is not None
        assert reservation is not None
        nbytes = instance.chunk_bytes
        copies = [
            (chunk.data, self.storage.buffer(entry))
            for chunk, entry in zip(job.data, reservation.entries, strict=True)
        ]
        try:
            await trio.to_thread.run_sync(
                write_buffers, copies, nbytes, limiter=self._limiter
            )
        except BaseException:
            self.storage.abort(reservation)
            self.counters.failed_copies += 1
            raise
        finally:
            self._end(instance)
        self.storage.commit(reservation)
        self.counters.stored_chunks += len(copies)
        self.counters.bytes_in += nbytes * len(copies)
        stored = reservation.present + len(copies)
        return reservation.refused == 0 and stored == len(job.keys)

    def _admit_inline_retrieve(
        self, instance: PoolInstance, request: PrepareRetrieve
    ) -> PoolJob:
        """Pin every chunk of the span (all or nothing, as lmcache 0.4.6's
        server answers) to be copied out into the reply."""
        keys = self._keys(instance, request.span)
        self.counters.prepared_retrieves += 1
        miss = PoolJob("done", result=PreparedSlots((), ok=False))
        if not keys:
            return miss
        pin = self.storage.pin(keys, instance.chunk_bytes, instance.layout.tag)
        if len(pin.entries) < len(keys):
            self.storage.unpin(pin, completed=False)
            self.storage.release(keys, 1)
            self.counters.retrieve_misses += 1
            return miss
        self._begin(instance)
        return PoolJob("inline_retrieve", instance, pin=pin, keys=tuple(keys))

    async def _inline_retrieve(self, job: PoolJob) -> PreparedSlots:
        instance, pin = job.instance, job.pin
        assert instance is not None
        assert pin is not None
        nbytes = instance.chunk_bytes
        buffers = [self.storage.buffer(entry) for entry in pin.entries]
        try:
            data = await trio.to_thread.run_sync(
                read_buffers, buffers, nbytes, limiter=self._limiter
            )
        except BaseException:
            self.storage.unpin(pin, completed=False)
            self.storage.release(job.keys, 1)
            self.counters.failed_copies += 1
            raise
        finally:
            self._end(instance)
        # The chunks are in the reply: the retrieve is over (lmcache 0.4.6
        # releases the lookup's locks here, not at commit_retrieve).
        self.storage.unpin(pin, completed=True)
        self.counters.committed_retrieves += 1
        self.counters.retrieved_chunks += len(data)
        self.counters.bytes_out += nbytes * len(data)
        dtype, shape = instance.layout.dtype, instance.slot_shape
        return PreparedSlots((), chunks=tuple(ChunkData(dtype, shape, d) for d in data))

    # -- prepared transfers ---------------------------------------------------

    def expire(self) -> int:
        """Free prepares older than the TTL; returns how many."""
        now = self.clock()
        waiting = self._waiting
        n = 0
        while waiting:
            pending = next(iter(waiting))
            if pending.deadline > now:
                break
            self._abandon(pending, release_locks=True)
            n += 1
        if n:
            self.counters.expired_prepares += n
            log.warning(
                "%d engine-driven transfers prepared but not committed within "
                "%.0f s (a fixed limit); their slots are freed",
                n,
                self.ttl,
            )
        return n

    def _keys(self, instance: PoolInstance, span: TokenSpan) -> list[TokenKey]:
        if span.worker_id is None:
            raise TransferError("engine-driven transfers must name a worker (rank)")
        if span.model_name != instance.model_name or span.world_size != (
            instance.world_size
        ):
            raise TransferError(
                f"keys of {span.model_name!r} (world size {span.world_size}) from "
                f"a worker registered for {instance.model_name!r} (world size "
                f"{instance.world_size})"
            )
        try:
            return self.sessions.keys(span)
        except ProtocolError as e:
            raise TransferError(str(e)) from e

    def _replace(self, instance: PoolInstance, key: TransferKey) -> None:
        """A transfer prepared again: free the earlier, uncommitted one."""
        earlier = instance.pending.get(key)
        if earlier is None:
            return
        if earlier.busy:
            raise TransferError(
                f"{key[0]} of request {key[1]!r} [{key[2]}, {key[3]}) is being copied"
            )
        # Its lookup locks stay: the new prepare's commit releases them.
        self._abandon(earlier, release_locks=False)
        self.counters.replaced_prepares += 1

    def _wait(self, pending: Pending) -> None:
        pending.deadline = self.clock() + self.ttl
        pending.instance.pending[pending.key] = pending
        self._waiting[pending] = None

    def _start_copy(self, pending: Pending) -> None:
        pool = pending.instance.pool
        assert pool is not None
        pending.busy = True
        self._waiting.pop(pending, None)
        self._begin(pending.instance)
        pool.users += 1

    def _finish(self, pending: Pending, release_locks: bool = False) -> None:
        """End a copy: forget the transfer and free what it holds (a pin is
        given up uncompleted; store reservations are settled by the caller)."""
        instance = pending.instance
        pool = instance.pool
        assert pool is not None
        pending.reservation = None  # committed or aborted by the caller
        self._abandon(pending, release_locks)
        pool.release_user()
        self._end(instance)

    def _abandon(self, pending: Pending, release_locks: bool) -> None:
        """Forget a transfer and free its slots, its reservation and its pin
        (with one lookup lock per chunk when `release_locks`)."""
        self._drop(pending)
        if pending.reservation is not None:
            self.storage.abort(pending.reservation)
            pending.reservation = None
        if pending.pin is not None:
            self.storage.unpin(pending.pin, completed=False)
            if release_locks:
                self.storage.release(pending.chunks, 1)
            pending.pin = None

    def _drop(self, pending: Pending) -> None:
        """Forget a transfer and free its slots."""
        instance = pending.instance
        if instance.pending.get(pending.key) is pending:
            del instance.pending[pending.key]
        self._waiting.pop(pending, None)
        pool = instance.pool
        if pool is not None:
            for extent in pending.slots:
                pool.arena.release(extent)
        pending.slots = []

    def _slot(self, instance: PoolInstance, extent: Extent) -> PoolSlot:
        return PoolSlot(
            extent.offset,
            instance.chunk_bytes,
            instance.slot_shape,
            instance.layout.dtype,
        )

    # -- statistics -----------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """The `engine_pools` section of STATS."""
        instances = list(self._instances.values())
        return {
            "pool_bytes": self.pool_bytes,
            "pools": sum(1 for i in instances if i.pool is not None),
            "slot_bytes_used": sum(
                i.pool.arena.used for i in instances if i.pool is not None
            ),
            "pending_transfers": sum(len(i.pending) for i in instances),
            "instances": [i.describe() for i in instances],
            **attrs.asdict(self.counters),
        }


def _transfer_key(kind: TransferKind, span: TokenSpan) -> TransferKey:
    # A worker may have several transfers of one request in flight (its
    # asynchronous store path prepares the next range before committing the
    # last): a transfer is one range of one request.
    return (kind, span.request_id, span.start, span.end)
