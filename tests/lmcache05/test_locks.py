"""Lookup read locks, seen through the real adapters: CLEAR(force=False)
keeps locked objects and drops the rest, so what a later lookup finds
tells whether a lock is held. Locks are freed by retrieve, by
free_lookup_locks and by their TTL; CLEAR(force=True) ignores them."""

from __future__ import annotations

import time
from typing import Any

from lmcd.benchmarks.lmcache05 import blocks_equal
from tests.adapter_rig import stored_prompt
from tests.lmcache05.conftest import SHORT_LOCK_TTL
from tests.lmcache05.helpers import CHUNK, TIMEOUT, hit_after_clear, rid


def test_retrieve_frees_the_lookup_lock(rig: Any) -> None:
    a, scheduler, tokens = stored_prompt(rig, seed=10)
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    assert scheduler.reset_cache()
    b = rig.worker()
    # The lock kept both chunks through the clear.
    assert b.retrieve(load, tokens, [5, 6, 7, 8])
    assert blocks_equal(a.kv, [1, 2, 3, 4], b.kv, [5, 6, 7, 8])
    # The retrieve released it: now a clear drops them.
    assert hit_after_clear(scheduler, tokens, 0) == 0


def test_free_lookup_locks_frees_everything(rig: Any) -> None:
    _, scheduler, tokens = stored_prompt(rig, seed=11)
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    scheduler.free_lookup_locks(load, tokens, 0, 2 * CHUNK)
    assert hit_after_clear(scheduler, tokens, 0) == 0


def test_free_lookup_locks_frees_only_its_range(rig: Any) -> None:
    _, scheduler, tokens = stored_prompt(rig, seed=12)
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    scheduler.free_lookup_locks(load, tokens, CHUNK, 2 * CHUNK)
    # The first chunk is still locked and survives; the second goes.
    assert hit_after_clear(scheduler, tokens, CHUNK) == CHUNK


def test_locks_expire_after_their_ttl(ttl_rig: Any) -> None:
    _, scheduler, tokens = stored_prompt(ttl_rig, seed=13)
    assert scheduler.lookup(rid("load"), tokens) == 2 * CHUNK
    assert scheduler.reset_cache()
    assert scheduler.lookup(rid("locked"), tokens) == 2 * CHUNK  # kept
    # Real time: the TTL runs in the server process. (No probing lookups
    # while waiting: each would take a fresh lock and renew the TTL.)
    time.sleep(SHORT_LOCK_TTL + 1.0)
    assert scheduler.reset_cache()
    assert scheduler.lookup(rid("expired"), tokens) == 0


def test_forced_clear_drops_locked_objects(rig: Any) -> None:
    _, scheduler, tokens = stored_prompt(rig, seed=14)
    assert scheduler.lookup(rid("load"), tokens) == 2 * CHUNK
    assert rig.raw().clear(True).result(TIMEOUT) is None
    assert scheduler.lookup(rid("after"), tokens) == 0
