"""The storage manager: dedup, prefix lookup, locks, pins, LRU, clear, churn."""

from __future__ import annotations

import random
from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from lmcd.errors import TierError
from lmcd.storage import Pin, Reservation, StorageManager
from lmcd.wire.types import CacheKey
from lmcd_backends.pinned_cpu import PinnedCpuTier
from lmcd_backends.protocol import Extent
from tests.fakes import ArenaTier, FakeClock
from tests.test_arena import check_invariants

MiB = 1 << 20
LAYOUT = "test"


def key(h: int, rank: int | None = 0, world: int = 1, model: str = "m") -> CacheKey:
    return CacheKey(model, world, rank, h.to_bytes(4, "big"))


def manager(capacity: int = 8 * MiB, segment: int = 4 * MiB, ttl: float = 300.0):
    clock = FakeClock()
    tier = ArenaTier(capacity, segment)
    return StorageManager(tier=tier, clock=clock, lock_ttl=ttl), tier, clock


def store(m: StorageManager, keys: list[CacheKey], nbytes: int = MiB) -> Reservation:
    res = m.reserve(keys, nbytes, LAYOUT)
    m.commit(res)
    return res


def test_empty_lookup_finds_nothing() -> None:
    m, _, _ = manager()
    assert m.lookup([key(1), key(2)], lock=True) == 0
    stats = m.statistics()
    assert stats.lookups == 1
    assert stats.lookup_miss_chunks == 2


def test_reserved_chunks_are_invisible_until_commit() -> None:
    m, _, _ = manager()
    res = m.reserve([key(1)], MiB, LAYOUT)
    assert m.lookup([key(1)], lock=False) == 0
    m.commit(res)
    assert m.lookup([key(1)], lock=False) == 1


def test_store_deduplicates_present_and_in_flight_keys() -> None:
    m, tier, _ = manager()
    first = m.reserve([key(1), key(2)], MiB, LAYOUT)
    second = m.reserve([key(2), key(3), key(3)], MiB, LAYOUT)
    assert second.indices == (1,)
    assert second.present == 2
    m.commit(first)
    m.commit(second)
    assert tier.arena.live_extents == 3


def test_lookup_is_a_prefix_match() -> None:
    m, _, _ = manager()
    store(m, [key(1), key(2), key(4)])
    assert m.lookup([key(1), key(2), key(3), key(4)], lock=False) == 2


def test_nil_worker_means_every_rank() -> None:
    m, _, _ = manager()
    store(m, [key(1, 0, world=2), key(2, 0, world=2)])
    store(m, [key(1, 1, world=2)])
    nil = [key(1, None, world=2), key(2, None, world=2)]
    assert m.lookup(nil, lock=False) == 1
    store(m, [key(2, 1, world=2)])
    assert m.lookup(nil, lock=False) == 2


def test_full_buffer_stores_the_prefix_that_fits() -> None:
    m, _, _ = manager(capacity=4 * MiB, segment=4 * MiB)
    res = m.reserve([key(i) for i in range(6)], MiB, LAYOUT)
    # Nothing is evictable while the first four are reserved.
    assert res.indices == (0, 1, 2, 3)
    assert res.refused == 2
    assert not res.ok
    assert m.statistics().store_refused_chunks == 2


def test_lru_evicts_least_recently_used_first() -> None:
    m, _, _ = manager(capacity=4 * MiB, segment=4 * MiB)
    store(m, [key(i) for i in range(4)])
    m.lookup([key(0)], lock=False)  # 0 becomes most recently used
    store(m, [key(10)])
    assert m.lookup([key(1)], lock=False) == 0
    assert m.lookup([key(0)], lock=False) == 1
    assert m.statistics().evicted_chunks == 1


def test_locked_chunks_are_not_evicted_until_expiry() -> None:
    m, _, clock = manager(capacity=2 * MiB, segment=2 * MiB, ttl=10)
    store(m, [key(1), key(2)])
    assert m.lookup([key(1), key(2)], lock=True) == 2
    assert m.reserve([key(3)], MiB, LAYOUT).refused == 1
    clock.now = 11
    res = m.reserve([key(3)], MiB, LAYOUT)
    assert res.ok
    stats = m.statistics()
    assert stats.lock_expiries == 2
    assert stats.locked_chunks == 0


def test_retrieve_pins_and_releases_locks() -> None:
    m, _, _ = manager(capacity=2 * MiB, segment=2 * MiB)
    store(m, [key(1), key(2)])
    m.lookup([key(1), key(2)], lock=True)
    pin = m.pin([key(1), key(2), key(3)], MiB, LAYOUT)
    assert len(pin.entries) == 2
    assert m.statistics().pinned_chunks == 2
    m.unpin(pin, completed=True)
    stats = m.statistics()
    assert (stats.pinned_chunks, stats.locked_chunks) == (0, 0)
    assert stats.retrieved_chunks == 2
    assert m.reserve([key(3)], MiB, LAYOUT).ok  # evictable again


def test_pin_refuses_other_layouts() -> None:
    m, _, _ = manager()
    store(m, [key(1)])
    assert m.pin([key(1)], MiB, "other").entries == ()
    assert m.pin([key(1)], 2 * MiB, LAYOUT).entries == ()


def test_clear_under_in_flight_copies_frees_on_release() -> None:
    m, tier, _ = manager()
    store(m, [key(1), key(2)])
    pin = m.pin([key(1)], MiB, LAYOUT)
    res = m.reserve([key(3)], MiB, LAYOUT)
    assert m.clear() == 3
    assert m.lookup([key(1)], lock=False) == 0
    assert tier.arena.live_extents == 2  # key 1 (pinned) and key 3 (reserved)
    m.unpin(pin, completed=True)
    m.commit(res)
    assert tier.arena.live_extents == 0
    assert m.lookup([key(3)], lock=False) == 0
    assert m.statistics().doomed_chunks == 0


def test_store_and_retrieve_need_ranked_keys() -> None:
    m, _, _ = manager()
    with pytest.raises(ValueError, match="worker"):
        m.reserve([key(1, None)], MiB, LAYOUT)
    with pytest.raises(ValueError, match="worker"):
        m.pin([key(1, None)], MiB, LAYOUT)
    with pytest.raises(ValueError, match="larger than a segment"):
        m.reserve([key(1)], 64 * MiB, LAYOUT)


def test_per_model_usage() -> None:
    m, _, _ = manager()
    store(m, [key(1, model="a"), key(2, model="a")])
    store(m, [key(1, model="b")], nbytes=2 * MiB)
    models = m.statistics().models
    assert (models["a"].chunks, models["a"].bytes) == (2, 2 * MiB)
    assert (models["b"].chunks, models["b"].bytes) == (1, 2 * MiB)


def test_churn_with_two_chunk_sizes_keeps_buffer_over_90_percent_full() -> None:
    capacity = 2 << 30
    m, tier, _ = manager(capacity=capacity, segment=1 << 30)
    rng = random.Random(7)
    sizes = (32 * MiB, 10 * MiB)
    fills = []
    for i in range(3000):
        nbytes = sizes[rng.randrange(2)]
        res = m.reserve([key(i, model=str(nbytes))], nbytes, LAYOUT)
        assert res.ok
        m.commit(res)
        if m.statistics().evicted_chunks:
            fills.append(tier.arena.used / capacity)
        if i % 5 == 0:  # keep some old chunks hot
            m.lookup([key(rng.randrange(i + 1), model=str(nbytes))], lock=False)
    assert len(fills) > 1000
    # Strict LRU leaves transient holes after making room for a big chunk;
    # the buffer stays over 90% full in all but the rarest moments.
    fills.sort()
    assert sum(fills) / len(fills) >= 0.93, f"mean fill {sum(fills) / len(fills):.3f}"
    assert fills[len(fills) // 100] >= 0.90, (
        f"1st percentile {fills[len(fills) // 100]:.3f}"
    )


@attrs.define
class FailingTier(ArenaTier):
    """An arena tier whose `fail_at`-th allocation raises `error`."""

    fail_at: int = 0
    error: type[Exception] = MemoryError
    calls: int = 0

    def allocate(self, nbytes: int) -> Extent | None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error("the OS refused a segment")
        return super().allocate(nbytes)


@pytest.mark.parametrize("error", [MemoryError, OSError])
def test_tier_failure_mid_store_rolls_back_the_whole_store(
    error: type[Exception],
) -> None:
    tier = FailingTier(8 * MiB, 4 * MiB, fail_at=4, error=error)
    m = StorageManager(tier=tier, clock=FakeClock())
    store(m, [key(0)])
    keys = [key(1), key(2), key(3), key(4)]
    with pytest.raises(TierError, match="refused a segment"):
        m.reserve([key(0), *keys], MiB, LAYOUT)  # the third new key fails
    stats = m.statistics()
    assert (len(m), stats.reserved_chunks, stats.chunks) == (1, 0, 1)
    assert tier.arena.used == MiB
    check_invariants(tier.arena)
    assert m.lookup(keys, lock=False) == 0
    # Nothing is left blocking the keys: the same STORE succeeds now.
    res = m.reserve([key(0), *keys], MiB, LAYOUT)
    assert (res.ok, len(res.entries), res.present) == (True, 4, 1)
    m.commit(res)
    assert m.lookup([key(0), *keys], lock=False) == 5


def test_a_refused_segment_is_neither_used_nor_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tier = PinnedCpuTier(3 * MiB, segment_bytes=MiB, pin=False)
    m = StorageManager(tier=tier, clock=FakeClock())
    store(m, [key(1)])
    real_prepare = PinnedCpuTier.prepare
    refuse = [True]

    def prepare(self: PinnedCpuTier, size: int, **kw: Any) -> object:
        if refuse[0]:
            raise MemoryError("cannot allocate a segment: ENOMEM")
        return real_prepare(self, size, **kw)

    monkeypatch.setattr(PinnedCpuTier, "prepare", prepare)
    with pytest.raises(TierError, match="ENOMEM"):
        m.reserve([key(2), key(3)], MiB, LAYOUT)
    stats = m.statistics()
    # Memory never obtained is not reported, and nothing stays reserved.
    assert (stats.tier.materialized_bytes, stats.tier.segments) == (MiB, 1)
    assert (stats.reserved_chunks, stats.chunks, len(m)) == (0, 1, 1)
    assert tier.statistics().used_bytes == MiB
    refuse[0] = False
    res = m.reserve([key(2), key(3)], MiB, LAYOUT)
    assert res.ok
    for entry in res.entries:
        m.buffer(entry).fill_(7)  # type: ignore[attr-defined]
    m.commit(res)
    assert m.lookup([key(1), key(2), key(3)], lock=False) == 3
    assert m.statistics().tier.materialized_bytes == 3 * MiB


def test_a_fill_that_outruns_preparation_evicts_or_refuses() -> None:
    tier = PinnedCpuTier(
        4 * MiB, segment_bytes=MiB, pin=False, grow_inline=False, lead_bytes=0
    )
    demands: list[int] = []
    tier.on_demand = lambda: demands.append(1)
    m = StorageManager(tier=tier, clock=FakeClock())
    # Nothing prepared, nothing to evict: refused, not waited for.
    res = m.reserve([key(1)], MiB, LAYOUT)
    assert (res.ok, res.refused) == (False, 1)
    assert m.statistics().store_refused_chunks == 1
    assert (tier.outruns, tier.prepared_bytes) == (1, 0)
    assert demands  # the preparer was asked for memory
    assert tier.lead_bytes == 4 * MiB  # two segments, doubled by the outrun
    size = tier.claim()
    assert size == MiB
    tier.install(tier.prepare(size), size)
    store(m, [key(1)])
    # The prepared room is used up: the next chunk evicts the oldest one
    # rather than waiting for the next segment.
    res = m.reserve([key(2)], MiB, LAYOUT)
    assert res.ok
    assert m.statistics().evicted_chunks == 1
    assert tier.prepared_bytes == MiB  # still nothing prepared inline
    assert tier.outruns == 2


def test_claims_count_towards_the_lead() -> None:
    tier = PinnedCpuTier(
        8 * MiB, segment_bytes=MiB, pin=False, grow_inline=False, lead_bytes=2 * MiB
    )
    assert tier.wanted_now()
    first, second = tier.claim(), tier.claim()
    assert (first, second) == (MiB, MiB)
    assert tier.claim() is None  # two segments in preparation cover the lead
    assert tier.preparing_bytes == 2 * MiB
    tier.unclaim(MiB)
    assert (tier.prepare_failures, tier.preparing_bytes) == (1, MiB)
    assert tier.claim() == MiB
    assert tier.statistics().materialized_bytes == 0


class StorageMachine(RuleBasedStateMachine):
    """The manager against a simple model, with a fake clock."""

    reservations = Bundle("reservations")
    pins = Bundle("pins")

    def __init__(self) -> None:
        super().__init__()
        self.m, self.tier, self.clock = manager(
            capacity=6 * MiB, segment=2 * MiB, ttl=5
        )
        self.use = 0
        self.last_use: dict[CacheKey, int] = {}  # committed keys -> recency
        # key -> (lock count, expiry of the newest lock, when it was taken)
        self.locks: dict[CacheKey, tuple[int, float, int]] = {}
        self.pinned: dict[CacheKey, int] = {}
        self.reserved: set[CacheKey] = set()

    def _touch(self, k: CacheKey) -> None:
        self.use += 1
        self.last_use[k] = self.use

    def _locked(self, k: CacheKey) -> bool:
        count, expiry, _ = self.locks.get(k, (0, 0.0, 0))
        return count > 0 and expiry > self.clock.now

    def _evictable(self) -> set[CacheKey]:
        return {
            k for k in self.last_use if not self._locked(k) and not self.pinned.get(k)
        }

    def _check_evictions(self, before: set[CacheKey], reserved: set[CacheKey]) -> None:
        visible = {e.key for e in self.m.entries()} - reserved
        evicted = (before & set(self.last_use)) - visible
        for k in evicted:
            assert not self._locked(k), "a locked chunk was evicted"
            assert not self.pinned.get(k), "a pinned chunk was evicted"
            assert k not in self.reserved, "a reserved chunk was evicted"
        remaining = self._evictable() - evicted
        if evicted and remaining:
            newest_evicted = max(self.last_use[k] for k in evicted)
            oldest_kept = min(self.last_use[k] for k in remaining)
            assert newest_evicted < oldest_kept, "eviction was not LRU"
        for k in evicted:
            del self.last_use[k]
            self.locks.pop(k, None)

    @rule(
        target=reservations,
        hashes=st.lists(st.integers(0, 9), min_size=1, max_size=4),
        mib=st.sampled_from([1, 2]),
    )
    def reserve(self, hashes: list[int], mib: int) -> Reservation:
        self._expire()
        before = {e.key for e in self.m.entries()}
        keys = [key(h) for h in hashes]
        res = self.m.reserve(keys, mib * MiB, LAYOUT)
        new = {e.key for e in res.entries}
        assert len(new) == len(res.entries), "dedup failed"
        self._check_evictions(before, new)
        for i, entry in zip(res.indices, res.entries, strict=True):
            # Present keys are skipped, unless evicted by this very request.
            assert keys[i] not in before or keys[i] not in self.last_use
            self.reserved.add(keys[i])
            assert entry.key == keys[i]
        return res

    @rule(res=consumes(reservations), ok=st.booleans())
    def finish_store(self, res: Reservation, ok: bool) -> None:
        visible = {e.key for e in self.m.entries()}
        (self.m.commit if ok else self.m.abort)(res)
        for entry in res.entries:
            self.reserved.discard(entry.key)
            if ok and entry.key in visible and not entry.doomed:
                self._touch(entry.key)

    @rule(hashes=st.lists(st.integers(0, 9), max_size=4), lock=st.booleans())
    def lookup(self, hashes: list[int], lock: bool) -> None:
        self._expire()
        keys = [key(h) for h in hashes]
        n = self.m.lookup(keys, lock)
        expected = 0
        for k in keys:
            if k not in self.last_use:
                break
            expected += 1
        assert n == expected
        for k in keys[:n]:
            if lock:
                count, _, _ = self.locks.get(k, (0, 0.0, 0))
                self.use += 1
                self.locks[k] = (count + 1, self.clock.now + 5, self.use)
            if not self._locked(k) and not self.pinned.get(k):
                self._touch(k)
            elif lock:
                self.last_use[k] = self.last_use[k]  # recency set when unlocked

    @rule(target=pins, hashes=st.lists(st.integers(0, 9), min_size=1, max_size=3))
    def pin(self, hashes: list[int]) -> Pin:
        self._expire()
        pin = self.m.pin([key(h) for h in hashes], MiB, LAYOUT)
        for entry in pin.entries:
            assert entry.key in self.last_use
            self.pinned[entry.key] = self.pinned.get(entry.key, 0) + 1
        return pin

    @rule(pin=consumes(pins), completed=st.booleans())
    def unpin(self, pin: Pin, completed: bool) -> None:
        self._expire()
        self.m.unpin(pin, completed)
        for entry in pin.entries:
            self.pinned[entry.key] -= 1
            if entry.doomed or entry.key not in self.last_use:
                continue
            count, expiry, seq = self.locks.get(entry.key, (0, 0.0, 0))
            if completed and count:
                self.locks[entry.key] = (count - 1, expiry, seq)
            if not self._locked(entry.key) and not self.pinned[entry.key]:
                self._touch(entry.key)

    @rule(seconds=st.sampled_from([1.0, 3.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    def _expire(self) -> None:
        # Expired locks hand their chunks back to LRU, oldest lock first.
        due = sorted(
            (seq, k)
            for k, (count, expiry, seq) in self.locks.items()
            if count and expiry <= self.clock.now
        )
        for seq, k in due:
            self.locks[k] = (0, self.locks[k][1], seq)
            if not self.pinned.get(k):
                self._touch(k)

    @rule()
    def clear(self) -> None:
        self.m.clear()
        self.last_use.clear()
        self.locks.clear()
        self.reserved.clear()
        assert self.m.lookup([key(h) for h in range(10)], lock=False) == 0

    @invariant()
    def memory_is_consistent(self) -> None:
        check_invariants(self.tier.arena)
        stats = self.m.statistics()
        assert (
            stats.tier.used_bytes + stats.tier.free_bytes == stats.tier.capacity_bytes
        )
        live = self.tier.arena.live_extents
        indexed = sum(1 for _ in self.m.entries())
        assert live == indexed + stats.doomed_chunks
        reserved = sum(1 for e in self.m.entries() if e.state.value == "reserved")
        doomed_reserved = stats.reserved_chunks - reserved
        assert 0 <= doomed_reserved <= stats.doomed_chunks
        assert stats.chunks == indexed - reserved


StorageMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_storage_machine = StorageMachine.TestCase


def test_lookup_takes_one_lock_per_reader_and_release_gives_them_back() -> None:
    storage, _, _ = manager()
    keys = [key(i) for i in range(3)]
    store(storage, keys)
    assert storage.lookup(keys, True, readers=3) == 3
    assert storage.statistics().locked_chunks == 3
    assert storage.release(keys[:2], 2) == 4
    assert storage.statistics().locked_chunks == 3
    assert storage.release(keys, 5) == 5  # 1 + 1 + 3
    assert storage.statistics().locked_chunks == 0
    assert storage.release(keys, 1) == 0


def test_clear_without_force_keeps_chunks_in_use() -> None:
    m, _, _ = manager()
    keys = [key(i) for i in range(4)]
    store(m, keys)
    m.lookup(keys[:1], lock=True)
    pin = m.pin(keys[1:2], MiB, LAYOUT)
    reservation = m.reserve([key(9)], MiB, LAYOUT)
    assert m.clear(force=False) == 2
    assert m.lookup(keys[:2], lock=False) == 2
    assert m.lookup(keys[2:], lock=False) == 0
    m.unpin(pin, completed=True)
    m.commit(reservation)
    assert m.lookup([key(9)], lock=False) == 1
    assert m.clear(force=True) == 3
