"""The per-test rig: real lmcache 0.5.6 adapters and request clients on one
server, all closed when the test ends (even when it fails)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import attrs

from lmcd.benchmarks.lmcache05 import (
    LMCACHE_DRIVEN,
    KVLayout,
    Scheduler,
    Worker,
    request_client,
)

# Chunk 16 (the servers' --chunk-size) over blocks of 8 tokens: each chunk
# spans two blocks, so the servers must gather and scatter across blocks.
LAYOUT = KVLayout(num_layers=2, num_blocks=16, block_size=8, num_heads=2, head_dim=8)
CHUNK = 16
# Seconds any one answer may take (the adapters' mq_timeout too).
TIMEOUT = 5.0

_prompts = itertools.count(1)
_requests = itertools.count(1)


def prompt(n_tokens: int) -> list[int]:
    """A prompt no other test uses: its chunk hashes are new to the server."""
    first = next(_prompts)
    return [first * 100_003 % 150_000, *range(7, 7 + n_tokens - 1)]


def rid(name: str) -> str:
    """A request id no other test uses. Both servers key sessions and lookup
    jobs by the request id alone (vLLM's ids are unique), so a reused id
    would see another test's session."""
    return f"{name}-{next(_requests)}"


@attrs.define
class Rig:
    """Makes workers, schedulers and raw clients for one model on one
    server, and closes them all in `close`."""

    url: str
    context: Any
    model: str
    layout: KVLayout = LAYOUT
    opened: list[Any] = attrs.field(factory=list)

    def worker(
        self,
        mode: str = LMCACHE_DRIVEN,
        *,
        seed: int | None = None,
        timeout: float = TIMEOUT,
    ) -> Worker:
        """A started worker adapter (zeros in its cache, or random data from
        `seed`)."""
        w = Worker.start(
            self.url,
            self.context,
            model=self.model,
            layout=self.layout,
            mode=mode,
            seed=seed,
            timeout=timeout,
        )
        self.opened.append(w)
        return w

    def scheduler(self) -> Scheduler:
        s = Scheduler.start(
            self.url,
            self.context,
            model=self.model,
            block_size=self.layout.block_size,
            timeout=TIMEOUT,
        )
        self.opened.append(s)
        return s

    def raw(self) -> Any:
        """lmcache 0.5.6's bare `RequestClient` (one frame per parameter)."""
        c = request_client(self.url, self.context)
        self.opened.append(c)
        return c

    def shutdown(self, thing: Any) -> None:
        """Shut a worker or scheduler down now (unregister, close)."""
        self.opened.remove(thing)
        thing.shutdown()

    def close(self) -> None:
        while self.opened:
            thing = self.opened.pop()
            if isinstance(thing, Worker | Scheduler):
                thing.shutdown()
            else:
                thing.close()


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
