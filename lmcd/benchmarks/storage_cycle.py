"""The storage manager's cycle, lmcd vs lmcache 0.3.11's `MPStorageManager`.

One cycle: reserve+commit 64 chunks, lookup (with lock) all of them, then
retrieve and release them — with the buffer sized so that eviction is active
after a few cycles. Both managers run in this process on real host memory.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

CHUNKS = 64
# [2, layers, tokens, hidden] of a small model keeps the buffer small:
# 2 x 4 x 256 x 128 x bf16 = 512 KiB a chunk.
SHAPE = (2, 4, 256, 128)
CHUNK_BYTES = 2 * 4 * 256 * 128 * 2
BUFFER_GIB = 0.125  # 256 chunks: eviction starts at the 5th cycle


WARMUP = 8  # untimed cycles: fill the buffer once (eviction active after)


@attrs.frozen
class CycleResult:
    name: str
    cycles: int
    seconds: float

    @property
    def chunk_ops_per_s(self) -> float:
        # reserve+commit, lookup and retrieve+release: three ops per chunk.
        return 3 * CHUNKS * self.cycles / self.seconds


def lmcd_cycle(cycles: int) -> CycleResult:
    from lmcd.storage import StorageManager
    from lmcd.wire.types import CacheKey
    from lmcd_backends.pinned_cpu import PinnedCpuTier

    tier = PinnedCpuTier(int(BUFFER_GIB * (1 << 30)), segment_bytes=64 << 20, pin=False)
    manager = StorageManager(tier=tier, clock=time.monotonic)
    rounds = [
        [
            CacheKey("bench", 1, 0, c.to_bytes(4, "big") + i.to_bytes(4, "big"))
            for i in range(CHUNKS)
        ]
        for c in range(cycles + WARMUP)
    ]
    start = 0.0
    for n, keys in enumerate(rounds):
        if n == WARMUP:
            start = time.perf_counter()
        manager.commit(manager.reserve(keys, CHUNK_BYTES, "bench"))
        assert manager.lookup(keys, lock=True) == CHUNKS
        pin = manager.pin(keys, CHUNK_BYTES, "bench")
        manager.unpin(pin, completed=True)
    return CycleResult("lmcd StorageManager", cycles, time.perf_counter() - start)


def reference_cycle(cycles: int) -> CycleResult:
    import torch
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
    from lmcache.v1.multiprocess.mp_storage_manager import MPStorageManager

    manager: Any = MPStorageManager(BUFFER_GIB)
    rounds = [
        [
            IPCCacheEngineKey(
                "bench", 1, 0, c.to_bytes(4, "big") + i.to_bytes(4, "big")
            )
            for i in range(CHUNKS)
        ]
        for c in range(cycles + WARMUP)
    ]
    shape = torch.Size(SHAPE)
    start = 0.0
    for n, keys in enumerate(rounds):
        if n == WARMUP:
            start = time.perf_counter()
        handle, _ = manager.reserve(keys, shape, torch.bfloat16, MemoryFormat.KV_2LTD)
        manager.commit(handle)
        assert manager.lookup(keys) == CHUNKS
        with manager.retrieve(keys):
            pass
        manager.on_retrieve_finished(keys)
    seconds = time.perf_counter() - start
    manager.close()
    return CycleResult("lmcache 0.3.11 MPStorageManager", cycles, seconds)
