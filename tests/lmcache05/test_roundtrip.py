"""Worker A stores, the scheduler looks up, worker B (another instance)
retrieves into other blocks: the bytes arrive, and nothing else is written.
In both transfer modes of the real lmcache 0.5.6 adapters on CPU."""

from __future__ import annotations

from typing import Any

import pytest

from lmcd.benchmarks.lmcache05 import ENGINE_DRIVEN, LMCACHE_DRIVEN
from tests.adapter_rig import retrieve_skipping_first_chunk, store_lookup_retrieve
from tests.lmcache05.helpers import CHUNK, prompt, rid


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
    store_lookup_retrieve(rig, mode, lambda w: check_transfer_mode(w, mode))


@pytest.mark.parametrize("mode", [LMCACHE_DRIVEN, ENGINE_DRIVEN])
def test_retrieve_skips_first_tokens(rig: Any, mode: str) -> None:
    """`skip_first_n_tokens` (blocks vLLM already shares) are not written."""
    retrieve_skipping_first_chunk(rig, mode)


def test_miss_for_unknown_prompt(rig: Any) -> None:
    rig.worker(seed=3)
    assert rig.scheduler().lookup(rid("miss"), prompt(3 * CHUNK)) == 0


def test_worker_starts_in_seconds(rig: Any) -> None:
    """A worker asks get_chunk_size and get_experimental, then registers;
    an unanswered get_experimental alone would cost its whole mq_timeout
    (300 s by default, 45 s here)."""
    w = rig.worker(timeout=45.0)
    assert w.startup_s < 30.0
