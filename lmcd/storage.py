"""The storage manager: key -> chunk entries, locks, pins, eviction, statistics.

It runs on the Trio thread only (it imports no trio, zmq or torch and takes a
clock), so it needs no locks: worker threads get extents that are reserved
or pinned for them and never touch this index.

Life of an entry:

    reserve() -> RESERVED (invisible; memory owned by the in-flight copy)
    commit()  -> COMMITTED (visible to lookup, evictable unless locked/pinned)
    abort()   -> freed
    eviction / clear() -> freed, or, while a copy still uses it, "doomed":
                 gone from the index and freed when the copy lets go.

LOOKUP(lock) adds a lock to every chunk it found: a refcount whose expiry
moves to `lock_ttl` after the newest lock, after which all of the chunk's
locks lapse (a client that looked up and never retrieved leaks nothing).
RETRIEVE pins its chunks while copying and, when the copy completes,
releases one lock each. Locked, pinned and reserved chunks are
never evicted: the policy only ever sees the evictable ones.

Tier failures are translated here, at the tier boundary: a tier that raises
`MemoryError` or `OSError` while a STORE reserves (memory the OS refuses)
makes `reserve` undo every reservation of that STORE and raise `TierError`;
nothing is left RESERVED and the keys can be stored again.

Lower tiers (disk, remote: `lmcd.tiering`) hook in at four places: lookups
may count chunks that a lower tier holds (`lower=`), promotions reserve and
commit CPU entries without counting as stores (`promotion=True`),
background copies `hold` committed entries, and `on_commit` hears of every
stored chunk.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Sequence

import attrs

from lmcd.errors import StorageFull, TierError
from lmcd.eviction import EvictionPolicy, LRUPolicy
from lmcd.ratelog import RateLimitedLog
from lmcd.wire.types import CacheKey
from lmcd_backends.protocol import Extent, StorageTier, TierStatistics

log = logging.getLogger(__name__)

DEFAULT_LOCK_TTL = 300.0


class State(enum.Enum):
    RESERVED = "reserved"
    COMMITTED = "committed"


@attrs.define(slots=True, eq=False, repr=False)
class Entry:
    """One chunk of one rank, in one tier extent."""

    key: CacheKey
    extent: Extent
    nbytes: int
    layout: str
    state: State = State.RESERVED
    locks: int = 0
    lock_expiry: float = 0.0
    pins: int = 0
    # Background copies to a lower tier reading it: it stays in the LRU
    # order (its place is kept) but is skipped by eviction.
    holds: int = 0
    doomed: bool = False

    def __repr__(self) -> str:
        return (
            f"Entry({self.key.model_name!r} rank {self.key.worker_id}, "
            f"{self.state.value}, locks={self.locks}, pins={self.pins})"
        )


@attrs.frozen
class Reservation:
    """What a STORE may write: `entries[i]` is the slot for request key `indices[i]`.

    `present` keys were already stored or in flight (skipped); `refused`
    keys (a suffix of the request) found no room.
    """

    entries: tuple[Entry, ...]
    indices: tuple[int, ...]
    present: int
    refused: int

    @property
    def ok(self) -> bool:
        return self.refused == 0


@attrs.frozen
class Pin:
    """The committed chunks a RETRIEVE may read: a prefix of its keys."""

    entries: tuple[Entry, ...]


@attrs.frozen
class ModelUsage:
    chunks: int
    bytes: int


@attrs.frozen
class StorageStatistics:
    """A snapshot of the storage manager (counters since start, and gauges)."""

    tier: TierStatistics
    chunks: int
    bytes: int
    reserved_chunks: int
    locked_chunks: int
    pinned_chunks: int
    doomed_chunks: int
    models: dict[str, ModelUsage]
    lookups: int
    lookup_hit_chunks: int
    lookup_miss_chunks: int
    stores: int
    stored_chunks: int
    stored_bytes: int
    store_skipped_chunks: int
    store_refused_chunks: int
    retrieves: int
    retrieved_chunks: int
    retrieved_bytes: int
    retrieve_miss_chunks: int
    evicted_chunks: int
    evicted_bytes: int
    lock_expiries: int
    cleared_chunks: int


@attrs.define(slots=True)
class _Counters:
    lookups: int = 0
    lookup_hit_chunks: int = 0
    lookup_miss_chunks: int = 0
    stores: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0
    store_skipped_chunks: int = 0
    store_refused_chunks: int = 0
    retrieves: int = 0
    retrieved_chunks: int = 0
    retrieved_bytes: int = 0
    retrieve_miss_chunks: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    lock_expiries: int = 0
    cleared_chunks: int = 0


@attrs.define(slots=True)
class StorageManager:
    """Index, locks, pins and eviction over one storage tier."""

    tier: StorageTier
    clock: Callable[[], float]
    lock_ttl: float = DEFAULT_LOCK_TTL
    policy: EvictionPolicy = attrs.field(factory=LRUPolicy)
    # Called with the entries of every commit of stored chunks (not of
    # promotions): how lower tiers learn what to write (lmcd.tiering).
    on_commit: Callable[[Sequence[Entry]], None] | None = None
    _index: dict[CacheKey, Entry] = attrs.field(factory=dict, init=False)
    # Locked entries in order of expiry: the TTL is constant, so moving an
    # entry to the end when it is locked again keeps the order sorted.
    _locked_order: dict[Entry, None] = attrs.field(factory=dict, init=False)
    _models: dict[str, list[int]] = attrs.field(factory=dict, init=False)
    _c: _Counters = attrs.field(factory=_Counters, init=False)
    _committed_chunks: int = attrs.field(default=0, init=False)
    _committed_bytes: int = attrs.field(default=0, init=False)
    _reserved: int = attrs.field(default=0, init=False)
    _locked: int = attrs.field(default=0, init=False)
    _pinned: int = attrs.field(default=0, init=False)
    _doomed: int = attrs.field(default=0, init=False)
    _held: int = attrs.field(default=0, init=False)
    _log_limit: RateLimitedLog = attrs.field(
        factory=lambda: RateLimitedLog(log, per_second=1.0), init=False
    )

    # -- store ---------------------------------------------------------------

    def reserve(
        self,
        keys: Sequence[CacheKey],
        nbytes: int,
        layout: str,
        promotion: bool = False,
    ) -> Reservation:
        """Reserve room for the chunks of a STORE, in key order.

        Keys present or in flight are skipped. When no room can be made (all
        else is locked, pinned or reserved, or the tier has not prepared
        more memory yet), the prefix that fit is kept and the rest refused.
        Raises `ValueError` for a key without a worker id or a chunk that can
        never fit the tier, and `TierError` when the tier fails (nothing of
        this STORE stays reserved). A `promotion` (a copy coming back from a
        lower tier) is not counted as a store.
        """
        self.expire_locks()
        too_large = self.tier.too_large(nbytes)
        if too_large is not None:
            raise ValueError(too_large)
        if not promotion:
            self._c.stores += 1
        entries: list[Entry] = []
        indices: list[int] = []
        index = self._index
        present = 0
        for i, key in enumerate(keys):
            if key.worker_id is None:
                raise ValueError("STORE keys must name a worker (rank)")
            if key in index:
                present += 1
                continue
            try:
                extent = self._allocate(nbytes)
            except StorageFull:
                refused = len(keys) - i
                self._reserved += len(entries)
                if not promotion:
                    self._c.store_skipped_chunks += present
                    self._c.store_refused_chunks += refused
                return Reservation(tuple(entries), tuple(indices), present, refused)
            except BaseException as e:
                self._rollback(entries)
                if isinstance(e, MemoryError | OSError):
                    raise TierError(f"the memory tier failed: {e}") from e
                raise
            entry = Entry(key, extent, nbytes, layout)
            index[key] = entry
            entries.append(entry)
            indices.append(i)
        self._reserved += len(entries)
        self._c.store_skipped_chunks += present
        return Reservation(tuple(entries), tuple(indices), present, 0)

    def _rollback(self, entries: list[Entry]) -> None:
        # Reservations of a STORE that could not be admitted: they were
        # never counted as reserved, so only index and tier are undone.
        for entry in entries:
            del self._index[entry.key]
            self.tier.free(entry.extent)

    def full_reason(self) -> str:
        """Why a STORE found no room, for its warning: the buffer is still
        growing (stores outran segment preparation), or every chunk in it is
        in use (locked by a lookup, pinned by a retrieve or being stored)."""
        tier = self.tier.statistics()
        size = f"--cpu-buffer-size {tier.capacity_bytes / (1 << 30):.3g} GiB"
        if tier.materialized_bytes < tier.capacity_bytes:
            return (
                f"buffer still growing: {tier.materialized_bytes / (1 << 30):.2f} "
                f"of {tier.capacity_bytes / (1 << 30):.2f} GiB prepared ({size}); "
                "the stores outran its growth (--prepare-ahead-mb)"
            )
        return (
            f"buffer full ({size}): {self._locked} chunks locked by lookups, "
            f"{self._pinned} pinned by retrieves, {self._reserved} being stored"
        )

    def _allocate(self, nbytes: int) -> Extent:
        while True:
            extent = self.tier.allocate(nbytes)
            if extent is not None:
                return extent
            victim = self._victim()
            if victim is None:
                raise StorageFull(f"no room for {nbytes} bytes")
            self._evict(victim)

    def _victim(self) -> Entry | None:
        if not self._held:
            key = self.policy.victim()
            return None if key is None else self._index[key]  # type: ignore[index]
        for key in self.policy:
            entry = self._index[key]  # type: ignore[index]
            if not entry.holds:
                return entry
        return None

    def _evict(self, entry: Entry) -> None:
        self.policy.discard(entry.key)
        del self._index[entry.key]
        self._c.evicted_chunks += 1
        self._c.evicted_bytes += entry.nbytes
        self._free(entry)

    def commit(self, reservation: Reservation, promotion: bool = False) -> None:
        """The copy into `reservation` finished: its chunks become visible.
        A `promotion` is not counted as stored and not passed to `on_commit`."""
        add = self.policy.add
        chunks = nbytes = 0
        committed: list[Entry] = []
        for entry in reservation.entries:
            if entry.doomed:
                self._doomed -= 1
                self.tier.free(entry.extent)
                continue
            entry.state = State.COMMITTED
            chunks += 1
            nbytes += entry.nbytes
            usage = self._models.get(entry.key.model_name)
            if usage is None:
                usage = self._models[entry.key.model_name] = [0, 0]
            usage[0] += 1
            usage[1] += entry.nbytes
            add(entry.key)
            committed.append(entry)
        self._reserved -= len(reservation.entries)
        self._committed_chunks += chunks
        self._committed_bytes += nbytes
        if promotion:
            return
        self._c.stored_chunks += chunks
        self._c.stored_bytes += nbytes
        if self.on_commit is not None and committed:
            self.on_commit(committed)

    def abort(self, reservation: Reservation) -> None:
        """The copy into `reservation` failed: forget and free its chunks."""
        for entry in reservation.entries:
            self._reserved -= 1
            if entry.doomed:
                self._doomed -= 1
            else:
                del self._index[entry.key]
            self.tier.free(entry.extent)

    # -- lookup and retrieve -------------------------------------------------

    def lookup(
        self,
        keys: Sequence[CacheKey],
        lock: bool,
        readers: int = 1,
        lower: Callable[[CacheKey], bool] | None = None,
    ) -> int:
        """How many leading `keys` are committed (a nil worker id: for every
        rank). With `lock`, each found chunk gains `readers` locks for
        `lock_ttl` s (each completed retrieve of it releases one).

        `lower(rank_key)`, when given, says whether a lower tier holds a
        chunk that is not committed here: such chunks count as found but
        are not locked (the caller promotes them; `lmcd.tiering`)."""
        self.expire_locks()
        self._c.lookups += 1
        found: list[Entry] = []
        index = self._index
        committed = State.COMMITTED
        hits = 0
        for key in keys:
            if key.worker_id is not None:  # the common case: one rank
                entry = index.get(key)
                if entry is None or entry.state is not committed:
                    if lower is None or not lower(key):
                        break
                else:
                    found.append(entry)
            else:
                entries: list[Entry] = []
                for rank_key in key.ranks():
                    entry = index.get(rank_key)
                    if entry is not None and entry.state is committed:
                        entries.append(entry)
                    elif lower is None or not lower(rank_key):
                        break
                else:
                    found.extend(entries)
                    hits += 1
                    continue
                break
            hits += 1
        self._c.lookup_hit_chunks += hits
        self._c.lookup_miss_chunks += len(keys) - hits
        if lock:
            self.lock(found, readers)
        else:
            for entry in found:
                if not entry.locks and not entry.pins:
                    self.policy.add(entry.key)
        return hits

    def lock(self, entries: Iterable[Entry], readers: int) -> None:
        """Add `readers` lookup locks to each committed entry, expiring
        `lock_ttl` s from now (what a LOOKUP with lock does to its hits)."""
        expiry = self.clock() + self.lock_ttl
        order = self._locked_order
        discard = self.policy.discard
        for entry in entries:
            if entry.locks:
                del order[entry]  # re-inserted last: the newest expiry
            else:
                self._locked += 1
                discard(entry.key)
            entry.locks += readers
            entry.lock_expiry = expiry
            order[entry] = None

    def pin(
        self, keys: Sequence[CacheKey], nbytes: int, layout: str, counted: bool = True
    ) -> Pin:
        """Pin the leading committed `keys` (of this size and layout) for a
        RETRIEVE; the rest are reported missing. `counted=False`: one part
        of a RETRIEVE served in parts, counted once by `count_retrieve`.
        Raises `ValueError` for a key without a worker id."""
        self.expire_locks()
        entries: list[Entry] = []
        index = self._index
        committed = State.COMMITTED
        for key in keys:
            if key.worker_id is None:
                raise ValueError("RETRIEVE keys must name a worker (rank)")
            entry = index.get(key)
            if (
                entry is None
                or entry.state is not committed
                or entry.nbytes != nbytes
                or entry.layout != layout
            ):
                break
            entries.append(entry)
        discard = self.policy.discard
        for entry in entries:
            if not entry.pins:
                self._pinned += 1
                discard(entry.key)
            entry.pins += 1
        if counted:
            self.count_retrieve(len(keys), len(entries))
        return Pin(tuple(entries))

    def count_retrieve(self, asked: int, found: int) -> None:
        """Count one RETRIEVE of `asked` chunks that found `found` (the
        statistics a pin counts, for a RETRIEVE pinned in parts)."""
        self._c.retrieves += 1
        self._c.retrieve_miss_chunks += asked - found

    def hold(self, entries: Sequence[Entry]) -> Pin:
        """Keep committed `entries` from eviction while a background copy
        reads them (to a lower tier), without changing their place in the
        eviction order; give them back with `unhold`. Entries no longer
        committed are left out."""
        held = tuple(
            e
            for e in entries
            if e.state is State.COMMITTED
            and not e.doomed
            and self._index.get(e.key) is e
        )
        for entry in held:
            if not entry.holds:
                self._held += 1
            entry.holds += 1
        return Pin(held)

    def unhold(self, pin: Pin) -> None:
        """Give back entries from `hold` (a dropped one is freed now)."""
        for entry in pin.entries:
            entry.holds -= 1
            if entry.holds:
                continue
            self._held -= 1
            if entry.doomed and not entry.pins:
                self._doomed -= 1
                self._free(entry)

    def unpin(self, pin: Pin, completed: bool) -> None:
        """The copy out of `pin` ended. When it `completed`, each chunk counts
        as retrieved and gives up one lookup lock."""
        add = self.policy.add
        retrieved = nbytes = 0
        for entry in pin.entries:
            entry.pins -= 1
            if not entry.pins:
                self._pinned -= 1
            if entry.doomed:
                if not entry.pins and not entry.holds:
                    self._doomed -= 1
                    self._free(entry)
                continue
            if completed:
                retrieved += 1
                nbytes += entry.nbytes
                if entry.locks:
                    entry.locks -= 1
                    if not entry.locks:
                        self._unlock(entry)
            if not entry.locks and not entry.pins:
                add(entry.key)
        self._c.retrieved_chunks += retrieved
        self._c.retrieved_bytes += nbytes

    def release(self, keys: Sequence[CacheKey], count: int) -> int:
        """Give up `count` lookup locks on each of `keys` (per-rank keys; a
        nil worker id: every rank) that holds any. Returns how many locks
        were released."""
        released = 0
        index = self._index
        for key in keys:
            for rank_key in key.ranks():
                entry = index.get(rank_key)
                if entry is None or not entry.locks:
                    continue
                n = min(count, entry.locks)
                entry.locks -= n
                released += n
                if not entry.locks:
                    self._unlock(entry)
                    if not entry.pins:
                        self.policy.add(entry.key)
        return released

    def expire_locks(self) -> None:
        """Drop locks whose TTL has passed (leaked by clients that never
        retrieved); called by every operation, cheap when none is due."""
        if not self._locked_order:
            return
        now = self.clock()
        expired = 0
        while self._locked_order:
            entry = next(iter(self._locked_order))
            if entry.lock_expiry > now:
                break
            expired += 1
            self._c.lock_expiries += entry.locks
            entry.locks = 0
            self._unlock(entry)
            if not entry.pins:
                self.policy.add(entry.key)
        if expired:
            self._log_limit.warning(
                "Locks on %d chunks expired after --lock-ttl %g s: a client "
                "looked them up with a lock and never retrieved them",
                expired,
                self.lock_ttl,
            )

    def _unlock(self, entry: Entry) -> None:
        del self._locked_order[entry]
        self._locked -= 1

    # -- clear ---------------------------------------------------------------

    def clear(self, force: bool = True, model: str | None = None) -> int:
        """Drop every chunk (`force`), or every chunk not in use: without
        `force`, chunks that are locked by a lookup, pinned by a retrieve or
        being stored stay. `model`: only that model's chunks. Memory that a
        copy is using is freed when the copy lets go; nothing dropped is
        visible to lookups after this. Returns the number of chunks dropped."""
        self.expire_locks()
        dropped = 0
        for entry in list(self._index.values()):
            if model is not None and entry.key.model_name != model:
                continue
            if not force and (
                entry.locks or entry.pins or entry.state is State.RESERVED
            ):
                continue
            dropped += 1
            del self._index[entry.key]
            self.policy.discard(entry.key)
            if entry.locks:
                entry.locks = 0
                self._unlock(entry)
            if entry.pins or entry.holds or entry.state is State.RESERVED:
                entry.doomed = True
                self._doomed += 1
                if entry.state is State.COMMITTED:
                    self._uncount(entry)
            else:
                self._free(entry)
        self._c.cleared_chunks += dropped
        return dropped

    def reset_counters(self) -> None:
        """Zero the counters (lookups, stores, evictions...); gauges such as
        chunks, bytes and locks describe what is held and stay."""
        self._c = _Counters()

    # -- memory --------------------------------------------------------------

    def buffer(self, entry: Entry) -> object:
        """The chunk's bytes (a uint8 tensor of the tier's memory)."""
        return self.tier.buffer(entry.extent)

    def get(self, key: CacheKey) -> Entry | None:
        """The entry of a per-rank key (reserved or committed), or None."""
        return self._index.get(key)

    @property
    def committed_bytes(self) -> int:
        """Bytes of the chunks visible to lookups (a cheap gauge)."""
        return self._committed_bytes

    @property
    def evicted_chunks(self) -> int:
        """Chunks evicted to make room so far (a cheap counter)."""
        return self._c.evicted_chunks

    def _free(self, entry: Entry) -> None:
        # Only committed entries are ever freed here; reserved ones go
        # through commit() or abort().
        if not entry.doomed:
            self._uncount(entry)
        self.tier.free(entry.extent)

    def _uncount(self, entry: Entry) -> None:
        self._committed_chunks -= 1
        self._committed_bytes -= entry.nbytes
        usage = self._models[entry.key.model_name]
        usage[0] -= 1
        usage[1] -= entry.nbytes
        if not usage[0]:
            del self._models[entry.key.model_name]

    # -- introspection -------------------------------------------------------

    def statistics(self) -> StorageStatistics:
        c = self._c
        return StorageStatistics(
            tier=self.tier.statistics(),
            chunks=self._committed_chunks,
            bytes=self._committed_bytes,
            reserved_chunks=self._reserved,
            locked_chunks=self._locked,
            pinned_chunks=self._pinned,
            doomed_chunks=self._doomed,
            models={m: ModelUsage(u[0], u[1]) for m, u in self._models.items()},
            **attrs.asdict(c),
        )

    def entries(self) -> Iterable[Entry]:
        """Every indexed entry (for invariant checks and tests)."""
        return self._index.values()

    def __len__(self) -> int:
        return len(self._index)
