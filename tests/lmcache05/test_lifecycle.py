"""Sessions, liveness and registration, through the real adapters."""

from __future__ import annotations

import time
from typing import Any

from lmcd.benchmarks.lmcache05 import server_key
from tests.adapter_rig import stored_prompt
from tests.lmcache05.helpers import CHUNK, TIMEOUT, rid


def test_end_session_is_answered_and_the_id_reusable(rig: Any) -> None:
    _, scheduler, tokens = stored_prompt(rig, seed=20)
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    scheduler.adapter.end_session(load)
    assert ("end_session", None) in scheduler.settle()
    # A lookup's result is answered once; then the id is unknown: 0.
    assert rig.raw().query_prefetch_status(load).result(TIMEOUT) == 0
    # A new session under the same id sees the cache afresh.
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    scheduler.end_session(load)


def test_reset_cache_is_answered(rig: Any) -> None:
    assert rig.scheduler().reset_cache() is True


def test_ping_is_answered(rig: Any) -> None:
    from lmcache.integration.vllm.vllm_multi_process_adapter import send_ping

    w = rig.worker()
    raw = rig.raw()
    # The scheduler's heartbeat pings with nil, a worker's with its id.
    assert send_ping(raw, TIMEOUT, None) is True
    assert send_ping(raw, TIMEOUT, w.adapter.instance_id) is True
    assert w.adapter.is_healthy


def test_unregistered_worker_is_forgotten(rig: Any) -> None:
    a, scheduler, tokens = stored_prompt(rig, seed=21)
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    scheduler.free_lookup_locks(load, tokens, 0, 2 * CHUNK)

    t0 = time.monotonic()
    rig.shutdown(a)
    # Answered, not waited out (the adapter waits up to TIMEOUT, then
    # carries on silently).
    assert time.monotonic() - t0 < TIMEOUT / 2
    # No worker of the model is registered: nothing to find.
    assert scheduler.lookup(rid("after"), tokens) == 0
    # A store in the name of the unregistered instance fails.
    key = server_key(rig.model, tokens, rid("late"))
    reply = rig.raw().store(key, a.adapter.instance_id, [[1, 2, 3, 4]], b"stub")
    assert tuple(reply.result(TIMEOUT)) == (b"", False)
