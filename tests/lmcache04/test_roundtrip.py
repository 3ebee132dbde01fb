"""Worker A stores, the scheduler looks up, worker B (another instance)
retrieves into other blocks: the bytes arrive and nothing else is written.
The real lmcache 0.4.6 / 0.4.7 adapters on CPU KV tensors, against
lmcache's own server of the same release and against lmcd (dialect chosen,
and detected among every dialect)."""

from __future__ import annotations

import pytest

from tests.adapter_rig import retrieve_skipping_first_chunk, store_lookup_retrieve
from tests.lmcache04.rig import (
    CHUNK,
    DATA,
    HANDLE,
    VERSION,
    Rig,
    key,
    prompt,
    rid,
    untouched,
)

# 0.4.6 has one CPU path (the pickled non-GPU context); 0.4.7 copies either
# through the server's shared-memory pool (`data`, the default on CPU) or
# lets the server map its KV cache (`handle`).
MODES = [DATA] if VERSION == "0.4.6" else [DATA, HANDLE]


def check_transfer_path(worker: object, mode: str) -> None:
    ctx = worker.adapter.transfer_ctx  # type: ignore[attr-defined]
    if VERSION == "0.4.6":
        from lmcache.v1.multiprocess.non_gpu_context_pickle import NonGpuContextPickle
        from lmcache.v1.multiprocess.transfer_context import DataTransferContext

        assert isinstance(ctx, DataTransferContext)
        assert isinstance(ctx._non_gpu_context, NonGpuContextPickle)
    elif mode == DATA:
        # Both servers answer with a pool: no pickles travel.
        from lmcache.v1.multiprocess.transfer_context.shm import NonGpuContextShm

        assert isinstance(ctx._non_gpu_context, NonGpuContextShm)


def _served_by_lmcd_in_handle_mode(rig: Rig, mode: str, name: str) -> bool:
    return mode == HANDLE and "reference" not in name


@pytest.mark.parametrize("mode", MODES)
def test_store_lookup_retrieve(
    rig: Rig, mode: str, request: pytest.FixtureRequest
) -> None:
    if _served_by_lmcd_in_handle_mode(rig, mode, request.node.name):
        # lmcache 0.4 reads a vLLM CPU cache as HND, which lmcd's host path
        # does not map: the registration was refused (and logged), so the
        # store fails cleanly and the worker recomputes.
        a = rig.worker(mode, seed=1)
        tokens = prompt(2 * CHUNK + 8)
        assert not a.store(rid("store"), tokens, [3, 4, 9, 10], end=2 * CHUNK)
        return
    store_lookup_retrieve(rig, mode, lambda w: check_transfer_path(w, mode))


def test_retrieve_skips_first_tokens(rig: Rig) -> None:
    """`skip_first_n_tokens` (blocks vLLM already shares) are not written."""
    retrieve_skipping_first_chunk(rig, DATA)


def test_miss_for_unknown_prompt(rig: Rig) -> None:
    rig.worker(DATA, seed=3)
    assert rig.scheduler().lookup(rid("miss"), prompt(3 * CHUNK)) == 0


def test_a_miss_retrieve_fails_cleanly(rig: Rig) -> None:
    b = rig.worker(DATA)
    tokens = prompt(2 * CHUNK)
    assert not b.retrieve(rid("nothing"), tokens, [1, 2, 3, 4])
    assert untouched(b.kv, [])


def test_heartbeat_and_the_small_requests(rig: Rig) -> None:
    """PING, NOOP, a lookup polled with QUERY_PREFETCH_LOOKUP_HITS (which
    does not collect it) and QUERY_PREFETCH_STATUS (which does, once),
    FREE_LOOKUP_LOCKS, END_SESSION and CLEAR: answered as lmcache's server
    answers them."""
    a = rig.worker(DATA, seed=4, heartbeat=0.2)
    tokens = prompt(2 * CHUNK)
    assert a.store(rid("store"), tokens, [1, 2, 3, 4])
    raw = rig.raw()
    assert raw.call("PING", []) is True
    assert raw.call("NOOP", []) == "OK"
    scheduler = rig.scheduler()
    assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
    r = rid("hits")
    k = key(rig.model, tokens, r, worker_id=None)
    assert raw.call("LOOKUP", [k, 1]) is None
    assert raw.call("QUERY_PREFETCH_LOOKUP_HITS", [r]) == 2
    assert raw.call("QUERY_PREFETCH_STATUS", [r]) == 2
    assert raw.call("QUERY_PREFETCH_STATUS", [r]) == 0  # exactly once
    assert raw.call("FREE_LOOKUP_LOCKS", [k, 1]) is None
    assert raw.call("END_SESSION", [r]) is None
    # The worker's heartbeat runs and is answered.
    heartbeat = a.adapter._heartbeat
    assert heartbeat is not None
    deadline = 50
    while heartbeat.total_runs < 3 and deadline:
        import time

        time.sleep(0.1)
        deadline -= 1
    assert heartbeat.total_runs >= 3
    assert a.healthy
    assert raw.call("CLEAR", []) is None
    assert scheduler.wait_stored(tokens, 0, timeout=2.0) == 0
