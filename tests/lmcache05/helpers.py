"""The per-test rig: real lmcache 0.5.6 adapters and request clients on one
server, all closed when the test ends (even when it fails). The wrappers
are `lmcd.benchmarks.lmcache05`'s; what both lmcache suites share is in
`tests/adapter_rig.py`."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import attrs

from lmcd.benchmarks.lmcache05 import (
    LMCACHE_DRIVEN,
    KVLayout,
    Scheduler,
    request_client,
)
from tests import adapter_rig
from tests.adapter_rig import CHUNK, prompt, rid, untouched

__all__ = [
    "CHUNK",
    "LAYOUT",
    "TIMEOUT",
    "Rig",
    "hit_after_clear",
    "prompt",
    "rid",
    "untouched",
]

# NHD, as 0.5.6's adapter is told; chunk 16 over blocks of 8 tokens.
LAYOUT = KVLayout(num_layers=2, num_blocks=16, block_size=8, num_heads=2, head_dim=8)
# Seconds any one answer may take (the adapters' mq_timeout too).
TIMEOUT = 5.0


@attrs.define
class Rig(adapter_rig.Rig):
    """lmcache 0.5.6's adapters (lmcache-driven unless told otherwise) and
    its bare `RequestClient`."""

    layout: KVLayout = LAYOUT
    default_mode: ClassVar[str | None] = LMCACHE_DRIVEN
    timeout: ClassVar[float] = TIMEOUT

    def _raw_client(self) -> Any:
        """lmcache 0.5.6's bare `RequestClient` (one frame per parameter)."""
        return request_client(self.url, self.context)


def hit_after_clear(
    scheduler: Scheduler, tokens: list[int], expected: int, timeout: float = 3.0
) -> int:
    """CLEAR(force=False), then look `tokens` up, until the lookup finds
    `expected` tokens or `timeout` s pass; returns the last hit.

    A server may release a retrieve's locks just after it answered it (the
    reference does, from a callback thread), so one clear right after the
    answer can come too early. Each probing lookup takes locks of its own;
    they are freed before the next clear, so only the locks under test
    decide what a clear keeps.
    """
    deadline = time.monotonic() + timeout
    while True:
        assert scheduler.reset_cache()
        probe = rid("probe")
        hit = scheduler.lookup(probe, tokens)
        if hit == expected or time.monotonic() > deadline:
            return hit
        if hit:
            scheduler.free_lookup_locks(probe, tokens, 0, hit)
        time.sleep(0.02)
