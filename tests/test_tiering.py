"""The disk tier wired into the daemon, in-process, with the real lmcache
0.3.13 client on the host path (/dev/shm KV caches): demotion, promotion,
the disk-size bound, damaged files, restarts, lookup jobs, statistics."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import attrs
import msgspec
import pytest
import trio

from lmcd.config import Config
from lmcd.daemon import Daemon
from lmcd.errors import ConfigError
from lmcd.handlers import Handlers
from lmcd.lookups import LookupJobs, Sessions
from lmcd.scheduler import TransferScheduler
from lmcd.spawn import free_port
from lmcd.storage import StorageManager
from lmcd.tiering import Policy, Tiering, object_id
from lmcd.tokens import TokenHasher
from lmcd.wire.detect import DialectRouter
from lmcd.wire.types import QueryLookup, Request, StartLookup, TokenSpan
from lmcd_backends.disk.format import file_size
from lmcd_backends.pinned_cpu import PinnedCpuTier
from tests.fakes import FakeClock, ScriptedDialect
from tests.tierkit import (
    CHUNK_BYTES,
    EVENT,
    MemoryTier,
    blocks_of,
    chunk_ids,
    client03,
    config,
    disk_files,
    disk_usage,
    endpoint_port,
    fill,
    keys,
    make_kv,
    neutral,
    quiet,
    running,
    same,
)

TIMEOUT = 90
_instances = itertools.count(5000)


async def register(client: Any, kv: Any) -> int:
    instance = next(_instances)
    assert await client("REGISTER_KV_CACHE", [instance, kv.register_payload()]) is None
    return instance


async def store_each(
    daemon: Daemon, client: Any, instance: int, kv: Any, ks: list[Any]
) -> list[Any]:
    """Store each key from slot 0 with fresh data, one STORE each, letting
    the tiers catch up in between; returns each chunk's data."""
    expected = []
    for k in ks:
        expected.append(fill(kv, chunk_ids(0)))
        reply = await client("STORE", [[k], instance, chunk_ids(0), EVENT])
        assert reply == (EVENT, True)
        await quiet(daemon)
    return expected


async def retrieve_check(
    client: Any, instance: int, kv: Any, ks: list[Any], expected: list[Any]
) -> list[bool]:
    """LOOKUP(lock) then RETRIEVE `ks` into slots 1.., and check every chunk
    reported found against `expected`; returns the found flags."""
    await client("LOOKUP", [ks, True])
    dst = [b for slot in range(1, len(ks) + 1) for b in chunk_ids(slot)]
    _, found = await client("RETRIEVE", [ks, instance, dst, EVENT])
    for i, ok in enumerate(found):
        if ok:
            assert same(blocks_of(kv, chunk_ids(i + 1)), expected[i]), f"chunk {i}"
    return list(found)


async def test_evicted_chunks_come_back_bit_exact_from_disk(tmp_path: Path) -> None:
    cfg = config(disk_path=str(tmp_path / "disk"), disk_size=0.1)
    with trio.fail_after(TIMEOUT), make_kv() as kv:
        async with running(cfg) as daemon:
            with client03(endpoint_port(daemon)) as client:
                instance = await register(client, kv)
                ks = keys(20, "evict")
                expected = await store_each(daemon, client, instance, kv, ks)
                assert daemon.storage.statistics().evicted_chunks >= 12
                for i in range(0, 20, 2):
                    pair = ks[i : i + 2]
                    found = await retrieve_check(
                        client, instance, kv, pair, expected[i : i + 2]
                    )
                    assert found == [True, True]
                disk = daemon.handlers.stats()["tiers"]["disk"]
                assert disk["demotions"] >= 12
                assert disk["promotions"] >= 12
                assert disk["evicted_before_written"] == 0
                assert daemon.storage.statistics().locked_chunks == 0


async def test_write_through_puts_every_stored_chunk_on_disk(tmp_path: Path) -> None:
    cfg = config(
        disk_path=str(tmp_path / "disk"), disk_size=0.1, disk_policy="write-through"
    )
    with trio.fail_after(TIMEOUT), make_kv() as kv:
        async with running(cfg) as daemon:
            with client03(endpoint_port(daemon)) as client:
                instance = await register(client, kv)
                ks = keys(3, "wt")
                await store_each(daemon, client, instance, kv, ks)
                assert len(disk_files(tmp_path / "disk")) == 3
                assert daemon.storage.statistics().chunks == 3


async def test_disk_use_stays_within_disk_size_under_churn(tmp_path: Path) -> None:
    one = file_size(object_id(keys(1, "x")[0], "L", CHUNK_BYTES))
    size = 6 * one
    cfg = config(
        disk_path=str(tmp_path / "disk"),
        disk_size=size / (1 << 30),
        disk_policy="write-through",
    )
    with trio.fail_after(TIMEOUT), make_kv() as kv:
        async with running(cfg) as daemon:
            with client03(endpoint_port(daemon)) as client:
                instance = await register(client, kv)
                ks = keys(30, "churn")
                peak = 0
                for k in ks:
                    fill(kv, chunk_ids(0))
                    await client("STORE", [[k], instance, chunk_ids(0), EVENT])
                    peak = max(peak, disk_usage(tmp_path / "disk"))
                    await quiet(daemon)
                    peak = max(peak, disk_usage(tmp_path / "disk"))
                assert peak <= size + one
                disk = daemon.handlers.stats()["tiers"]["disk"]
                assert disk["deletions"] >= 20
                assert disk["used_bytes"] <= size
                # The newest chunks are the ones kept.
                tiers = daemon.tiers
                assert tiers is not None
                assert all(tiers.on_disk(neutral(k)) for k in ks[-5:])


async def test_restart_serves_disk_hits_to_a_client_that_never_registers_again(
    tmp_path: Path,
) -> None:
    port = free_port()
    cfg = config(port, disk_path=str(tmp_path / "disk"), disk_size=0.1)
    with trio.fail_after(TIMEOUT), make_kv() as kv, client03(port) as client:
        async with running(cfg) as daemon:
            instance = await register(client, kv)
            ks = keys(14, "restart")
            expected = await store_each(daemon, client, instance, kv, ks)
            tiers = daemon.tiers
            assert tiers is not None
            on_disk = [k for k in ks if tiers.on_disk(neutral(k))]
            assert len(on_disk) >= 6
        started = time.monotonic()
        async with running(cfg) as daemon:
            assert [i.instance_id for i in daemon.scheduler.instances()] == [instance]
            for i in range(0, len(ks), 2):
                pair = ks[i : i + 2]
                want = [k in on_disk for k in pair]
                found = await retrieve_check(
                    client, instance, kv, pair, expected[i : i + 2]
                )
                assert found[: want.index(False) if False in want else 2] == [True] * (
                    want.index(False) if False in want else 2
                )
            assert time.monotonic() - started < 30
            assert daemon.handlers.stats()["tiers"]["disk"]["recovered_chunks"] == len(
                on_disk
            )


def damage(path: Path, names: list[str]) -> None:
    """Flip a payload bit of the first, cut a block off the second, swap the
    files of the last two."""
    files = {p.name: p for p in disk_files(path)}
    flipped, truncated, a, b = (files[n] for n in names)
    with open(flipped, "r+b") as f:
        f.seek(8192 + 100)
        byte = f.read(1)
        f.seek(8192 + 100)
        f.write(bytes([byte[0] ^ 0x10]))
    os.truncate(truncated, os.path.getsize(truncated) - 4096)
    swap = a.with_suffix(".x")
    a.rename(swap)
    b.rename(a)
    swap.rename(b)


async def test_damaged_files_are_misses_never_served(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "disk"
    cfg = config(port, disk_path=str(path), disk_size=0.1, disk_policy="write-through")
    with trio.fail_after(TIMEOUT), make_kv(128) as kv, client03(port) as client:
        async with running(cfg) as daemon:
            instance = await register(client, kv)
            ks = keys(7, "damage")
            expected = await store_each(daemon, client, instance, kv, ks)
            tag = daemon.scheduler.instances()[0].layout.tag
            names = [object_id(neutral(k), tag, CHUNK_BYTES).name() for k in ks]
        damage(path, [names[i] for i in (1, 3, 5, 6)])
        async with running(cfg) as daemon:
            # The index knows them all (no I/O at lookup) ...
            assert await client("LOOKUP", [ks, False]) == [True] * 7
            # ... and every damaged one is a miss on its read, never data.
            for i in range(7):
                found = await retrieve_check(
                    client, instance, kv, [ks[i]], [expected[i]]
                )
                assert found == [i not in (1, 3, 5, 6)], i
            disk = daemon.handlers.stats()["tiers"]["disk"]
            assert disk["verify_failures"] == 4
            assert disk["promotion_failures"] == 4
            assert await client("LOOKUP", [[ks[1]], False]) == [False]
        assert len(disk_files(path)) == 3


async def test_a_second_daemon_on_the_same_disk_path_is_refused(tmp_path: Path) -> None:
    cfg = config(disk_path=str(tmp_path / "disk"), disk_size=0.1)
    with trio.fail_after(TIMEOUT):
        async with running(cfg):
            with pytest.raises(BaseException) as caught:
                async with running(cfg):
                    pass
            group = caught.value
            assert isinstance(group, BaseExceptionGroup)
            matched, _ = group.split(ConfigError)
            assert matched is not None
            assert "in use by another process" in repr(matched)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"disk_path": "/tmp/x"}, "--disk-size"),
        ({"disk_path": "/tmp/x", "disk_size": 1, "disk_policy": "lazy"}, "policy"),
        ({"disk_path": "/tmp/x", "disk_size": 1, "disk_direct_io": "yes"}, "direct"),
        ({"disk_high_water": 0.0}, "high-water"),
        ({"remote": "http://x:1"}, "valkey://"),
        ({"remote": "valkey://h:1", "remote_queue": 0}, "remote-queue"),
    ],
)
def test_tier_flags_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**kwargs)


async def test_stats_and_metrics_report_every_tier(tmp_path: Path) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from lmcd.inspect import render
    from lmcd.metrics import StatsCollector

    cfg = config(disk_path=str(tmp_path / "disk"), disk_size=0.1)
    with trio.fail_after(TIMEOUT):
        async with running(cfg) as daemon:
            stats = daemon.handlers.stats()
            tiers = stats["tiers"]
            assert set(tiers) == {"cpu", "disk"}
            for field in (
                "capacity_bytes",
                "used_bytes",
                "chunks",
                "hits",
                "promotions",
                "demotions",
                "read_bytes",
                "written_bytes",
                "verify_failures",
                "queue_depth",
                "healthy",
            ):
                assert field in tiers["disk"], field
            registry = CollectorRegistry(auto_describe=False)
            registry.register(StatsCollector(daemon.handlers.stats))
            text = generate_latest(registry).decode()
            assert 'lmcd_tier_capacity_bytes{tier="disk"}' in text
            assert 'lmcd_tier_promotions_total{tier="disk"}' in text
            assert 'lmcd_tier_healthy{tier="disk"}' in text
            from rich.console import Console

            console = Console(record=True, width=200)
            console.print(render(stats))
            assert "Tiers" in console.export_text()


# -- lookup jobs (lmcache 0.4+ dialects) ------------------------------------------


@attrs.define
class Served:
    model_name: str = "m"

    def serves(self, model_name: str, world_size: int) -> bool:
        return model_name == self.model_name

    def touch(self, instance_id: int) -> bool:
        return False


@attrs.define
class JobRig:
    """Handlers over a storage manager and an in-memory disk tier, fed
    scripted requests."""

    storage: StorageManager
    tiers: Tiering
    disk: MemoryTier
    sessions: Sessions
    handlers: Handlers
    dialect: ScriptedDialect
    replies: dict[bytes, trio.Event] = attrs.field(factory=dict)
    uids: Any = attrs.field(factory=lambda: itertools.count(1))

    @classmethod
    def create(cls, chunk: int, nbytes: int) -> JobRig:
        cpu = PinnedCpuTier(16 * nbytes, segment_bytes=16 * nbytes, pin=False)
        storage = StorageManager(cpu, FakeClock())
        disk = MemoryTier("disk")
        tiers = Tiering(storage, disk, policy=Policy.WRITE_THROUGH)
        storage.on_commit = tiers.on_commit
        sessions = Sessions(TokenHasher(chunk), time.monotonic)
        scheduler = TransferScheduler(storage, chunk)
        scheduler.peers.append(Served())
        dialect = ScriptedDialect()
        replies: dict[bytes, trio.Event] = {}
        handlers = Handlers(
            storage,
            scheduler,
            chunk,
            lambda frames: replies.setdefault(frames[1], trio.Event()).set(),
            DialectRouter((dialect,)),  # type: ignore[arg-type]
            sessions,
            LookupJobs(time.monotonic),
            tiers=tiers,
        )
        return cls(storage, tiers, disk, sessions, handlers, dialect, replies)

    async def call(self, request: Request) -> object:
        uid = msgspec.msgpack.encode(next(self.uids))
        self.dialect.requests[uid] = request
        done = self.replies.setdefault(uid, trio.Event())
        self.handlers.on_message(b"c", [uid, msgspec.msgpack.encode(1)])
        await done.wait()
        return self.dialect.results.get(uid)


async def test_lookup_job_finishes_once_its_chunks_are_promoted() -> None:
    chunk = 256
    nbytes = 64 << 10
    r = JobRig.create(chunk, nbytes)
    storage, tiers, disk, call = r.storage, r.tiers, r.disk, r.call
    sessions, handlers = r.sessions, r.handlers
    tokens = tuple(range(4 * chunk))
    span = TokenSpan("m", 1, 0, tokens, 0, len(tokens), "r1")
    ks = sessions.keys(span)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(tiers.run)
            await nursery.start(handlers.run)
            res = storage.reserve(ks, nbytes, "L")
            storage.commit(res)
            while tiers.busy:  # noqa: ASYNC110
                await trio.sleep(0.001)
            storage.clear()
            disk.fail.add(object_id(ks[2], "L", nbytes))
            disk.gate = trio.Event()
            assert await call(StartLookup(span)) is None
            assert await call(QueryLookup("r1")) is None  # still promoting
            waiter = trio.Event()
            result: list[object] = []

            async def wait() -> None:
                result.append(await call(QueryLookup("r1", wait=5)))
                waiter.set()

            nursery.start_soon(wait)
            await trio.sleep(0.05)
            assert not waiter.is_set()  # waits for the promotion ...
            disk.gate.set()
            await waiter.wait()
            assert result == [2]  # ... and counts what really arrived
            assert await call(QueryLookup("r1")) == 0  # collected once
            assert [storage.get(k) is not None for k in ks] == [True, True, False, True]
            assert [storage.get(k).locks for k in ks[:2]] == [1, 1]  # type: ignore[union-attr]
            assert storage.get(ks[3]).locks == 0  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()
