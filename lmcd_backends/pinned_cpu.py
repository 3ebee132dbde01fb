"""The pinned-CPU tier: `--cpu-buffer-size` GB of host memory, grown in segments.

Memory comes in segments of `segment_bytes` (1 GiB by default): pinned
(page-locked, so the GPU copy engine can DMA into it) when CUDA is present,
plain anonymous memory otherwise. A segment's memory is obtained *and
committed* before the arena may place a chunk in it, so neither a copy nor
`inspect` ever meets memory that the OS has not really given:

- plain segments are mapped, advised to use transparent huge pages and
  faulted in, so a copy into them never takes a page fault: at start-up
  (`--disable-lazy-alloc`) by `MADV_POPULATE_WRITE`, which reports refused
  memory as an error; while serving, by writing a byte per page, which
  never holds up the daemon's other threads (see `_committed_anonymous`);
- pinned segments come from the CUDA host allocator, which commits and
  locks them.

Page-size policy, measured on the 2-core development VM (private 1 GiB
regions, GB/s of region; ranges over repeated runs on a shared machine):
first touch by a copy, 4 KiB pages 0.7-2.1, huge pages 4-7; populated ahead
(MADV_POPULATE_WRITE), 4 KiB pages 2.3-3.5, huge pages 7-11.6 typically (as
low as 0.5 when the hypervisor must back fresh guest memory), written a byte
per page, huge pages 0.7-8; a copy into committed memory runs at memcpy
speed (about 11) either way. Hence: huge pages, committed ahead in a worker
thread, so no copy takes a page fault.

Two ways to grow (`grow_inline`):

- inline (the default, for tools and tests): `allocate` obtains the next
  segment itself, on the calling thread, when no opened segment has room;
- ahead (the daemon): `allocate` only ever uses prepared segments, never
  blocks, and asks (`on_demand`) a `SegmentPreparer` to prepare segments in
  worker threads while the free prepared room is below `lead_bytes`. When a
  burst of stores outruns the preparer, `allocate` returns None as for a
  full buffer: the storage manager evicts if it can and otherwise refuses
  the chunks (the STORE's reply says not stored); the tier counts the event
  (`outruns`) and doubles its lead, so that the next burst finds more room.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import outcome
import trio

from lmcd_backends.arena import Arena, arena_statistics
from lmcd_backends.protocol import Extent, TierStatistics

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SEGMENT_BYTES = 1 << 30
# How much prepared, free room the daemon keeps ahead of the fill front to
# begin with (at least two segments, never more than the capacity).
DEFAULT_LEAD_BYTES = 2 << 30
# Commit one huge page per step: MADV_POPULATE_WRITE holds the process's
# mmap lock while it faults, so short calls keep other threads' mappings
# from waiting long; the step is also how often a stop request is seen.
_POPULATE_SLICE = 2 << 20

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; EINVAL before
_PAGE = mmap.PAGESIZE


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _size(n: int) -> str:
    """Bytes in binary units ("40 MiB", "1.5 GiB")."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} B"


def _segment_flag(segment_bytes: int) -> str:
    mib = segment_bytes / (1 << 20)
    return f"--segment-mb {mib:g}" if mib >= 1 else f"{_size(segment_bytes)} segments"


class PreparationCancelled(Exception):
    """`prepare` was asked to stop (the daemon is shutting down)."""


@attrs.define(slots=True)
class PinnedCpuTier:
    """Host-memory tier; implements `lmcd_backends.protocol.StorageTier`.

    `pin` None means "pin when CUDA is available". Used from one thread
    (the Trio thread), except `prepare`, which any worker thread may run.
    """

    capacity_bytes: int
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    pin: bool | None = None
    grow_inline: bool = True
    lead_bytes: int = DEFAULT_LEAD_BYTES
    huge_pages: bool = True
    # Called (on the Trio thread) when the tier wants another segment.
    on_demand: Callable[[], None] | None = None
    # Times the fill found no prepared room while capacity was left to
    # prepare (at most once per prepared segment).
    outruns: int = attrs.field(default=0, init=False)
    prepare_failures: int = attrs.field(default=0, init=False)
    _lead_grown_at: int = attrs.field(default=-1, init=False)
    _arena: Arena = attrs.field(init=False)
    _memory: list[Any] = attrs.field(factory=list, init=False)
    _preparing: int = attrs.field(default=0, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self._arena = Arena(self.capacity_bytes, self.segment_bytes)
        self.lead_bytes = min(
            self._arena.capacity, max(self.lead_bytes, 2 * self._arena.segment_bytes)
        )

    @property
    def capacity(self) -> int:
        return self._arena.capacity

    @property
    def pinned(self) -> bool:
        """Whether segments are pinned; `pin` None is resolved here, on
        first use, not at construction: it imports torch (over a second),
        which the daemon does in the background while it starts."""
        if self.pin is None:
            self.pin = _cuda_available()
        return self.pin

    @property
    def prepared_bytes(self) -> int:
        """Bytes of memory obtained, committed and open to chunks."""
        return self._arena.opened_bytes

    @property
    def preparing_bytes(self) -> int:
        """Bytes of segments being prepared right now."""
        return self._preparing

    @property
    def segment_size(self) -> int:
        """Bytes of a full segment (`segment_bytes`, aligned; at most the
        capacity)."""
        return self._arena.segment_bytes

    def fits(self, nbytes: int) -> bool:
        return self._arena.fits(nbytes)

    def too_large(self, nbytes: int) -> str | None:
        if self._arena.fits(nbytes):
            return None
        chunk = f"a {_size(nbytes)} chunk"
        if nbytes <= 0:
            return f"{chunk} is empty"
        if self._arena.segment_bytes >= self._arena.capacity:
            return (
                f"{chunk} is larger than the whole buffer (--cpu-buffer-size "
                f"{self.capacity_bytes / (1 << 30):.3g}, {_size(self.capacity)})"
            )
        return f"{chunk} is larger than a segment ({_segment_flag(self.segment_bytes)})"

    # -- allocation (Trio thread) ----------------------------------------------

    def allocate(self, nbytes: int) -> Extent | None:
        arena = self._arena
        extent = arena.allocate(nbytes, grow=False)
        if extent is None and arena.unopened_bytes:
            if self.grow_inline:
                while extent is None and arena.unopened_bytes:
                    size = arena.next_segment_size()
                    self.install(self.prepare(size), size)
                    extent = arena.allocate(nbytes, grow=False)
            else:
                self._outrun(nbytes)
        if not self.grow_inline and self.on_demand is not None and self.wanted_now():
            self.on_demand()
        return extent

    def _outrun(self, nbytes: int) -> None:
        # The fill front caught up with the preparer: the caller evicts or
        # refuses; a larger lead makes the next burst of stores fit.
        # Once per prepared segment: a STORE that evicts chunk after chunk
        # is one outrun, not one per chunk.
        if self._lead_grown_at == self.prepared_bytes:
            return
        self._lead_grown_at = self.prepared_bytes
        self.outruns += 1
        lead = min(self._arena.capacity, 2 * self.lead_bytes)
        if lead > self.lead_bytes:
            self.lead_bytes = lead
            log.info(
                "Stores outran segment preparation (%d-byte chunk, %.2f GiB "
                "prepared); preparing %.2f GiB ahead from now on",
                nbytes,
                self.prepared_bytes / (1 << 30),
                lead / (1 << 30),
            )

    def free(self, extent: Extent) -> None:
        self._arena.release(extent)

    def buffer(self, extent: Extent) -> Any:
        return self._memory[extent.segment][extent.offset : extent.offset + extent.size]

    def statistics(self) -> TierStatistics:
        return arena_statistics(self._arena)

    # -- growth ------------------------------------------------------------------

    def wanted_now(self) -> bool:
        """Whether another segment should be prepared now: the free prepared
        room plus what is being prepared is below the lead, and capacity is
        left to prepare."""
        arena = self._arena
        return (
            arena.next_segment_size(self._preparing) > 0
            and arena.opened_free + self._preparing < self.lead_bytes
        )

    def claim(self, *, all_of_it: bool = False) -> int | None:
        """The size of the next segment to prepare, counted as being
        prepared until `install` or `unclaim`; None when none is wanted
        (with `all_of_it`: when the whole capacity is claimed)."""
        if not (all_of_it or self.wanted_now()):
            return None
        size = self._arena.next_segment_size(self._preparing)
        if not size:
            return None
        self._preparing += size
        return size

    def unclaim(self, size: int) -> None:
        """A claimed segment could not be prepared."""
        self._preparing -= size
        self.prepare_failures += 1

    def install(self, memory: Any, size: int) -> None:
        """Open a prepared segment of `size` bytes (Trio thread)."""
        self._preparing = max(0, self._preparing - size)
        index = self._arena.open_segment(size)
        assert index == len(self._memory)
        self._memory.append(memory)
        # One line per segment only at debug level: a buffer of small
        # segments would otherwise print hundreds of lines; the daemon
        # logs the totals (and the buffer once it is fully prepared).
        log.debug(
            "Allocated %s segment %d: %s (%s of %s ready)",
            "pinned" if self.pinned else "host",
            index,
            _size(size),
            _size(self.prepared_bytes),
            _size(self.capacity),
        )

    def prepare(self, size: int, *, populate: bool = True) -> Any:
        """Obtain and commit `size` bytes of segment memory: a 1-D uint8
        tensor. Blocking; safe in any thread (it touches no shared state).
        `populate` False commits plain memory by writing to it instead, which
        never makes the daemon's other threads wait (see
        `_committed_anonymous`): for a daemon that is serving.

        Raises `MemoryError` when the memory cannot be obtained or committed,
        and `PreparationCancelled` once `cancel_preparation` was called.
        """
        import torch

        if self._stop.is_set():
            raise PreparationCancelled
        try:
            if self.pinned:
                memory = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            else:
                memory = _committed_anonymous(
                    size, self.huge_pages, self._stop, populate
                )
        except (RuntimeError, OSError) as e:
            raise MemoryError(f"cannot allocate a {size}-byte segment: {e}") from e
        return memory

    def cancel_preparation(self) -> None:
        """Make running and later `prepare` calls stop early (shutdown)."""
        self._stop.set()

    def preallocate(self) -> None:
        """Obtain and commit the whole capacity now, on this thread. Raises
        `MemoryError` if it cannot (what was obtained stays)."""
        while (size := self.claim(all_of_it=True)) is not None:
            try:
                memory = self.prepare(size)
            except BaseException:
                self.unclaim(size)
                raise
            self.install(memory, size)


# -- memory ----------------------------------------------------------------------


_libc: Any = None


def _madvise(address: int, length: int, advice: int) -> int:
    """madvise(2) through ctypes, which releases the GIL for the call (the
    mmap module's madvise does not: populating would stall every thread);
    returns 0 or the errno."""
    global _libc  # noqa: PLW0603 - loaded once, on first use
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
        _libc = lib
    if _libc.madvise(address, length, advice) == 0:
        return 0
    return ctypes.get_errno()


def _committed_anonymous(
    size: int, huge_pages: bool, stop: threading.Event, populate: bool
) -> Any:
    """`size` bytes of anonymous memory, every page faulted in (committed).

    `populate`: by `MADV_POPULATE_WRITE` (Linux 5.14+), which reports memory
    the kernel refuses as ENOMEM (an `OSError`), but holds the process's mmap
    lock while it faults, so that every other thread's mmap/munmap (malloc of
    a large buffer, a Python arena) waits for it. Otherwise, and on older
    kernels: one byte written per page, faults that take only the region's
    own lock on current kernels, so a daemon that serves meanwhile never
    waits (measured while preparing 1 GiB: another thread's mmap calls
    stalled up to 117-121 ms behind MADV_POPULATE_WRITE, at most 4-9 ms
    behind the writes), but memory refused then means the OOM killer.
    Raises `PreparationCancelled` when `stop` is set meanwhile.
    """
    import torch

    region = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The tensor keeps `region` alive through the buffer protocol.
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    address = tensor.data_ptr()
    if huge_pages:
        # Advisory: without transparent huge pages this is a no-op.
        _madvise(address, size, _MADV_HUGEPAGE)
    for start in range(0, size, _POPULATE_SLICE):
        if stop.is_set():
            raise PreparationCancelled
        length = min(_POPULATE_SLICE, size - start)
        if populate:
            err = _madvise(address + start, length, _MADV_POPULATE_WRITE)
            if err == 0:
                continue
            if err in (22, 38):  # EINVAL, ENOSYS: an older kernel
                populate = False
            else:
                raise OSError(err, f"populating memory failed: {os.strerror(err)}")
        # One byte per page (torch releases the GIL; memset would write all).
        tensor[start : start + length : _PAGE].zero_()
    return tensor


def available_memory() -> tuple[int, str] | None:
    """How many bytes this process may still obtain, and from what: the
    kernel's MemAvailable or, when lower, the memory cgroup's limit less its
    use (page cache that can be dropped not counted). None when neither can
    be read (not Linux)."""
    found: list[tuple[int, str]] = []
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/meminfo") as f,
    ):
        for line in f:
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
                break
    headroom = _cgroup_headroom()
    if headroom is not None:
        found.append(headroom)
    return min(found) if found else None


# (hierarchy, limit file, usage file, memory.stat key of reclaimable cache)
_CGROUP_V2 = ("", "memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = (
    "memory",
    "memory.limit_in_bytes",
    "memory.usage_in_bytes",
    "total_inactive_file",
)


def _cgroup_headroom() -> tuple[int, str] | None:
    try:
        with open("/proc/self/cgroup") as f:
            lines = [ln.rstrip("\n").split(":", 2) for ln in f]
    except OSError:
        return None
    candidates: list[tuple[str, str, str, str]] = []
    for _, controllers, path in (ln for ln in lines if len(ln) == 3):
        rel = path.lstrip("/")
        if controllers == "":
            for d in (rel, ""):
                candidates.append(("/sys/fs/cgroup/" + d, *_CGROUP_V2[1:]))
        elif "memory" in controllers.split(","):
            for d in (rel, ""):
                candidates.append((f"/sys/fs/cgroup/memory/{d}", *_CGROUP_V1[1:]))
    for base, limit_file, usage_file, reclaimable in candidates:
        try:
            with open(os.path.join(base, limit_file)) as f:
                limit_text = f.read().strip()
            if limit_text == "max" or int(limit_text) >= 1 << 60:
                continue  # no limit here
            with open(os.path.join(base, usage_file)) as f:
                usage = int(f.read().strip())
            with (
                contextlib.suppress(OSError, ValueError),
                open(os.path.join(base, "memory.stat")) as f,
            ):
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == reclaimable:
                        usage -= int(value)
                        break
        except (OSError, ValueError):
            continue
        return max(0, int(limit_text) - max(0, usage)), f"cgroup {limit_file}"
    return None


# -- the preparer (Trio) -----------------------------------------------------------

# Niceness of the threads that prepare segments. Copies and the Trio thread
# come first: on a machine whose cores are all busy, a preparing thread at
# the default priority delays the Trio thread's wake-ups by a scheduler
# slice or two (several ms); this one yields to them.
PREPARE_NICENESS = 10


# How long a cancelled preparation may take to notice its stop request
# before it is abandoned (it checks between 2 MiB steps; CUDA pinning is the
# one step that cannot be interrupted).
STOP_GRACE = 10.0


async def in_background_thread(
    fn: Callable[..., T], *args: Any, stop: Callable[[], None] | None = None
) -> T:
    """`fn(*args)` in a thread of its own at lower CPU priority
    (`PREPARE_NICENESS`); its result, or its exception.

    Not a `trio.to_thread` worker: a thread's priority cannot always be
    raised back, and trio's workers are reused for copies. On cancellation
    `stop()` asks `fn` to end, and the thread is waited for (up to
    `STOP_GRACE` seconds): one left running inside torch while the
    interpreter exits would abort the process.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[outcome.Outcome[T]] = []

    def target() -> None:
        with contextlib.suppress(OSError):  # not permitted, or not Linux
            tid = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, tid) + PREPARE_NICENESS
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice))
        result.append(outcome.capture(fn, *args))
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    threading.Thread(target=target, name="lmcd-prepare", daemon=True).start()
    try:
        await done.wait()
    except trio.Cancelled:
        if stop is not None:
            stop()
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
            await done.wait()
        raise
    return result[0].unwrap()


def default_prepare_workers() -> int:
    """Threads that prepare segments at once in lazy mode: one per four
    cores, at least one (preparation competes with copies for the CPU)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


@attrs.define(slots=True, eq=False)
class SegmentPreparer:
    """Prepares `tier`'s segments in worker threads ahead of its fill front.

    Run it in the daemon's nursery: `await nursery.start(preparer.run)`
    returns once the first segment is ready (or could not be obtained). A
    segment the OS refuses is logged (one line) and tried again after a
    back-off of `retry_min` doubling to `retry_max` seconds; meanwhile the
    tier serves with the memory it has.
    """

    tier: PinnedCpuTier
    workers: int = attrs.field(factory=default_prepare_workers)
    retry_min: float = 1.0
    retry_max: float = 60.0
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    _busy: int = attrs.field(default=0, init=False)
    _retry_at: float = attrs.field(default=-math.inf, init=False)
    _backoff: float = attrs.field(default=0.0, init=False)
    _limiter: trio.CapacityLimiter | None = attrs.field(default=None, init=False)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        tier = self.tier
        tier.grow_inline = False
        tier.on_demand = self._poke
        self._limiter = trio.CapacityLimiter(self.workers)
        started = False
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    self._wake = trio.Event()
                    while (
                        self._busy < self.workers
                        and trio.current_time() >= self._retry_at
                        and (size := tier.claim()) is not None
                    ):
                        self._busy += 1
                        nursery.start_soon(self._prepare_one, size)
                    if not started and (
                        tier.prepared_bytes or tier.prepare_failures or not self._busy
                    ):
                        started = True
                        task_status.started()
                    # Wake up for more demand, a finished segment, or the
                    # end of a back-off (a past deadline would spin).
                    retry = self._retry_at
                    with trio.move_on_at(
                        retry if retry > trio.current_time() else math.inf
                    ):
                        await self._wake.wait()
        finally:
            tier.on_demand = None
            tier.cancel_preparation()

    def _poke(self) -> None:
        self._wake.set()

    async def _prepare_one(self, size: int) -> None:
        tier = self.tier
        t0 = time.perf_counter()
        try:
            assert self._limiter is not None
            async with self._limiter:
                # Written, not populated: the daemon is serving meanwhile.
                memory = await in_background_thread(
                    functools.partial(tier.prepare, size, populate=False),
                    stop=tier.cancel_preparation,
                )
        except PreparationCancelled:
            tier.unclaim(size)
        except Exception as e:  # refused memory, or a bug: never fatal
            tier.unclaim(size)
            self._backoff = min(self.retry_max, max(self.retry_min, 2 * self._backoff))
            self._retry_at = trio.current_time() + self._backoff
            message = "Cannot grow the CPU buffer past %.2f GiB: %s; retrying in %.0f s"
            args = (tier.prepared_bytes / (1 << 30), e, self._backoff)
            if isinstance(e, MemoryError):
                log.warning(message, *args)
            else:
                log.exception(message, *args)
        else:
            self._backoff = 0.0
            tier.install(memory, size)
            log.debug(
                "Prepared a %s segment in %.3f s", _size(size), time.perf_counter() - t0
            )
            if tier.prepared_bytes >= tier.capacity:
                segments = tier.statistics().segments
                log.info(
                    "CPU buffer fully prepared: %s in %d segment%s of up to %s",
                    _size(tier.capacity),
                    segments,
                    "" if segments == 1 else "s",
                    _size(tier.segment_size),
                )
        finally:
            self._busy -= 1
            self._wake.set()


async def preallocate(tier: PinnedCpuTier, workers: int) -> None:
    """Obtain and commit `tier`'s whole capacity now, `workers` segments at a
    time in worker threads (`--disable-lazy-alloc`).

    Raises `MemoryError` naming the first failure; the other threads stop.
    """
    limiter = trio.CapacityLimiter(max(1, workers))
    failures: list[BaseException] = []

    async def one(size: int) -> None:
        try:
            async with limiter:
                memory = await in_background_thread(
                    tier.prepare, size, stop=tier.cancel_preparation
                )
        except (MemoryError, PreparationCancelled) as e:
            tier.unclaim(size)
            if not isinstance(e, PreparationCancelled):
                failures.append(e)
                tier.cancel_preparation()
        else:
            tier.install(memory, size)

    async with trio.open_nursery() as nursery:
        while (size := tier.claim(all_of_it=True)) is not None:
            nursery.start_soon(one, size)
    if failures:
        raise MemoryError(str(failures[0])) from failures[0]
