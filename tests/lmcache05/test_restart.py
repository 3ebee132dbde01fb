"""A daemon restart under a live lmcache 0.5 engine-driven worker.

Engine-driven pools are not remembered across a restart (docs/disk-tier.md
says why), so the worker must register again. lmcache 0.5's heartbeat does
so on an unhealthy-to-healthy edge only, which a restart faster than its
interval never shows; lmcd answers the first ping of an instance it does
not know False, then True, which is that edge. The heartbeat is driven by
hand here (`_execute`, one cycle), so that the test does not depend on
when the restart falls between two pings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmcd.benchmarks.lmcache05 import (
    ENGINE_DRIVEN,
    LMCD,
    Scheduler,
    ServerOptions,
    ServerProcess,
    Worker,
    blocks_equal,
    launch,
    server_command,
    single_rank,
    wait_ready,
    zmq_context,
)
from lmcd.spawn import free_port
from tests.lmcache05.helpers import CHUNK, LAYOUT, TIMEOUT, prompt, rid


@contextmanager
def _lmcd(port: int, options: ServerOptions, log_dir: Path) -> Iterator[ServerProcess]:
    log_path = log_dir / f"lmcd-{port}-{time.monotonic_ns()}.log"
    proc = launch(server_command(LMCD, port, options, ""), log_path)
    # No pool of its own to name (stop() removes /dev/shm/<name>, if any).
    server = ServerProcess(LMCD, port, proc, log_path, f"lmcd-test-none-{port}")
    try:
        wait_ready(server, options)
        yield server
    finally:
        server.stop()


def _worker(url: str, context: object) -> Worker:
    """An engine-driven worker whose heartbeat thread never fires by itself
    within the test (the test runs its cycles)."""
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        LMCacheMPWorkerAdapter,
    )

    kv = LAYOUT.make(7)
    adapter = LMCacheMPWorkerAdapter(
        url,
        context,
        "restart",
        LAYOUT.block_size,
        single_rank(),
        extra_config={
            "lmcache.mp.mq_timeout": TIMEOUT,
            "lmcache.mp.mp_transfer_mode": ENGINE_DRIVEN,
            "lmcache.mp.heartbeat_interval": 3600.0,
        },
    )
    adapter.register_kv_caches(kv, LAYOUT.engine_group_infos(), {"kv_layout": "NHD"})
    return Worker(adapter, kv, LAYOUT, 0.0, TIMEOUT)


def test_an_engine_driven_worker_comes_back_after_a_restart(tmp_path: Path) -> None:
    options = ServerOptions(
        chunk_size=CHUNK,
        lmcd_flags=(
            "--disk-path",
            str(tmp_path / "disk"),
            "--disk-size",
            "0.05",
            "--disk-policy",
            "write-through",
        ),
    )
    port = free_port()
    context = zmq_context()
    tokens = prompt(2 * CHUNK)
    worker = None
    try:
        with _lmcd(port, options, tmp_path):
            worker = _worker(f"tcp://127.0.0.1:{port}", context)
            assert worker.store(rid("before"), tokens, [1, 2, 3, 4])
            heartbeat = worker.adapter._heartbeat
            assert heartbeat is not None
            # Written through to disk before the daemon goes.
            time.sleep(0.5)
        with _lmcd(port, options, tmp_path) as server:
            scheduler = Scheduler.start(
                server.url,
                context,
                model="restart",
                block_size=LAYOUT.block_size,
                timeout=TIMEOUT,
            )
            try:
                # The restart fell between two pings: the worker still
                # thinks it is registered; the new daemon has no pool for
                # it, and what it stores now is dropped (the adapter does
                # not even report a failure).
                lost = prompt(2 * CHUNK)
                worker.store(rid("lost"), lost, [9, 10, 11, 12])
                probe = rid("probe")
                assert scheduler.lookup(probe, lost) == 0
                scheduler.end_session(probe)
                # Its first ping tells it otherwise...
                heartbeat._execute()
                assert not worker.adapter.is_healthy
                # ...and its next one re-registers it (a new pool).
                heartbeat._execute()
                assert worker.adapter.is_healthy
                # The chunks stored before the restart come back from disk.
                load = rid("after")
                assert scheduler.lookup(load, tokens) == 2 * CHUNK
                assert worker.retrieve(load, tokens, [5, 6, 7, 8], end=2 * CHUNK)
                assert blocks_equal(worker.kv, [1, 2, 3, 4], worker.kv, [5, 6, 7, 8])
                scheduler.end_session(load)
                # And new stores are kept again.
                assert worker.store(rid("new"), lost, [9, 10, 11, 12])
                assert scheduler.wait_stored(lost, 2 * CHUNK) == 2 * CHUNK
            finally:
                scheduler.shutdown()
    finally:
        if worker is not None:
            worker.shutdown()
        context.term()
