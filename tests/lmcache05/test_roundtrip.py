"""Worker A stores, the scheduler looks up, worker B (another instance)
retrieves into other blocks: the bytes arrive, and nothing else is written.
In both transfer modes of the real lmcache 0.5.6 adapters on CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmcd.benchmarks.lmcache05 import ENGINE_DRIVEN, LMCACHE_DRIVEN, blocks_equal
from tests.lmcache05.helpers import CHUNK, LAYOUT, prompt, rid


def untouched(kv: dict[str, torch.Tensor], written: list[int]) -> bool:
    """Whether every block but `written` still holds zeros, in every layer."""
    others = [b for b in range(LAYOUT.num_blocks) if b not in written]
    return all(int(torch.count_nonzero(t[:, others])) == 0 for t in kv.values())


def check_transfer_mode(worker: Any, mode: str) -> None:
    from lmcache.v1.multiprocess.transfer_context import (
        EngineDrivenContextShm,
        EngineDrivenTransferContext,
        LMCacheDrivenTransferContext,
    )

    ctx = worker.adapter.transfer_ctx
    if mode == LMCACHE_DRIVEN:
        # cpu_shm descriptors: the server maps the worker's KV cache.
        assert isinstance(ctx, LMCacheDrivenTransferContext)
    else:
        # The server answered with its shared-memory pool: no pickles.
        assert isinstance(ctx, EngineDrivenTransferContext)
        assert isinstance(ctx.engine_driven_context, EngineDrivenContextShm)


@pytest.mark.parametrize("mode", [LMCACHE_DRIVEN, ENGINE_DRIVEN])
def test_store_lookup_retrieve(rig: Any, mode: str) -> None:
    a = rig.worker(mode, seed=1)
    check_transfer_mode(a, mode)
    tokens = prompt(2 * CHUNK + 8)  # two full chunks and a partial one
    stored = [3, 4, 9, 10]  # two blocks of 8 tokens per chunk
    assert a.store(rid("store"), tokens, stored, end=2 * CHUNK)

    scheduler = rig.scheduler()
    # The partial chunk is never stored, so never found.
    assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK

    b = rig.worker(mode)
    check_transfer_mode(b, mode)
    target = [12, 5, 7, 1]
    assert b.retrieve(load, tokens, target, end=2 * CHUNK)
    assert blocks_equal(a.kv, stored, b.kv, target)
    assert untouched(b.kv, target)
    scheduler.end_session(load)


@pytest.mark.parametrize("mode", [LMCACHE_DRIVEN, ENGINE_DRIVEN])
def test_retrieve_skips_first_tokens(rig: Any, mode: str) -> None:
    """`skip_first_n_tokens` (blocks vLLM already shares) are not written."""
    a = rig.worker(mode, seed=2)
    tokens = prompt(2 * CHUNK)
    assert a.store(rid("store"), tokens, [1, 2, 3, 4])
    scheduler = rig.scheduler()
    assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    b = rig.worker(mode)
    assert b.retrieve(load, tokens, [5, 6, 7, 8], skip_first_n_tokens=CHUNK)
    assert blocks_equal(a.kv, [3, 4], b.kv, [7, 8])
    assert untouched(b.kv, [7, 8])


def test_miss_for_unknown_prompt(rig: Any) -> None:
    rig.worker(seed=3)
    assert rig.scheduler().lookup(rid("miss"), prompt(3 * CHUNK)) == 0


def test_worker_starts_in_seconds(rig: Any) -> None:
    """A worker asks get_chunk_size and get_experimental, then registers;
    an unanswered get_experimental alone would cost its whole mq_timeout
    (300 s by default, 45 s here)."""
    w = rig.worker(timeout=45.0)
    assert w.startup_s < 30.0
