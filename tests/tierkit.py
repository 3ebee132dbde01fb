"""Helpers for the tier tests: an lmcd daemon in this process, a KV cache in
/dev/shm with fresh random chunks, and the real lmcache 0.3.13 client driven
from worker threads."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
import trio
import zmq

from lmcd.config import Config
from lmcd.daemon import Daemon
from lmcd.shmkv import SharedKVCache
from lmcd.wire.types import CacheKey
from tests.lmcache_client import call, close_client, key, open_client

BLOCK = 16
PER_CHUNK = 256 // BLOCK
EVENT = b"\x5a" * 64
LAYERS = 3
HEADS = 4
HEAD_SIZE = 32
# 2 (K, V) x layers x 256 tokens x heads x head size x 2 bytes (bf16)
CHUNK_BYTES = 2 * LAYERS * 256 * HEADS * HEAD_SIZE * 2
_seeds = itertools.count(1)


def make_kv(num_blocks: int = 64) -> SharedKVCache:
    return SharedKVCache.create(
        "mha",
        num_layers=LAYERS,
        num_blocks=num_blocks,
        block_size=BLOCK,
        num_heads=HEADS,
        head_size=HEAD_SIZE,
        dim=96,
        dtype="bfloat16",
    )


def blocks_of(kv: SharedKVCache, ids: list[int]) -> list[torch.Tensor]:
    return [layer[:, ids].clone() for layer in kv.layers]


def fill(kv: SharedKVCache, ids: list[int]) -> list[torch.Tensor]:
    """Fresh random data in blocks `ids`; returns a copy of it."""
    gen = torch.Generator().manual_seed(next(_seeds))
    for layer in kv.layers:
        part = layer[:, ids]
        layer[:, ids] = torch.randn(part.shape, generator=gen).to(layer.dtype)
    return blocks_of(kv, ids)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(
        torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        for x, y in zip(a, b, strict=True)
    )


def chunk_ids(slot: int) -> list[int]:
    """The block ids of chunk slot `slot` of a KV cache."""
    return list(range(slot * PER_CHUNK, (slot + 1) * PER_CHUNK))


def config(port: int = 0, **kwargs: Any) -> Config:
    # 8 chunks in one 3 MiB segment: the whole buffer is usable, so the
    # high-water mark means what it says.
    kwargs.setdefault("cpu_buffer_size", 8 * CHUNK_BYTES / (1 << 30))
    kwargs.setdefault("segment_mb", 8 * CHUNK_BYTES >> 20)
    return Config(host="127.0.0.1", port=port, **kwargs)


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Daemon]:
    """An lmcd daemon serving in this process until the block ends."""
    daemon = Daemon(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


@attrs.define
class Client03:
    """The real lmcache 0.3.13 client, called from worker threads."""

    url: str
    context: Any = attrs.field(factory=zmq.Context)
    client: Any = None

    def __attrs_post_init__(self) -> None:
        self.client = open_client(self.url, self.context)

    async def __call__(self, name: str, payloads: list[Any], limit: float = 30) -> Any:
        """One request; `limit`: seconds before the reply counts as lost."""
        return await trio.to_thread.run_sync(call, self.client, name, payloads, limit)

    def close(self) -> None:
        close_client(self.client)
        self.context.destroy(linger=0)


@contextlib.contextmanager
def client03(port: int) -> Iterator[Client03]:
    c = Client03(f"tcp://127.0.0.1:{port}")
    try:
        yield c
    finally:
        c.close()


async def quiet(daemon: Daemon) -> None:
    """Until the daemon's tiers have nothing to demote or promote."""
    tiers = daemon.tiers
    assert tiers is not None
    while tiers.busy:  # noqa: ASYNC110 - polls other tasks' progress
        await trio.sleep(0.005)


def endpoint_port(daemon: Daemon) -> int:
    return int(daemon.listener.endpoint.rsplit(":", 1)[1])


def keys(n: int, model: str, start: int = 0, worker: int | None = 0) -> list[Any]:
    return [key(start + i, worker=worker, model=model) for i in range(n)]


def neutral(k: Any) -> CacheKey:
    """lmcd's key for an lmcache `IPCCacheEngineKey`."""
    return CacheKey(k.model_name, k.world_size, k.worker_id, k.chunk_hash)


def disk_files(path: Path) -> list[Path]:
    return [p for p in (path / "chunks").rglob("*") if p.is_file()]


def disk_usage(path: Path) -> int:
    """Bytes of the chunk files (temporary ones included) right now."""
    total = 0
    for p in disk_files(path):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            total += os.path.getsize(p)
    return total


# -- an in-memory copy tier whose calls a test can hold up ----------------------


@attrs.define(eq=False)
class MemoryTier:
    """A `CopyTier` in a dict. `gate`, when set, holds every `get_into` and
    `put` until it is set; `held[id]` holds a `get_into` of that id until
    set; `fail` ids are read as misses; `calls` counts."""

    name: str = "memory"
    objects: dict[Any, bytes] = attrs.field(factory=dict)
    gate: trio.Event | None = None
    held: dict[Any, trio.Event] = attrs.field(factory=dict)
    put_gate: trio.Event | None = None
    fail: set[Any] = attrs.field(factory=set)
    calls: dict[str, int] = attrs.field(factory=dict)
    closed: bool = False

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    async def contains(self, ids: Any) -> list[bool]:
        self._count("contains")
        await trio.lowlevel.checkpoint()
        return [oid in self.objects for oid in ids]

    async def put(self, items: Any) -> list[bool]:
        self._count("put")
        if self.put_gate is not None:  # a slow write: reads the buffers late
            await self.put_gate.wait()
        data = [(oid, bytes(memoryview(_numpy(buf)).cast("B"))) for oid, buf in items]
        for oid, raw in data:
            self.objects[oid] = raw
        return [True] * len(data)

    async def get_into(self, items: Any) -> list[bool]:
        self._count("get_into")
        if self.gate is not None:
            await self.gate.wait()
        for oid, _ in items:
            if oid in self.held:
                await self.held[oid].wait()
        await trio.lowlevel.checkpoint()
        out = []
        for oid, buf in items:
            raw = self.objects.get(oid)
            if raw is None or oid in self.fail:
                out.append(False)
                continue
            memoryview(_numpy(buf)).cast("B")[:] = raw
            out.append(True)
        return out

    async def delete(self, ids: Any) -> None:
        for oid in ids:
            self.objects.pop(oid, None)

    def usage(self) -> Any:
        from lmcd_backends.protocol import CopyTierUsage

        return CopyTierUsage(1 << 40, 0, len(self.objects), 0, 0, 0, 0, 0, 0, 0)

    async def scan(self) -> list[Any]:
        return []

    async def health(self) -> Any:
        from lmcd_backends.protocol import TierHealth

        return TierHealth(True, "memory")

    async def aclose(self) -> None:
        self.closed = True


def _numpy(buf: Any) -> Any:
    return buf.numpy() if hasattr(buf, "numpy") else buf
