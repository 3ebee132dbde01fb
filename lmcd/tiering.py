"""Lower tiers under the CPU buffer: a local disk and a shared remote cluster.

The storage manager (`lmcd.storage`) keeps the CPU buffer; this module moves
chunks between it and the copy-holding tiers (`lmcd_backends.protocol.
CopyTier`: `lmcd_backends.disk.DiskTier`, `lmcd_backends.remote.ValkeyTier`)
and keeps what the manager needs to answer without I/O:

- **The disk index**: per-rank key -> the chunk's `ObjectId` and its size on
  disk, in LRU order. Lookups count disk-resident chunks from it; capacity
  is enforced here by deleting the least recently used disk chunks before a
  write (the tier itself refuses what would pass `--disk-size`).
- **Demotion** (CPU -> disk) runs in background tasks over a queue of
  "dirty" chunks (committed in CPU, not on disk), oldest first. Write-back
  (the default) writes them only while CPU use is at or above the
  high-water mark, so that eviction finds chunks that are already on disk
  (a demoted chunk goes first in the CPU's eviction line: dropping it costs
  nothing); write-through writes every stored chunk. A STORE never waits on
  disk: the copy holds (pins) the chunk, and eviction takes other chunks.
- **Write-through to the remote tier**: every stored chunk's key goes into a
  bounded queue; when it is full the chunk is dropped and counted, never
  waited for. Nothing is ever deleted from the remote tier (it is shared,
  and evicts by itself).
- **Promotion** (disk or remote -> CPU): a lookup with lock, a lookup job
  or a retrieve that finds chunks below the CPU reserves CPU entries for
  them at once (invisible until committed; stores of the same keys skip
  them) and reads them in a background task: committed on success (with
  the locks the lookups asked for), aborted and forgotten on failure. A
  retrieve waits for the promotions of its chunks (bounded), then copies
  the prefix that really arrived.
- **Remote lookups**: keys the local tiers miss are asked of the remote
  tier in one batched `contains` within its short deadline; hits are
  promoted like disk hits (and queued for the disk, where there is one).
- **Recovery**: at start the disk tier's `scan()` seeds the index (oldest
  write first), so a restarted daemon serves hits from disk at once;
  `Registrations` remembers REGISTERs across a restart.

Everything here runs on the Trio thread; worker threads live inside the
tiers and never touch these indexes.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import msgspec
import trio

from lmcd.errors import ConfigError, RegistrationError, TierError
from lmcd.storage import Entry, Reservation, State, StorageManager
from lmcd.wire.types import (
    CacheKey,
    CudaTensorRef,
    EngineGroup,
    HostTensorRef,
    LayoutHints,
    RegisterKVCache,
    TensorRef,
    TokenKey,
)
from lmcd_backends.disk.format import FormatError, file_size
from lmcd_backends.protocol import CopyTier, ObjectId

log = logging.getLogger(__name__)

KEY_FORMAT = 1
DEFAULT_HIGH_WATER = 0.8
DEFAULT_PROMOTION_TIMEOUT = 10.0
DEFAULT_REMOTE_QUEUE = 256
DEMOTION_WRITERS = 2
REMOTE_WRITERS = 2
REMOTE_BATCH = 8
HEALTH_INTERVAL = 5.0
# Candidate layouts asked of the remote tier per key (a node rarely serves
# more than one model shape per model name).
MAX_LAYOUT_CANDIDATES = 4

# How `Tiering._claim` treats ranks already committed in CPU.
_CPU_LOCK = "lock"
_CPU_LOCKED = "locked"
_CPU_SKIP = "skip"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class Policy(enum.Enum):
    """When chunks are written to the disk tier."""

    WRITE_BACK = "write-back"
    WRITE_THROUGH = "write-through"


# -- object ids -------------------------------------------------------------


def object_key(key: CacheKey) -> bytes:
    """The neutral key as bytes: the same on every daemon (the remote tier is
    shared), and decodable back (`decode_object_key`) for recovery."""
    if isinstance(key, TokenKey):
        fields: tuple[object, ...] = (
            KEY_FORMAT,
            "t",
            key.model_name,
            key.world_size,
            key.worker_id,
            key.chunk_hash,
            key.salt,
        )
    else:
        fields = (
            KEY_FORMAT,
            "c",
            key.model_name,
            key.world_size,
            key.worker_id,
            key.chunk_hash,
        )
    return _encoder.encode(fields)


def decode_object_key(data: bytes) -> CacheKey | None:
    """The per-rank key that `object_key` made `data` from; None for bytes
    it did not make (another format, damage)."""
    try:
        fields = _decoder.decode(data)
        if not isinstance(fields, list) or fields[0] != KEY_FORMAT:
            return None
        kind, model, world, worker, chunk_hash = fields[1:6]
        if kind == "t" and len(fields) == 7:
            key: CacheKey = msgspec.convert(
                {
                    "model_name": model,
                    "world_size": world,
                    "worker_id": worker,
                    "chunk_hash": chunk_hash,
                    "salt": fields[6],
                },
                TokenKey,
            )
        elif kind == "c" and len(fields) == 6:
            key = msgspec.convert(
                {
                    "model_name": model,
                    "world_size": world,
                    "worker_id": worker,
                    "chunk_hash": chunk_hash,
                },
                CacheKey,
            )
        else:
            return None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError):
        return None
    if key.worker_id is None:
        return None
    return key


def object_id(key: CacheKey, layout: str, nbytes: int) -> ObjectId:
    """What a copy tier files the chunk of `key` under."""
    return ObjectId(object_key(key), layout, nbytes)


def _payload(storage: StorageManager, entry: Entry) -> Any:
    """The chunk's exact bytes (the extent may be longer)."""
    buf: Any = storage.buffer(entry)
    return buf[: entry.nbytes]


# -- records ----------------------------------------------------------------


@attrs.define(slots=True, eq=False)
class _DiskEntry:
    oid: ObjectId
    size: int
    readers: int = 0  # promotions reading it now: not deleted meanwhile


@attrs.define(slots=True, eq=False, repr=False)
class Promotion:
    """A chunk on its way from a lower tier into a reserved CPU entry.

    `locks` is what lookups (and waiting retrieves) asked for: applied when
    it commits. `done` is set once it has committed (`ok`) or been aborted.
    """

    key: CacheKey
    oid: ObjectId
    source: str
    reservation: Reservation
    locks: int = 0
    ok: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def entry(self) -> Entry:
        return self.reservation.entries[0]

    def __repr__(self) -> str:
        return f"Promotion({self.source}, locks={self.locks}, ok={self.ok})"


@attrs.frozen
class LocalLookup:
    """The synchronous part of a lookup: `hits` leading keys are committed
    in CPU, being promoted, or on disk (CPU ones locked when asked);
    `promotions` are what the lookup waits for; `remote`: the keys after
    `hits` should be asked of the remote tier."""

    hits: int
    promotions: tuple[Promotion, ...]
    remote: bool

    @property
    def pending(self) -> bool:
        return bool(self.promotions) or self.remote


@attrs.define(slots=True)
class TierCounters:
    """What one lower tier did (chunks unless named bytes)."""

    hits: int = 0  # chunks lookups found only in this tier
    promotions: int = 0  # chunks copied from here into CPU
    promotion_failures: int = 0  # reads that failed or did not verify
    promoted_bytes: int = 0
    demotions: int = 0  # chunks written here
    demotion_failures: int = 0
    demoted_bytes: int = 0
    dropped_writes: int = 0  # queue full (remote) or evicted before written (disk)
    deletions: int = 0  # chunks deleted to make room (disk LRU) or by CLEAR


@attrs.define(slots=True)
class _Health:
    healthy: bool = True
    detail: str = "not checked yet"


LayoutSource = Callable[[], Iterable[tuple[str | None, int | None, str, int]]]
"""(model name or None, world size or None, layout tag, chunk bytes) of each
registered KV cache: the shapes a remote lookup may ask for."""


@attrs.define(slots=True, eq=False)
class Tiering:
    """The disk and remote tiers under one storage manager (see the module
    docstring). Start it with `await nursery.start(tiering.run)`: it opens
    the disk tier and seeds the index before `started()`, and raises
    `ConfigError` when the disk tier cannot be opened.

    - `policy`, `high_water`: when chunks are demoted to disk.
    - `promotion_timeout`: the longest a retrieve or a lookup waits for its
      chunks' promotions (seconds).
    - `remote_queue`: chunks waiting to be written to the remote tier;
      beyond it new ones are dropped (counted).
    - `layouts`: the chunk shapes of registered KV caches (for remote
      lookups, whose ids include the layout).
    """

    storage: StorageManager
    disk: CopyTier | None = None
    remote: CopyTier | None = None
    policy: Policy = Policy.WRITE_BACK
    high_water: float = DEFAULT_HIGH_WATER
    promotion_timeout: float = DEFAULT_PROMOTION_TIMEOUT
    remote_queue: int = DEFAULT_REMOTE_QUEUE
    layouts: LayoutSource = lambda: ()
    demotion_batch: int = 4

    _disk_index: OrderedDict[CacheKey, _DiskEntry] = attrs.field(
        factory=OrderedDict, init=False
    )
    _disk_bytes: int = attrs.field(default=0, init=False)
    _dirty: OrderedDict[CacheKey, None] = attrs.field(factory=OrderedDict, init=False)
    _writing: set[CacheKey] = attrs.field(factory=set, init=False)
    _promoting: dict[CacheKey, Promotion] = attrs.field(factory=dict, init=False)
    _learned: dict[tuple[str, int], dict[tuple[str, int], None]] = attrs.field(
        factory=dict, init=False
    )
    _work: trio.Event = attrs.field(factory=trio.Event, init=False)
    _remote_send: trio.MemorySendChannel[CacheKey] | None = attrs.field(
        default=None, init=False
    )
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _disk_c: TierCounters = attrs.field(factory=TierCounters, init=False)
    _remote_c: TierCounters = attrs.field(factory=TierCounters, init=False)
    _disk_health: _Health = attrs.field(factory=_Health, init=False)
    _remote_health: _Health = attrs.field(factory=_Health, init=False)
    _remote_queued: int = attrs.field(default=0, init=False)
    _recovered: int = attrs.field(default=0, init=False)
    _recovery_s: float = attrs.field(default=0.0, init=False)
    _below_hit: bool = attrs.field(default=False, init=False)
    _evictions_seen: int = attrs.field(default=0, init=False)
    _held: int = attrs.field(default=0, init=False)  # bytes pinned by copies down
    _released: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        if not 0 < self.high_water <= 1:
            raise ConfigError(f"high-water mark must be in (0, 1]: {self.high_water}")
        if self.promotion_timeout <= 0 or self.remote_queue < 1:
            raise ConfigError("promotion timeout and remote queue must be positive")

    # -- life ------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the tiers (recovering the disk index), then run the
        background copies until cancelled; the tiers are closed on the way
        out (shielded: it waits for copies in progress, which end by
        themselves)."""
        try:
            async with trio.open_nursery() as nursery:
                if self.disk is not None:
                    await self._recover()
                    for _ in range(DEMOTION_WRITERS):
                        nursery.start_soon(self._demote_loop)
                if self.remote is not None:
                    send, receive = trio.open_memory_channel[CacheKey](
                        self.remote_queue
                    )
                    self._remote_send = send
                    for _ in range(REMOTE_WRITERS):
                        nursery.start_soon(self._remote_loop, receive.clone())
                    await receive.aclose()
                nursery.start_soon(self._health_loop)
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._remote_send = None
            with trio.CancelScope(shield=True):
                for tier in (self.disk, self.remote):
                    if tier is not None:
                        await tier.aclose()

    async def _recover(self) -> None:
        """Seed the disk index from what the disk tier holds (oldest write
        first, so the LRU order survives), and trim it to the capacity."""
        disk = self.disk
        assert disk is not None
        started = time.perf_counter()
        try:
            held = await disk.scan()
        except TierError as e:
            raise ConfigError(str(e)) from e
        foreign: list[ObjectId] = []
        index = self._disk_index
        for oid, size in held:
            key = decode_object_key(oid.key)
            if key is None:
                foreign.append(oid)
                continue
            index[key] = _DiskEntry(oid, size)
            self._disk_bytes += size
            self._learn(key, oid.layout, oid.nbytes)
        if foreign:
            log.warning(
                "Disk tier: %d chunks with keys of another format; deleting them",
                len(foreign),
            )
            await disk.delete(foreign)
        capacity = disk.usage().capacity_bytes
        over: list[ObjectId] = []
        while index and self._disk_bytes > capacity:
            _, entry = index.popitem(last=False)
            self._disk_bytes -= entry.size
            over.append(entry.oid)
        if over:
            log.warning(
                "Disk tier holds more than --disk-size: deleting the %d oldest chunks",
                len(over),
            )
            await disk.delete(over)
        self._recovered = len(index)
        self._recovery_s = time.perf_counter() - started
        log.info(
            "Disk tier ready: %d chunks (%.2f GiB) indexed in %.2f s",
            len(index),
            self._disk_bytes / (1 << 30),
            self._recovery_s,
        )

    # -- hooks the storage manager and handlers call (Trio thread, no I/O) ------

    def on_commit(self, entries: Sequence[Entry]) -> None:
        """`StorageManager.on_commit`: stored chunks join the disk queue and
        the remote queue."""
        if self.disk is not None:
            dirty = self._dirty
            for entry in entries:
                dirty[entry.key] = None
                self._learn(entry.key, entry.layout, entry.nbytes)
            if len(dirty) > 2 * len(self.storage) + 4096:
                self._prune_dirty()
            if self._wants_demotion():
                self._work.set()
        else:
            for entry in entries:
                self._learn(entry.key, entry.layout, entry.nbytes)
        send = self._remote_send
        if send is not None:
            for entry in entries:
                try:
                    send.send_nowait(entry.key)
                except trio.WouldBlock:
                    self._remote_c.dropped_writes += 1
                else:
                    self._remote_queued += 1

    def lookup(
        self, keys: Sequence[CacheKey], lock: bool, readers: int = 1
    ) -> LocalLookup:
        """How many leading keys the local tiers hold (CPU, promoting, disk),
        from memory; with `lock`, CPU hits are locked and disk hits start
        promotion at once (their locks are applied when they commit)."""
        self._below_hit = False
        hits = self.storage.lookup(keys, lock, readers, lower=self._holds_below)
        promotions: list[Promotion] = []
        if lock and self._below_hit:
            hits = self._claim(keys, 0, hits, readers, {}, promotions, _CPU_LOCKED)
        remote = self.remote is not None and hits < len(keys)
        return LocalLookup(hits, tuple(promotions), remote)

    async def settle(
        self,
        keys: Sequence[CacheKey],
        local: LocalLookup,
        lock: bool,
        readers: int = 1,
    ) -> int:
        """The rest of a lookup: ask the remote tier for what the local tiers
        missed, wait for the promotions (at most `promotion_timeout`), and
        return how many leading keys are now really in CPU (locked with
        `lock`); locks taken on keys past that count are given back."""
        hits = local.hits
        promotions = list(local.promotions)
        if local.remote and lock:
            hits = await self._remote_lookup(keys, hits, readers, promotions)
        elif local.remote:
            hits += await self._remote_count(keys[hits:])
            return hits
        if not lock:
            return hits
        await self.wait(promotions, readers)
        final = self._prefix_in_cpu(keys, hits)
        if final < hits:
            self.storage.release(keys[final:hits], readers)
        return final

    def settle_soon(
        self, keys: Sequence[CacheKey], local: LocalLookup, readers: int = 1
    ) -> None:
        """`settle` a locked lookup in the background (a 0.3 LOOKUP already
        answered): locks past a failed promotion are given back."""
        if self._nursery is not None and local.promotions:
            self._nursery.start_soon(self.settle, keys, local, True, readers)

    def before_retrieve(self, keys: Sequence[CacheKey]) -> list[Promotion]:
        """The promotions a RETRIEVE of `keys` must wait for: of its leading
        chunks not committed in CPU, those being promoted, and those on disk
        (promoted now). Each gains one lock, given back by `after_retrieve`
        once the retrieve has pinned what arrived."""
        if not self._disk_index and not self._promoting:
            return []
        if any(k.worker_id is None for k in keys):
            return []  # refused by the retrieve itself
        promotions: list[Promotion] = []
        self._claim(keys, 0, len(keys), 1, {}, promotions, _CPU_SKIP)
        return promotions

    async def wait(self, promotions: Sequence[Promotion], readers: int = 1) -> int:
        """Wait for `promotions` (at most `promotion_timeout`); those still
        running then give up the `readers` locks this waiter added. Returns
        how many finished."""
        with trio.move_on_after(self.promotion_timeout):
            for p in promotions:
                await p.done.wait()
        finished = 0
        for p in promotions:
            if p.done.is_set():
                finished += 1
            else:
                p.locks -= readers
        if finished < len(promotions):
            log.warning(
                "%d chunk promotions still running after --promotion-timeout "
                "%g s: those chunks are misses",
                len(promotions) - finished,
                self.promotion_timeout,
            )
        return finished

    def after_retrieve(self, promotions: Sequence[Promotion]) -> None:
        """Give back the lock `before_retrieve` added (the retrieve has
        pinned its chunks, or failed)."""
        keys = [p.key for p in promotions if p.done.is_set() and p.ok]
        if keys:
            self.storage.release(keys, 1)

    def give_back(self, promotions: Sequence[Promotion]) -> None:
        """Give back the lock `before_retrieve` added on each of
        `promotions`, finished or not (a retrieve that stopped waiting for
        them, or has pinned what arrived)."""
        for p in promotions:
            if not p.done.is_set():
                p.locks -= 1
        self.after_retrieve(promotions)

    def clear(self) -> int:
        """CLEAR: forget every disk chunk not being read and delete the files
        in the background (the remote tier is shared: never cleared)."""
        self._dirty.clear()
        if self.disk is None:
            return 0
        doomed = [k for k, e in self._disk_index.items() if not e.readers]
        oids = [self._drop_disk(k) for k in doomed]
        if oids and self._nursery is not None:
            self._disk_c.deletions += len(oids)
            self._nursery.start_soon(self._delete, oids)
        return len(oids)

    # -- lookups ----------------------------------------------------------------

    def _holds_below(self, key: CacheKey) -> bool:
        if key in self._disk_index or key in self._promoting:
            self._below_hit = True
            return True
        return False

    def _claim(
        self,
        keys: Sequence[CacheKey],
        start: int,
        end: int,
        readers: int,
        remote_hits: dict[CacheKey, ObjectId],
        promotions: list[Promotion],
        cpu: str,
    ) -> int:
        """Claim the ranks of `keys[start:end]` that are not committed in CPU:
        join their promotion or start one (from disk, or from the remote
        tier for `remote_hits`), adding `readers` locks. CPU ranks are
        locked here (`_CPU_LOCK`), were locked by the caller (`_CPU_LOCKED`)
        or are left alone (`_CPU_SKIP`). Stops at the first key that cannot
        be claimed whole, undoing its claims; returns where it stopped."""
        new: list[Promotion] = []
        committed = State.COMMITTED
        storage = self.storage
        i = start
        while i < end:
            claimed: list[Promotion] = []
            locked: list[Entry] = []
            whole = True
            for rank_key in keys[i].ranks():
                entry = storage.get(rank_key)
                if entry is not None and entry.state is committed:
                    if cpu == _CPU_LOCK:
                        storage.lock([entry], readers)
                        locked.append(entry)
                    continue
                p = self._promoting.get(rank_key)
                if p is None:
                    p = self._start_promotion(rank_key, remote_hits.get(rank_key))
                    if p is not None:
                        new.append(p)
                if p is None:
                    whole = False
                    break
                p.locks += readers
                claimed.append(p)
            if not whole:
                for p in claimed:
                    p.locks -= readers
                if locked:
                    storage.release([e.key for e in locked], readers)
                if cpu == _CPU_LOCKED:
                    # storage.lookup locked this key's CPU ranks and every
                    # later key's: give those back.
                    storage.release(keys[i:end], readers)
                break
            promotions.extend(claimed)
            i += 1
        self._launch(new)
        return i

    def _start_promotion(
        self, key: CacheKey, remote_oid: ObjectId | None
    ) -> Promotion | None:
        """Reserve a CPU entry for `key` from disk (or `remote_oid`); None
        when it is not below or no CPU room can be made."""
        disk_entry = self._disk_index.get(key)
        if disk_entry is not None:
            oid, source = disk_entry.oid, "disk"
        elif remote_oid is not None:
            oid, source = remote_oid, "remote"
        else:
            return None
        try:
            reservation = self.storage.reserve(
                [key], oid.nbytes, oid.layout, promotion=True
            )
        except (ValueError, TierError):
            return None  # can never fit the CPU buffer, or it failed
        if not reservation.entries:
            if reservation.refused:
                self.storage.abort(reservation)
            return None
        p = Promotion(key, oid, source, reservation)
        self._promoting[key] = p
        if disk_entry is not None:
            disk_entry.readers += 1
            self._disk_c.hits += 1
        else:
            self._remote_c.hits += 1
        return p

    def _launch(self, new: list[Promotion]) -> None:
        if not new:
            return
        nursery = self._nursery
        if nursery is None:  # not running (shutting down): give them up
            for p in new:
                self._finish_promotion(p, False)
            return
        for source in ("disk", "remote"):
            batch = [p for p in new if p.source == source]
            if batch:
                nursery.start_soon(self._promote, source, batch)

    def _prefix_in_cpu(self, keys: Sequence[CacheKey], end: int) -> int:
        committed = State.COMMITTED
        get = self.storage.get
        for i in range(end):
            for rank_key in keys[i].ranks():
                entry = get(rank_key)
                if entry is None or entry.state is not committed:
                    return i
        return end

    def _remote_candidates(self, key: CacheKey) -> list[tuple[str, int]]:
        learned = self._learned.get((key.model_name, key.world_size))
        found: dict[tuple[str, int], None] = dict(learned or {})
        for model, world, layout, nbytes in self.layouts():
            if (model is None or model == key.model_name) and (
                world is None or world == key.world_size
            ):
                found[(layout, nbytes)] = None
        return list(found)[:MAX_LAYOUT_CANDIDATES]

    async def _remote_contains(
        self, keys: Sequence[CacheKey]
    ) -> dict[CacheKey, ObjectId]:
        """Which rank keys of `keys` the remote tier holds, in one batch."""
        remote = self.remote
        assert remote is not None
        asked: list[tuple[CacheKey, ObjectId]] = []
        get = self.storage.get
        for key in keys:
            for rank_key in key.ranks():
                entry = get(rank_key)
                if entry is not None or self._holds_below(rank_key):
                    continue
                for layout, nbytes in self._remote_candidates(rank_key):
                    asked.append((rank_key, object_id(rank_key, layout, nbytes)))
        if not asked:
            return {}
        try:
            answers = await remote.contains([oid for _, oid in asked])
        except TierError:
            return {}
        hits: dict[CacheKey, ObjectId] = {}
        for (rank_key, oid), held in zip(asked, answers, strict=True):
            if held and rank_key not in hits:
                hits[rank_key] = oid
        return hits

    async def _remote_count(self, keys: Sequence[CacheKey]) -> int:
        """Leading keys the remote tier holds (a lookup without lock)."""
        hits = await self._remote_contains(keys)
        n = 0
        for key in keys:
            for rank_key in key.ranks():
                entry = self.storage.get(rank_key)
                if not (
                    (entry is not None and entry.state is State.COMMITTED)
                    or self._holds_below(rank_key)
                    or rank_key in hits
                ):
                    return n
            n += 1
        return n

    async def _remote_lookup(
        self,
        keys: Sequence[CacheKey],
        start: int,
        readers: int,
        promotions: list[Promotion],
    ) -> int:
        hits = await self._remote_contains(keys[start:])
        if not hits:
            return start
        # State may have changed during the round trip: claim afresh (CPU
        # ranks are locked here, promotions joined or started).
        return self._claim(keys, start, len(keys), readers, hits, promotions, _CPU_LOCK)

    # -- promotion ----------------------------------------------------------------

    async def _promote(self, source: str, batch: list[Promotion]) -> None:
        tier = self.disk if source == "disk" else self.remote
        assert tier is not None
        if source == "disk" and len(batch) > 1:
            # One read per chunk, in request order, as many at once as the
            # tier has threads, each committed as soon as it verifies: a
            # RETRIEVE copies the leading chunks while the rest arrive.
            queue = iter(batch)

            async def reader() -> None:
                for p in queue:
                    await self._promote(source, [p])

            workers = min(len(batch), max(1, int(getattr(tier, "threads", 4))))
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(workers):
                        nursery.start_soon(reader)
            finally:
                for p in queue:  # never started (a reader failed)
                    self._finish_promotion(p, False)
            return
        results = [False] * len(batch)
        try:
            items = [(p.oid, _payload(self.storage, p.entry)) for p in batch]
            results = await tier.get_into(items)
        except (TierError, ValueError) as e:
            log.warning(
                "Promotion of %d chunks from %s failed: %s", len(batch), source, e
            )
        finally:
            bad: list[ObjectId] = []
            for p, ok in zip(batch, results, strict=True):
                self._finish_promotion(p, ok)
                if source == "disk" and not ok:
                    bad.append(p.oid)
            if bad:
                # The tier has dropped what failed to read or verify; drop
                # anything it still holds under those ids too.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await tier.delete(bad)

    def _finish_promotion(self, p: Promotion, ok: bool) -> None:
        storage = self.storage
        counters = self._disk_c if p.source == "disk" else self._remote_c
        if self._promoting.get(p.key) is p:
            del self._promoting[p.key]
        disk_entry = self._disk_index.get(p.key) if p.source == "disk" else None
        if disk_entry is not None and disk_entry.oid == p.oid:
            disk_entry.readers -= 1
        if ok:
            storage.commit(p.reservation, promotion=True)
            entry = p.entry
            live = storage.get(p.key) is entry and entry.state is State.COMMITTED
            p.ok = live
            if live and p.locks > 0:
                storage.lock([entry], p.locks)
            counters.promotions += 1
            counters.promoted_bytes += p.oid.nbytes
            if disk_entry is not None:
                self._disk_index.move_to_end(p.key)
            elif live and self.disk is not None and p.key not in self._disk_index:
                self._dirty[p.key] = None  # remote hits go to disk too
                if self._wants_demotion():
                    self._work.set()
        else:
            storage.abort(p.reservation)
            counters.promotion_failures += 1
            if disk_entry is not None and disk_entry.oid == p.oid:
                self._drop_disk(p.key)
        p.done.set()

    # -- demotion to disk -----------------------------------------------------------

    def _wants_demotion(self) -> bool:
        if not self._dirty:
            # Everything written: evictions so far found clean chunks.
            self._evictions_seen = self.storage.evicted_chunks
            return False
        if self.policy is Policy.WRITE_THROUGH:
            return True
        storage = self.storage
        # Above the high-water mark, or evicting already (a buffer carved
        # into segments can be full below the mark).
        return (
            storage.committed_bytes >= self.high_water * storage.tier.capacity
            or storage.evicted_chunks > self._evictions_seen
        )

    def _prune_dirty(self) -> None:
        get = self.storage.get
        for key in [k for k in self._dirty if get(k) is None]:
            del self._dirty[key]
            self._disk_c.dropped_writes += 1

    def _release_held(self, nbytes: int) -> None:
        self._held -= nbytes
        self._released.set()

    async def _wait_released(self) -> None:
        if self._released.is_set():
            self._released = trio.Event()
        await self._released.wait()

    def _hold_budget(self) -> int:
        """Bytes background copies may hold (pin) at once: a quarter of the
        CPU buffer, so that stores always find evictable chunks."""
        return self.storage.tier.capacity // 4

    def _next_demotions(self) -> list[Entry]:
        batch: list[Entry] = []
        if not self._wants_demotion():
            return batch
        get = self.storage.get
        dirty = self._dirty
        room = self._hold_budget() - self._held
        while dirty and len(batch) < self.demotion_batch:
            key = next(iter(dirty))
            entry = get(key)
            if entry is None or entry.state is not State.COMMITTED:
                del dirty[key]
                self._disk_c.dropped_writes += 1  # evicted before written
                continue
            if key in self._disk_index or key in self._writing:
                del dirty[key]
                continue
            if entry.nbytes > room and (batch or self._held):
                break  # wait for copies in flight to let go
            del dirty[key]
            room -= entry.nbytes
            batch.append(entry)
        return batch

    async def _demote_loop(self) -> None:
        while True:
            batch = self._next_demotions()
            if not batch:
                if self._work.is_set():
                    self._work = trio.Event()
                await self._work.wait()
                continue
            await self._demote(batch)
            self._work.set()  # held bytes were given back: others may go on

    async def _demote(self, batch: list[Entry]) -> None:
        disk = self.disk
        assert disk is not None
        storage = self.storage
        pin = storage.hold(batch)
        entries = pin.entries
        oids = [object_id(e.key, e.layout, e.nbytes) for e in entries]
        keys = [e.key for e in entries]
        results = [False] * len(entries)
        sizes: list[int] = []
        held = sum(e.nbytes for e in entries)
        self._held += held
        self._writing.update(keys)
        try:
            for oid in oids:
                try:
                    sizes.append(file_size(oid))
                except FormatError:
                    sizes.append(0)
            await self._make_room(sum(sizes))
            results = await disk.put(
                [
                    (oid, _payload(storage, e))
                    for oid, e in zip(oids, entries, strict=True)
                ]
            )
        except TierError as e:
            log.warning("Demotion of %d chunks failed: %s", len(entries), e)
        finally:
            self._release_held(held)
            self._writing.difference_update(keys)
            storage.unhold(pin)
        for key, oid, size, ok in zip(keys, oids, sizes, results, strict=True):
            if ok:
                if key not in self._disk_index:
                    self._disk_index[key] = _DiskEntry(oid, size)
                    self._disk_bytes += size
                self._disk_c.demotions += 1
                self._disk_c.demoted_bytes += oid.nbytes
            else:
                self._disk_c.demotion_failures += 1

    async def _make_room(self, needed: int) -> None:
        """Delete least recently used disk chunks (not being read) until
        `needed` more bytes fit under the capacity."""
        disk = self.disk
        assert disk is not None
        usage = disk.usage()
        excess = usage.used_bytes + needed - usage.capacity_bytes
        if excess <= 0:
            return
        victims: list[CacheKey] = []
        for key, entry in self._disk_index.items():
            if excess <= 0:
                break
            if entry.readers:
                continue
            victims.append(key)
            excess -= entry.size
        if not victims:
            return
        oids = [self._drop_disk(k) for k in victims]
        self._disk_c.deletions += len(oids)
        await disk.delete(oids)

    def _drop_disk(self, key: CacheKey) -> ObjectId:
        # A CPU copy, if any, is not queued again: rewriting what the disk's
        # LRU order just let go would churn whenever the disk is full.
        entry = self._disk_index.pop(key)
        self._disk_bytes -= entry.size
        return entry.oid

    async def _delete(self, oids: list[ObjectId]) -> None:
        disk = self.disk
        assert disk is not None
        try:
            await disk.delete(oids)
        except TierError as e:
            log.warning("Disk tier delete failed: %s", e)

    # -- write-through to the remote tier -------------------------------------------

    async def _remote_loop(self, receive: trio.MemoryReceiveChannel[CacheKey]) -> None:
        async with receive:
            carry: CacheKey | None = None  # received, did not fit the last batch
            while True:
                if carry is None:
                    try:
                        first = await receive.receive()
                    except trio.EndOfChannel:
                        return
                    self._remote_queued -= 1
                else:
                    first, carry = carry, None
                entries, carry = await self._remote_batch(first, receive)
                if entries:
                    await self._remote_write(entries)

    async def _remote_batch(
        self, first: CacheKey, receive: trio.MemoryReceiveChannel[CacheKey]
    ) -> tuple[list[Entry], CacheKey | None]:
        """`first` and what else is queued, within the hold budget (waiting
        for room: the queue meanwhile fills, and stores past it are dropped,
        never waited for). Returns the entries and a key that did not fit."""
        storage = self.storage
        entry = storage.get(first)
        while (
            entry is not None
            and self._held
            and self._held + entry.nbytes > self._hold_budget()
        ):
            await self._wait_released()
            entry = storage.get(first)
        if entry is None:
            self._remote_c.dropped_writes += 1  # evicted meanwhile
            return [], None
        entries = [entry]
        room = self._hold_budget() - self._held - entry.nbytes
        while len(entries) < REMOTE_BATCH:
            try:
                key = receive.receive_nowait()
            except trio.WouldBlock:
                break
            self._remote_queued -= 1
            e = storage.get(key)
            if e is None:
                self._remote_c.dropped_writes += 1
            elif e.nbytes > room:
                return entries, key
            else:
                entries.append(e)
                room -= e.nbytes
        return entries, None

    async def _remote_write(self, entries: list[Entry]) -> None:
        remote = self.remote
        assert remote is not None
        storage = self.storage
        pin = storage.hold(entries)
        self._remote_c.dropped_writes += len(entries) - len(pin.entries)
        if not pin.entries:
            return
        held = sum(e.nbytes for e in pin.entries)
        self._held += held
        results = [False] * len(pin.entries)
        try:
            items = [
                (object_id(e.key, e.layout, e.nbytes), _payload(storage, e))
                for e in pin.entries
            ]
            results = await remote.put(items)
        except TierError as e:
            log.warning("Remote write failed: %s", e)
        finally:
            self._release_held(held)
            storage.unhold(pin)
        for entry, ok in zip(pin.entries, results, strict=True):
            if ok:
                self._remote_c.demotions += 1
                self._remote_c.demoted_bytes += entry.nbytes
            else:
                self._remote_c.demotion_failures += 1

    # -- health and statistics --------------------------------------------------------

    async def _health_loop(self) -> None:
        # A remote tier makes its first contact in the background: give it
        # a moment before the first verdict.
        await trio.sleep(1.0)
        while True:
            for tier, health in (
                (self.disk, self._disk_health),
                (self.remote, self._remote_health),
            ):
                if tier is None:
                    continue
                try:
                    with trio.move_on_after(HEALTH_INTERVAL):
                        h = await tier.health()
                        if h.healthy != health.healthy:
                            (log.info if h.healthy else log.warning)(
                                "%s tier is %s: %s",
                                tier.name,
                                "healthy" if h.healthy else "unhealthy",
                                h.detail,
                            )
                        health.healthy, health.detail = h.healthy, h.detail
                except TierError as e:
                    health.healthy, health.detail = False, str(e)
            await trio.sleep(HEALTH_INTERVAL)

    def statistics(self) -> dict[str, dict[str, Any]]:
        """Per tier: capacity, use, chunks, hits, promotions, demotions,
        bytes read and written, failures, queue depths and health (no I/O)."""
        s = self.storage.statistics()
        out: dict[str, dict[str, Any]] = {
            "cpu": {
                "capacity_bytes": s.tier.capacity_bytes,
                "used_bytes": s.bytes,
                "chunks": s.chunks,
                "hits": s.lookup_hit_chunks,
                "evicted_chunks": s.evicted_chunks,
                "promoting_chunks": len(self._promoting),
                "healthy": True,
            }
        }
        if self.disk is not None:
            u = self.disk.usage()
            c = self._disk_c
            out["disk"] = {
                "policy": self.policy.value,
                "capacity_bytes": u.capacity_bytes,
                "used_bytes": u.used_bytes,
                "chunks": len(self._disk_index),
                "hits": c.hits,
                "promotions": c.promotions,
                "promotion_failures": c.promotion_failures,
                "demotions": c.demotions,
                "demotion_failures": c.demotion_failures,
                "evicted_before_written": c.dropped_writes,
                "deletions": c.deletions,
                "read_bytes": u.read_bytes,
                "written_bytes": u.written_bytes,
                "read_failures": u.read_failures,
                "verify_failures": u.verify_failures,
                "write_failures": u.write_failures,
                "refused_writes": u.refused_writes,
                "queue_depth": u.queue_depth,
                "dirty_chunks": len(self._dirty),
                "recovered_chunks": self._recovered,
                "recovery_s": self._recovery_s,
                "healthy": self._disk_health.healthy,
                "detail": self._disk_health.detail,
            }
        if self.remote is not None:
            u = self.remote.usage()
            c = self._remote_c
            out["remote"] = {
                "capacity_bytes": u.capacity_bytes,
                "used_bytes": u.used_bytes,
                "chunks": u.objects,
                "hits": c.hits,
                "promotions": c.promotions,
                "promotion_failures": c.promotion_failures,
                "demotions": c.demotions,
                "demotion_failures": c.demotion_failures,
                "dropped_writes": c.dropped_writes,
                "read_bytes": u.read_bytes,
                "written_bytes": u.written_bytes,
                "read_failures": u.read_failures,
                "verify_failures": u.verify_failures,
                "queue_depth": u.queue_depth + self._remote_queued,
                "healthy": self._remote_health.healthy,
                "detail": self._remote_health.detail,
            }
        return out

    @property
    def busy(self) -> bool:
        """Whether demotions or promotions are running or due."""
        return bool(self._writing or self._promoting) or self._wants_demotion()

    @property
    def disk_chunks(self) -> int:
        return len(self._disk_index)

    def on_disk(self, key: CacheKey) -> bool:
        """Whether the disk index holds `key` (for tests and inspection)."""
        return key in self._disk_index

    def _learn(self, key: CacheKey, layout: str, nbytes: int) -> None:
        shapes = self._learned.get((key.model_name, key.world_size))
        if shapes is None:
            shapes = self._learned[(key.model_name, key.world_size)] = {}
        if (layout, nbytes) not in shapes:
            shapes[(layout, nbytes)] = None
            while len(shapes) > MAX_LAYOUT_CANDIDATES:
                del shapes[next(iter(shapes))]


# -- registrations across restarts ------------------------------------------------

STATE_FILE = "registrations.msgpack"
STATE_VERSION = 1


def encode_registration(request: RegisterKVCache) -> dict[str, Any]:
    """A REGISTER's neutral request as plain data (msgpack-able)."""
    layers: list[dict[str, Any]] = []
    for ref in request.layers:
        kind = "host" if isinstance(ref, HostTensorRef) else "cuda"
        layers.append({"kind": kind, **attrs.asdict(ref, recurse=False)})
    return {
        "instance_id": request.instance_id,
        "layers": layers,
        "model_name": request.model_name,
        "world_size": request.world_size,
        "groups": [attrs.asdict(g) for g in request.groups],
        "refresh": request.refresh,
        "engine": request.engine,
        "hints": attrs.asdict(request.hints),
    }


def decode_registration(data: dict[str, Any]) -> RegisterKVCache:
    """The request `encode_registration` made; raises `ValueError` for data
    it did not make."""
    try:
        layers: list[TensorRef] = []
        for raw in data["layers"]:
            fields = dict(raw)
            kind = fields.pop("kind")
            if kind == "host":
                layers.append(msgspec.convert(fields, HostTensorRef))
            elif kind == "cuda":
                fields["handle"] = tuple(fields["handle"])
                layers.append(msgspec.convert(fields, CudaTensorRef))
            else:
                raise ValueError(f"unknown tensor kind {kind!r}")
        return RegisterKVCache(
            instance_id=msgspec.convert(data["instance_id"], int),
            layers=tuple(layers),
            model_name=msgspec.convert(data["model_name"], str | None),
            world_size=msgspec.convert(data["world_size"], int | None),
            groups=tuple(msgspec.convert(g, EngineGroup) for g in data["groups"]),
            refresh=msgspec.convert(data["refresh"], bool),
            engine=msgspec.convert(data["engine"], str | None),
            hints=msgspec.convert(data["hints"], LayoutHints),
        )
    except (KeyError, TypeError, msgspec.ValidationError) as e:
        raise ValueError(f"not a saved registration: {e}") from e


def _write_state(path: str, data: bytes) -> None:
    temp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


@attrs.define(slots=True, eq=False)
class Registrations:
    """REGISTERs remembered in `DIR/registrations.msgpack`, so that clients
    that never register again (lmcache 0.3; 0.4+ until a heartbeat fails)
    keep being served after a daemon restart.

    `changed` (the scheduler's `on_registration`) records each REGISTER and
    UNREGISTER; a background task (`run`) rewrites the file (temporary file,
    fsync, rename: never torn). `restore` reopens the saved ones at start and
    drops, with a log line, each that can no longer be opened.
    """

    directory: str
    _saved: dict[int, RegisterKVCache] = attrs.field(factory=dict, init=False)
    _dirty: trio.Event = attrs.field(factory=trio.Event, init=False)
    _version: int = attrs.field(default=0, init=False)
    _written: int = attrs.field(default=0, init=False)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, STATE_FILE)

    def changed(self, instance_id: int, request: RegisterKVCache | None) -> None:
        if request is None:
            if self._saved.pop(instance_id, None) is None:
                return
        else:
            self._saved[instance_id] = request
        self._version += 1
        self._dirty.set()

    def load(self) -> list[RegisterKVCache]:
        """The saved requests (blocking: call at start-up, or in a thread);
        an unreadable file is logged and treated as empty."""
        try:
            with open(self.path, "rb") as f:
                raw = _decoder.decode(f.read())
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError) as e:
            log.warning("Saved registrations unreadable (%s); starting without", e)
            return []
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            log.warning("Saved registrations of another format; starting without")
            return []
        out: list[RegisterKVCache] = []
        for item in raw.get("instances", []):
            try:
                out.append(decode_registration(item))
            except ValueError as e:
                log.warning("Dropping a saved registration: %s", e)
        return out

    async def restore(
        self, register: Callable[[RegisterKVCache], Any]
    ) -> tuple[int, int]:
        """Reopen every saved registration with `register` (the scheduler's);
        returns (reopened, dropped)."""
        requests = await trio.to_thread.run_sync(self.load)
        reopened = dropped = 0
        for request in requests:
            try:
                await register(request)
            except RegistrationError as e:
                dropped += 1
                log.warning(
                    "Saved registration of GPU ID %d dropped: %s",
                    request.instance_id,
                    e,
                )
                self.changed(request.instance_id, None)
            else:
                reopened += 1
        if requests:
            log.info("Reopened %d saved registrations (%d dropped)", reopened, dropped)
        return reopened, dropped

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the file after every change until cancelled (and once more
        on the way out, if a change is still unwritten)."""
        os.makedirs(self.directory, exist_ok=True)
        task_status.started()
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                await self._flush()
        finally:
            if self._written != self._version:
                with trio.CancelScope(shield=True):
                    await self._flush()

    async def _flush(self) -> None:
        version = self._version
        data = _encoder.encode(
            {
                "version": STATE_VERSION,
                "instances": [encode_registration(r) for r in self._saved.values()],
            }
        )
        try:
            await trio.to_thread.run_sync(
                functools.partial(_write_state, self.path, data)
            )
        except OSError as e:
            log.warning("Cannot save registrations to %s: %s", self.path, e)
            return
        self._written = version
