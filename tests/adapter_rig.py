"""What the rigs of `tests/lmcache04` (lmcache 0.4.6 / 0.4.7) and
`tests/lmcache05` (0.5.6) share: unique prompts and request ids, a `Rig`
that hands out a release's workers, schedulers and raw clients and closes
them all, the round trips both suites run, and the pieces of their
conftests (server and rig fixtures' bodies, the `context` fixture).

The adapter wrappers themselves are `lmcd.benchmarks.lmcache05`'s `Worker`
and `Scheduler` (0.5.6; the benchmark drives them too), subclassed for 0.4
in `tests/lmcache04/rig.py`. Nothing here imports lmcache: each release's
suite runs in its own environment.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import torch

from lmcd.benchmarks.lmcache05 import (
    NO_TELEMETRY,
    KVLayout,
    Scheduler,
    ServerOptions,
    ServerProcess,
    Worker,
    blocks_equal,
    zmq_context,
)

# The servers' --chunk-size: over blocks of 8 tokens (the suites' layouts)
# each chunk spans two blocks, so both sides must gather and scatter across
# blocks.
CHUNK = 16

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


def untouched(kv: dict[str, torch.Tensor], written: Sequence[int]) -> bool:
    """Whether every block but `written` still holds zeros, in every layer
    (blocks are dimension 1 in either layout order)."""
    for t in kv.values():
        others = [b for b in range(t.shape[1]) if b not in written]
        if int(torch.count_nonzero(t[:, others])) != 0:
            return False
    return True


@attrs.define
class Rig:
    """Makes workers, schedulers and raw clients for one model on one
    server, and closes them all in `close`. A subclass per release names
    its adapter wrappers, its defaults and its raw client."""

    url: str
    context: Any
    model: str
    layout: KVLayout = attrs.field(factory=KVLayout)
    opened: list[Any] = attrs.field(factory=list)

    worker_class: ClassVar[type[Worker]] = Worker
    scheduler_class: ClassVar[type[Scheduler]] = Scheduler
    # The transfer mode of `worker(None)`; None: the adapter's default.
    default_mode: ClassVar[str | None] = None
    # The adapters' mq_timeout and heartbeat interval (None: lmcache's).
    timeout: ClassVar[float] = 10.0
    heartbeat: ClassVar[float | None] = None

    def worker(
        self,
        mode: str | None = None,
        *,
        seed: int | None = None,
        timeout: float | None = None,
        heartbeat: float | None = None,
    ) -> Worker:
        """A started worker adapter in transfer mode `mode` (None: the
        rig's default), zeros in its cache or random data from `seed`."""
        w = self.worker_class.start(
            self.url,
            self.context,
            model=self.model,
            layout=self.layout,
            mode=self.default_mode if mode is None else mode,
            seed=seed,
            timeout=self.timeout if timeout is None else timeout,
            heartbeat=self.heartbeat if heartbeat is None else heartbeat,
        )
        self.opened.append(w)
        return w

    def scheduler(
        self, *, timeout: float | None = None, heartbeat: float | None = None
    ) -> Scheduler:
        s = self.scheduler_class.start(
            self.url,
            self.context,
            model=self.model,
            block_size=self.layout.block_size,
            timeout=self.timeout if timeout is None else timeout,
            heartbeat=self.heartbeat if heartbeat is None else heartbeat,
        )
        self.opened.append(s)
        return s

    def raw(self) -> Any:
        """The release's bare request client, closed with the rig."""
        c = self._raw_client()
        self.opened.append(c)
        return c

    def _raw_client(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} names no raw client")

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


def _no_check(worker: Worker) -> None:
    pass


def store_lookup_retrieve(
    rig: Rig, mode: str | None, check: Callable[[Worker], None] = _no_check
) -> None:
    """Worker A stores two full chunks of a prompt (its partial third chunk
    is never stored, so never found), the scheduler finds them, worker B
    retrieves them into other blocks: the bytes arrive and no other block
    is written. `check` inspects each worker once started."""
    a = rig.worker(mode, seed=1)
    check(a)
    tokens = prompt(2 * CHUNK + 8)
    stored = [3, 4, 9, 10]  # two blocks of 8 tokens per chunk
    assert a.store(rid("store"), tokens, stored, end=2 * CHUNK)

    scheduler = rig.scheduler()
    assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK

    b = rig.worker(mode)
    check(b)
    target = [12, 5, 7, 1]
    assert b.retrieve(load, tokens, target, end=2 * CHUNK)
    assert blocks_equal(a.kv, stored, b.kv, target)
    assert untouched(b.kv, target)
    scheduler.end_session(load)


def stored_prompt(
    rig: Rig, seed: int, mode: str | None = None
) -> tuple[Worker, Scheduler, list[int]]:
    """A worker that stored a new two-chunk prompt from blocks 1-4, and a
    scheduler that sees it, holding no lock on it."""
    a = rig.worker(mode, seed=seed)
    tokens = prompt(2 * CHUNK)
    assert a.store(rid("store"), tokens, [1, 2, 3, 4])
    scheduler = rig.scheduler()
    assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
    return a, scheduler, tokens


def retrieve_skipping_first_chunk(rig: Rig, mode: str | None) -> None:
    """A retrieve with `skip_first_n_tokens` of one chunk (blocks vLLM
    already shares) writes only the second chunk's blocks."""
    a, scheduler, tokens = stored_prompt(rig, 2, mode)
    load = rid("load")
    assert scheduler.lookup(load, tokens) == 2 * CHUNK
    b = rig.worker(mode)
    assert b.retrieve(load, tokens, [5, 6, 7, 8], skip_first_n_tokens=CHUNK)
    assert blocks_equal(a.kv, [3, 4], b.kv, [7, 8])
    assert untouched(b.kv, [7, 8])


# -- what both suites' conftests share ------------------------------------------


def lmcache_version() -> str | None:
    """The installed lmcache release, None without one (the suites collect
    only in their own release's environment)."""
    try:
        return metadata.version("lmcache")
    except metadata.PackageNotFoundError:
        return None


def start_for_module(
    start: Callable[[str, ServerOptions, Path], ServerProcess],
    kind: str,
    options: ServerOptions,
    factory: pytest.TempPathFactory,
) -> ServerProcess:
    """`start(kind, options, log_dir)` with telemetry off (lmcache reads the
    switches in this process too) and a fresh log folder."""
    os.environ.update(NO_TELEMETRY)
    return start(kind, options, factory.mktemp(f"{kind}-logs"))


def served(server: ServerProcess, *, clean_exit: bool) -> Iterator[ServerProcess]:
    """The body of a server fixture: yields `server`, then stops it; with
    `clean_exit`, the test run fails unless it exited with status 0."""
    yield server
    code = server.stop()
    if clean_exit:
        assert code == 0, server.log_tail()


@pytest.fixture
def context() -> Iterator[Any]:
    """A ZMQ context for the adapters; terminated after the test."""
    ctx = zmq_context()
    yield ctx
    ctx.term()


def rig_for(
    rig_class: type[Rig], server: ServerProcess, context: Any, name: str
) -> Iterator[Any]:
    """The body of a rig fixture: a `rig_class` on `server` for a model of
    test `name`'s own, closed after the test."""
    r = rig_class(server.url, context, model=f"model-{name}")
    yield r
    r.close()


def filter_warnings_under(
    folder: Path, items: list[pytest.Item], warning_filter: str
) -> None:
    """Add `filterwarnings(warning_filter)` to every item collected from
    `folder`: lmcache's logger setup may build deprecated opentelemetry
    handlers when one of its modules is first imported, and the adapters
    import lazily, inside any test."""
    for item in items:
        if folder in Path(item.fspath).parents:
            item.add_marker(pytest.mark.filterwarnings(warning_filter))
