"""`DiskTier`: the copy-holding tier on a local directory (Trio adapter).

Layout of the directory:

    LMCD-DISK-TIER        marker: format version; flock-ed while a tier is open
    index.jnl             journal of written ids (rebuilt at every open)
    chunks/00 ... ff/     chunk files, named by `ObjectId.name()` (32 hex)

The index lives in memory on the Trio thread; worker threads only write,
read and remove files (see `lmcd_backends.disk.io`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import attrs
import outcome
import trio

from lmcd.errors import TierError
from lmcd_backends.disk import io
from lmcd_backends.disk.format import FORMAT_VERSION, FormatError, file_size
from lmcd_backends.protocol import CopyTierUsage, ObjectId, TierHealth

log = logging.getLogger(__name__)

MARKER = "LMCD-DISK-TIER"
MARKER_TEXT = f"lmcd disk tier, chunk format {FORMAT_VERSION}\n"
DEFAULT_THREADS = 4
DEFAULT_MIN_FREE_BYTES = 256 << 20
# Compact the journal once it holds this many records beyond two per chunk.
JOURNAL_SLACK = 4096
HEADER_READERS = 16  # threads reading headers of unjournaled files at open
LOG_INTERVAL = 10.0  # seconds between two warnings of one kind
# Worker threads run at this nice value above the daemon's: on a busy
# machine the Trio thread (LOOKUPs, the request path) gets the CPU first.
WORKER_NICE = 5

T = TypeVar("T")


class _RateLimitedLog:
    """At most one warning per kind per `LOG_INTERVAL`, with a count of
    the ones left out."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -LOG_INTERVAL) < LOG_INTERVAL:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({skipped} more since the last such warning)" if skipped else ""
        log.warning(msg + suffix, *args)


def lower_thread_priority(by: int | None = None) -> None:
    """Raise the calling thread's nice value by `by` (`WORKER_NICE` by
    default); Linux only (a thread's TID works as a "process" for
    setpriority), silently nothing elsewhere or when refused."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, now + (WORKER_NICE if by is None else by))


class _Batch:
    """Calls queued together for `_Workers`: the Trio thread is woken once,
    when the last of them ends."""

    __slots__ = ("cancelled", "done", "left", "lock", "token")

    def __init__(self, count: int, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.done = trio.Event()
        self.left = count
        self.lock = threading.Lock()
        self.cancelled = False  # set by the Trio thread: skip what has not started


class _Job:
    """One blocking call of a `_Batch`."""

    __slots__ = ("args", "batch", "fn", "result")

    def __init__(self, batch: _Batch, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.batch = batch
        self.fn = fn
        self.args = args
        self.result: outcome.Outcome[Any] | None = None

    def run(self) -> None:  # in a worker thread
        batch = self.batch
        if not batch.cancelled:
            self.result = outcome.capture(self.fn, *self.args)
        with batch.lock:
            batch.left -= 1
            last = batch.left == 0
        if last:
            with contextlib.suppress(trio.RunFinishedError):
                batch.token.run_sync_soon(batch.done.set)


class _Workers:
    """`threads` long-lived threads that take blocking calls from one queue.

    Unlike a thread per call (`trio.to_thread`), a thread that finishes a
    call takes the next queued one at once, without a round trip through
    the Trio thread, and a batch of calls wakes the Trio thread once: with
    more calls queued than threads, the disk never waits for the event
    loop, and the event loop (the request path) spends little on the disk.
    Threads start on first use, run at `WORKER_NICE`, and end at `stop()`.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._count = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread (see `run_all`)."""
        (result,) = await self.run_all([(fn, args)])
        assert result is not None
        return cast("T", result.unwrap())

    async def run_all(
        self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[outcome.Outcome[Any]]:
        """Each `fn(*args)` in worker threads, at most `threads` at once;
        their outcomes once all have ended.

        Cancelled, calls that no thread has taken yet never run, the
        running ones are waited for (a thread never outlives the call that
        lent it buffers), and `trio.Cancelled` is raised with
        `.outcomes` (None for a call that never ran) attached, so that the
        caller can account for what did happen before it re-raises.
        """
        if not calls:
            return []
        if not self._threads:
            self._start()
        batch = _Batch(len(calls), trio.lowlevel.current_trio_token())
        jobs = [_Job(batch, fn, args) for fn, args in calls]
        for job in jobs:
            self._queue.put(job)
        try:
            await batch.done.wait()
        except trio.Cancelled as cancelled:
            batch.cancelled = True
            with trio.CancelScope(shield=True):
                await batch.done.wait()
            cancelled.outcomes = [job.result for job in jobs]  # type: ignore[attr-defined]
            raise
        return [job.result for job in jobs if job.result is not None]

    def _start(self) -> None:
        for k in range(self._count):
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{k}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        lower_thread_priority()
        while (job := self._queue.get()) is not None:
            job.run()

    def stop(self) -> list[threading.Thread]:
        """Let every thread end once the queue is empty; returns them (to
        join, off the Trio thread)."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        return threads


@attrs.define(slots=True)
class _Entry:
    oid: ObjectId
    size: int


@attrs.define(slots=True, eq=False)
class _Write:
    oid: ObjectId
    size: int
    done: trio.Event = attrs.Factory(trio.Event)


@attrs.frozen
class _Opened:
    direct: bool
    index: dict[str, _Entry]
    lock_fd: int
    journal: io.Journal
    seconds: float
    from_headers: int
    removed: int
    foreign: int


def _path(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


def _view(buf: Any, oid: ObjectId, writable: bool) -> memoryview:
    """`buf` (a CPU tensor or any contiguous buffer) as flat bytes."""
    if hasattr(buf, "numpy") and callable(buf.numpy):
        buf = buf.numpy()  # a torch CPU tensor: share its memory
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("chunk buffers must be contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if len(view) != oid.nbytes:
        raise ValueError(f"buffer of {len(view)} bytes for a chunk of {oid.nbytes}")
    if writable and view.readonly:
        raise ValueError("get_into needs a writable buffer")
    return view


# No on_setattr hooks: the converter of `path` runs at construction only,
# and the counters below change per chunk on the Trio thread.
@attrs.define(slots=True, eq=False, on_setattr=attrs.setters.NO_OP)
class DiskTier:
    """A bounded, persistent, verified chunk store in one directory;
    implements `lmcd_backends.protocol.CopyTier`.

    - `path`: the directory (created if missing). It must be empty or hold
      a tier of this format; another process using it is refused.
    - `capacity_bytes`: the most the chunk files may take, headers and
      padding included (`usage().used_bytes` counts the same way). A put that
      would pass it is refused (False): the storage manager picks what to
      `delete` and tries again. The tier never evicts by itself.
    - `threads`: blocking I/O runs in at most this many worker threads.
    - `direct`: None uses O_DIRECT where the filesystem accepts it, False
      forces buffered I/O, True requires direct I/O (`TierError` otherwise).
    - `fsync`: fsync each chunk file and its directory before a put returns.
      Without it (the default) a chunk survives a crash of lmcd but maybe
      not a power loss; either way no torn or stale chunk is ever served,
      because every read checks the checksums.
    - `min_free_bytes`: `health()` reports unhealthy below this much free
      space on the filesystem.

    The directory is opened (and a previous process's chunks recovered) by
    the first method awaited; `scan()` is the natural first call. Methods
    raise `TierError` when the directory cannot be opened or after
    `aclose()`, and `ValueError` for a buffer whose length is not the id's
    `nbytes` (a caller bug); single chunks that fail are False results.
    """

    path: str = attrs.field(converter=_path)
    capacity_bytes: int
    threads: int = DEFAULT_THREADS
    direct: bool | None = None
    fsync: bool = False
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    name: str = "disk"

    _index: dict[str, _Entry] = attrs.field(factory=dict, init=False)
    _writing: dict[str, _Write] = attrs.field(factory=dict, init=False)
    _unlinking_names: set[str] = attrs.field(factory=set, init=False)
    _used: int = attrs.field(default=0, init=False)  # indexed files
    _reserved: int = attrs.field(default=0, init=False)  # files being written
    _unlinking: int = attrs.field(default=0, init=False)  # files being removed
    _state: str = attrs.field(default="new", init=False)
    _opening: trio.Event | None = attrs.field(default=None, init=False)
    _open_error: str = attrs.field(default="", init=False)
    _use_direct: bool = attrs.field(default=False, init=False)
    _journal: io.Journal | None = attrs.field(default=None, init=False)
    _lock_fd: int = attrs.field(default=-1, init=False)
    _workers: _Workers = attrs.field(init=False)
    _bounce: io.Bounce = attrs.field(factory=io.Bounce, init=False)
    _busy: int = attrs.field(default=0, init=False)  # calls in progress
    _idle: trio.Event | None = attrs.field(default=None, init=False)
    _queued: int = attrs.field(default=0, init=False)
    _compacting: bool = attrs.field(default=False, init=False)
    _warn: _RateLimitedLog = attrs.field(factory=_RateLimitedLog, init=False)
    # counters
    _reads: int = attrs.field(default=0, init=False)
    _read_bytes: int = attrs.field(default=0, init=False)
    _writes: int = attrs.field(default=0, init=False)
    _written_bytes: int = attrs.field(default=0, init=False)
    _read_failures: int = attrs.field(default=0, init=False)
    _verify_failures: int = attrs.field(default=0, init=False)
    _write_failures: int = attrs.field(default=0, init=False)
    _refused_writes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        self._workers = _Workers(self.threads, f"lmcd-{self.name}")

    # -- what the storage manager reads without I/O ---------------------------

    @property
    def direct_io(self) -> bool:
        """Whether chunk files are read and written with O_DIRECT (known
        once the directory is open)."""
        return self._use_direct

    def usage(self) -> CopyTierUsage:
        return CopyTierUsage(
            capacity_bytes=self.capacity_bytes,
            used_bytes=self._used + self._reserved + self._unlinking,
            objects=len(self._index),
            reads=self._reads,
            read_bytes=self._read_bytes,
            writes=self._writes,
            written_bytes=self._written_bytes,
            read_failures=self._read_failures,
            verify_failures=self._verify_failures,
            queue_depth=self._queued,
            write_failures=self._write_failures,
            refused_writes=self._refused_writes,
        )

    # -- the protocol ----------------------------------------------------------

    async def scan(self) -> list[tuple[ObjectId, int]]:
        """Every chunk held, with its size on disk, oldest write first (so a
        manager can seed its LRU order). The first call opens the directory
        and recovers what a previous process left; chunks are verified on
        their first read, not here. If the total exceeds `capacity_bytes`
        (the tier was reopened smaller), puts are refused until the manager
        deletes enough."""
        async with self._call():
            return [(e.oid, e.size) for e in self._index.values()]

    async def contains(self, ids: Sequence[ObjectId]) -> list[bool]:
        """Whether each id is held, from the in-memory index (no I/O)."""
        async with self._call():
            await trio.lowlevel.checkpoint()
            return [self._held(oid) for oid in ids]

    async def put(self, items: Sequence[tuple[ObjectId, Any]]) -> list[bool]:
        """Write each `(id, buffer)`. True when the id is held afterwards
        (written now, or already held: an id names immutable content). False
        for an id already being written, or being deleted, a put that would
        pass the capacity (`refused_writes`), or a failed write
        (`write_failures`). Buffers are read in worker threads; none of them
        is touched after this returns, even when it is cancelled."""
        async with self._call():
            views = [_view(buf, oid, writable=False) for oid, buf in items]
            results = [False] * len(items)
            plan: list[tuple[int, str, ObjectId, memoryview, _Write]] = []
            for i, ((oid, _), view) in enumerate(zip(items, views, strict=True)):
                try:
                    size = file_size(oid)
                except FormatError as e:
                    self._write_failures += 1
                    self._warn.warning("id", "Disk tier cannot store %r: %s", oid, e)
                    continue
                name = oid.name()
                entry = self._index.get(name)
                if entry is not None and entry.oid == oid:
                    results[i] = True
                    continue
                if name in self._writing or name in self._unlinking_names:
                    continue
                if self._used + self._reserved + self._unlinking + size > (
                    self.capacity_bytes
                ):
                    self._refused_writes += 1
                    continue
                write = _Write(oid, size)
                self._writing[name] = write
                self._reserved += size
                self._queued += 1
                plan.append((i, name, oid, view, write))
            assert self._journal is not None
            opts = io.WriteOptions(self.path, self._use_direct, self.fsync)
            journal, bounce = self._journal, self._bounce
            calls = [
                (io.write_chunk, (opts, journal, name, oid, view, bounce))
                for _, name, oid, view, _ in plan
            ]
            try:
                await self._run_planned(
                    calls, lambda done: self._wrote(plan, done, results)
                )
            finally:
                for _, name, _, _, write in plan:
                    self._finish_write(name, write)
            await self._maybe_compact()
            return results

    async def _run_planned(
        self,
        calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
        apply: Callable[[Sequence[outcome.Outcome[Any] | None]], None],
    ) -> None:
        """Run `calls` in the worker threads and `apply` their outcomes
        (None for a call that never started), also when cancelled: what the
        threads did is applied before `trio.Cancelled` goes on."""
        try:
            outcomes = list(await self._workers.run_all(calls))
        except trio.Cancelled as e:
            apply(getattr(e, "outcomes", [None] * len(calls)))
            raise
        apply(outcomes)

    def _wrote(
        self,
        plan: list[tuple[int, str, ObjectId, memoryview, _Write]],
        outcomes: Sequence[outcome.Outcome[Any] | None],
        results: list[bool],
    ) -> None:
        """Index the chunks whose write succeeded (no checkpoint since the
        threads ended: the index and the files agree)."""
        for (i, name, oid, _, write), done in zip(plan, outcomes, strict=True):
            if done is None:
                continue  # never started
            if isinstance(done, outcome.Error):
                if not isinstance(done.error, OSError):
                    done.unwrap()  # a bug: let it out
                self._write_failures += 1
                self._warn.warning("write", "Disk tier write failed: %s", done.error)
                continue
            self._index[name] = _Entry(oid, write.size)
            self._used += write.size
            self._writes += 1
            self._written_bytes += oid.nbytes
            results[i] = True

    def _finish_write(self, name: str, write: _Write) -> None:
        if self._writing.get(name) is write:
            del self._writing[name]
            self._reserved -= write.size
            self._queued -= 1
            write.done.set()

    async def get_into(self, items: Sequence[tuple[ObjectId, Any]]) -> list[bool]:
        """Read each held id into its buffer, verified (file length, magic,
        version, header checksum, full id, payload CRC32C). True when the
        buffer holds the chunk; False for an id not held, or a chunk that
        fails to read or verify: that one is counted (`read_failures`, and
        `verify_failures` when a check failed), dropped from the index and
        removed from disk, and its buffer's contents are unspecified. No
        worker touches a buffer after this returns, even when cancelled."""
        async with self._call():
            views = [_view(buf, oid, writable=True) for oid, buf in items]
            results = [False] * len(items)
            plan: list[tuple[int, str, _Entry, memoryview]] = []
            for i, ((oid, _), view) in enumerate(zip(items, views, strict=True)):
                name = oid.name()
                entry = self._index.get(name)
                if entry is not None and entry.oid == oid:
                    plan.append((i, name, entry, view))
            self._queued += len(plan)
            calls = [
                (
                    io.read_chunk,
                    (self.path, self._use_direct, name, e.oid, view, self._bounce),
                )
                for _, name, e, view in plan
            ]
            try:
                await self._run_planned(
                    calls, lambda done: self._read(plan, done, results)
                )
            finally:
                self._queued -= len(plan)
            return results

    def _read(
        self,
        plan: list[tuple[int, str, _Entry, memoryview]],
        outcomes: Sequence[outcome.Outcome[Any] | None],
        results: list[bool],
    ) -> None:
        for (i, name, entry, _), done in zip(plan, outcomes, strict=True):
            if done is not None:
                self._read_one(i, name, entry, done.unwrap(), results)

    def _read_one(
        self,
        i: int,
        name: str,
        entry: _Entry,
        result: io.ReadResult,
        results: list[bool],
    ) -> None:
        if result.outcome is io.ReadOutcome.OK:
            self._reads += 1
            self._read_bytes += entry.oid.nbytes
            results[i] = True
            return
        self._read_failures += 1
        if result.outcome is io.ReadOutcome.CORRUPT:
            self._verify_failures += 1
        self._warn.warning(
            result.outcome.value,
            "Disk tier chunk %s dropped (%s): %s",
            name,
            result.outcome.value,
            result.reason,
        )
        if self._index.get(name) is entry:
            # read_chunk removed the file (if it still was the one it read).
            del self._index[name]
            self._used -= entry.size

    async def delete(self, ids: Sequence[ObjectId]) -> None:
        """Forget each id and remove its file; returns once the files are
        gone (so `used_bytes` then no longer counts them). An id still being
        written is deleted once its write ends. No error for an id not held.
        """
        async with self._call():
            for oid in ids:
                write = self._writing.get(oid.name())
                if write is not None:
                    await write.done.wait()
            paths: list[str] = []
            names: list[str] = []
            freed = 0
            for oid in ids:
                name = oid.name()
                entry = self._index.get(name)
                if entry is None or entry.oid != oid:
                    continue
                del self._index[name]
                self._used -= entry.size
                freed += entry.size
                names.append(name)
                paths.append(io.chunk_path(self.path, name))
            if not paths:
                return
            self._unlinking += freed
            self._unlinking_names.update(names)
            try:
                await self._workers.run(_remove_all, paths)
            finally:
                self._unlinking -= freed
                self._unlinking_names.difference_update(names)

    async def health(self) -> TierHealth:
        """Healthy when the directory is open, a file can be created in it,
        and the filesystem has at least `min_free_bytes` free."""
        if self._state == "closed":
            return TierHealth(False, "closed")
        try:
            async with self._call():
                return await trio.to_thread.run_sync(
                    _probe_health, self.path, self.min_free_bytes, self.usage()
                )
        except TierError as e:
            return TierHealth(False, str(e))

    async def aclose(self) -> None:
        """Refuse new calls, wait for the ones in progress, write a compact
        journal (shielded: it takes milliseconds) and release the directory.
        """
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"
        if self._opening is not None:
            await self._opening.wait()
            was_open = self._journal is not None
        while self._busy:
            self._idle = trio.Event()
            await self._idle.wait()
        if not was_open or self._journal is None:
            self._workers.stop()
            return
        journal, self._journal = self._journal, None
        lock_fd, self._lock_fd = self._lock_fd, -1
        ids = [e.oid for e in self._index.values()]
        threads = self._workers.stop()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close, journal, ids, lock_fd, threads)

    # -- internals ---------------------------------------------------------------

    def _held(self, oid: ObjectId) -> bool:
        entry = self._index.get(oid.name())
        return entry is not None and entry.oid == oid

    @contextlib.asynccontextmanager
    async def _call(self) -> Any:
        await self._ensure_open()
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy and self._idle is not None:
                self._idle.set()

    async def _ensure_open(self) -> None:
        while True:
            if self._state == "open":
                return
            if self._state == "closed":
                raise TierError(f"disk tier {self.path} is closed")
            if self._state == "failed":
                raise TierError(self._open_error)
            if self._opening is not None:
                await self._opening.wait()
                continue
            self._opening = trio.Event()
            try:
                opened = await trio.to_thread.run_sync(
                    _open_directory, self.path, self.direct, self.fsync
                )
            except (OSError, TierError) as e:
                self._open_error = f"cannot open disk tier at {self.path}: {e}"
                # The message carries the cause; a traceback would add nothing.
                log.error("%s", self._open_error)  # noqa: TRY400
                if self._state != "closed":
                    self._state = "failed"
                raise TierError(self._open_error) from e
            finally:
                event, self._opening = self._opening, None
                event.set()
            self._adopt(opened)

    def _adopt(self, opened: _Opened) -> None:
        self._use_direct = opened.direct
        self._index = opened.index
        self._used = sum(e.size for e in opened.index.values())
        self._journal = opened.journal
        self._lock_fd = opened.lock_fd
        if self._state != "closed":
            self._state = "open"
        log.info(
            "Disk tier at %s: %d chunks, %.2f of %.2f GiB, recovered in %.2f s "
            "(%d from headers, %d bad files removed, %d foreign files left "
            "alone), %s I/O",
            self.path,
            len(self._index),
            self._used / (1 << 30),
            self.capacity_bytes / (1 << 30),
            opened.seconds,
            opened.from_headers,
            opened.removed,
            opened.foreign,
            "direct" if opened.direct else "buffered",
        )
        if self._used > self.capacity_bytes:
            log.warning(
                "Disk tier at %s holds %.2f GiB, more than its capacity of %.2f "
                "GiB: new chunks are refused until some are deleted",
                self.path,
                self._used / (1 << 30),
                self.capacity_bytes / (1 << 30),
            )

    async def _maybe_compact(self) -> None:
        journal = self._journal
        if (
            journal is None
            or self._compacting
            or journal.records < 2 * len(self._index) + JOURNAL_SLACK
        ):
            return
        self._compacting = True
        # In-flight writes are included: a record for a chunk whose write then
        # fails only costs a file-existence check at the next open.
        ids = [e.oid for e in self._index.values()]
        ids += [w.oid for w in self._writing.values()]
        try:
            await self._workers.run(journal.rewrite, ids)
        except OSError as e:
            self._warn.warning("journal", "Disk tier journal compaction failed: %s", e)
        finally:
            self._compacting = False


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        io.remove(path)


def _close(
    journal: io.Journal,
    ids: list[ObjectId],
    lock_fd: int,
    threads: list[threading.Thread],
) -> None:
    for thread in threads:
        thread.join()
    try:
        journal.rewrite(ids)
    except OSError as e:
        log.warning("Disk tier journal not compacted at close: %s", e)
    finally:
        journal.close()
        if lock_fd >= 0:
            os.close(lock_fd)  # releases the flock


def _probe_health(path: str, min_free: int, usage: CopyTierUsage) -> TierHealth:
    probe = os.path.join(path, f".health-{os.getpid()}{io.TEMP_SUFFIX}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.close(fd)
        os.unlink(probe)
        st = os.statvfs(path)
    except OSError as e:
        return TierHealth(False, f"{path} is not writable: {e}")
    free = st.f_bavail * st.f_frsize
    detail = (
        f"{usage.used_bytes / (1 << 30):.2f} of {usage.capacity_bytes / (1 << 30):.2f}"
        f" GiB used, {free / (1 << 30):.2f} GiB free on the filesystem"
    )
    if free < min_free:
        return TierHealth(False, f"filesystem nearly full: {detail}")
    return TierHealth(True, detail)


def _open_directory(path: str, direct: bool | None, fsync: bool) -> _Opened:
    """Claim `path` and rebuild the index (worker thread)."""
    started = time.perf_counter()
    os.makedirs(path, exist_ok=True)
    lock_fd = _claim(path)
    try:
        return _recover(path, direct, fsync, lock_fd, started)
    except BaseException:
        os.close(lock_fd)
        raise


def _recover(
    path: str, direct: bool | None, fsync: bool, lock_fd: int, started: float
) -> _Opened:
    chunks = os.path.join(path, io.CHUNKS_DIR)
    os.makedirs(chunks, exist_ok=True)
    for sub in io.subdir_names():
        os.makedirs(os.path.join(chunks, sub), exist_ok=True)
    use_direct = direct is not False and io.probe_direct(path)
    if direct and not use_direct:
        raise TierError(f"{path} does not support direct I/O")
    journal = io.Journal(path, fsync)
    found_journal = journal.read()
    recorded, journal_end = found_journal or ([], 0)
    listing = io.list_chunks(path)
    for temp in listing.temporaries + io.root_temporaries(path):
        io.remove(temp)
    index: dict[str, _Entry] = {}
    sizes: dict[tuple[str, int, int], int] = {}  # file_size by shape
    for oid in recorded:
        name = oid.name()
        if name in listing.names:
            shape = (oid.layout, len(oid.key), oid.nbytes)
            size = sizes.get(shape)
            if size is None:
                try:
                    size = sizes[shape] = file_size(oid)
                except FormatError:
                    continue  # a record no tier of this format writes
            # The latest record decides the order (oldest write first).
            index.pop(name, None)
            index[name] = _Entry(oid, size)
    # Every record names a present chunk, once: the journal can be kept.
    clean = found_journal is not None and len(index) == len(recorded)
    from_headers = removed = 0
    # Renamed in but not journaled (written just before a crash, or the
    # journal was lost): read their headers, in parallel (cold reads are
    # latency-bound); anything that is not a valid chunk of its name goes.
    unknown = sorted(listing.names - index.keys())
    files = [io.chunk_path(path, name) for name in unknown]
    with concurrent.futures.ThreadPoolExecutor(HEADER_READERS) as pool:
        headers = list(pool.map(io.read_header, files))
    for name, file, found in zip(unknown, files, headers, strict=True):
        if found is None or found.name() != name:
            io.remove(file)
            removed += 1
            continue
        index[name] = _Entry(found, file_size(found))
        from_headers += 1
    if listing.foreign:
        log.warning(
            "Disk tier at %s: %d files it did not write are left alone "
            "(and not counted), e.g. %s",
            path,
            len(listing.foreign),
            listing.foreign[0],
        )
    if clean and not from_headers and not removed:
        journal.reopen(journal_end, len(recorded))
    else:
        journal.rewrite(e.oid for e in index.values())
    return _Opened(
        direct=use_direct,
        index=index,
        lock_fd=lock_fd,
        journal=journal,
        seconds=time.perf_counter() - started,
        from_headers=from_headers,
        removed=removed,
        foreign=len(listing.foreign),
    )


def _claim(path: str) -> int:
    """Check or create the marker and lock it; returns the locked fd."""
    marker = os.path.join(path, MARKER)
    try:
        fd = os.open(marker, os.O_RDWR)
    except FileNotFoundError:
        others = [n for n in os.listdir(path) if n != "lost+found"]
        if others:
            raise TierError(
                f"{path} is not empty and is not an lmcd disk tier (no {MARKER}); "
                "refusing to use it"
            ) from None
        fd = os.open(marker, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, MARKER_TEXT.encode())
    try:
        _lock_marker(path, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_marker(path: str, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise TierError(f"{path} is in use by another process") from e
        raise
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    if not text:
        # Created by a process that died before writing it.
        os.write(fd, MARKER_TEXT.encode())
        text = MARKER_TEXT
    if text != MARKER_TEXT:
        raise TierError(
            f"{path} holds a disk tier of another format ({text.strip()!r}); "
            "remove it or choose another path"
        )
