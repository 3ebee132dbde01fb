"""Two lmcd daemons sharing a real Valkey cluster (3 masters on loopback):
what A stores, a fresh B retrieves bit-exact; a lost master costs at most a
deadline; a slow cluster never delays a STORE."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from lmcd.benchmarks.valkey_cluster import LocalCluster
from lmcd.daemon import Daemon
from lmcd.tiering import object_id
from tests.tierkit import (
    CHUNK_BYTES,
    EVENT,
    Client03,
    blocks_of,
    chunk_ids,
    client03,
    config,
    endpoint_port,
    fill,
    keys,
    make_kv,
    neutral,
    quiet,
    running,
    same,
)
from tests.valkey_cluster import (  # noqa: F401 (fixtures)
    fixture_fresh_cluster,
    fixture_prefix,
    fixture_valkey_cluster,
)

TIMEOUT = 120
A_ID, B_ID = 101, 202


@contextlib.asynccontextmanager
async def node(
    cluster: LocalCluster, prefix: str, instance: int, **kwargs: Any
) -> AsyncIterator[tuple[Daemon, Client03, Any]]:
    """A daemon on the cluster with a registered KV cache and a client."""
    cfg = config(remote=cluster.url, remote_prefix=prefix, **kwargs)
    with make_kv(128) as kv:
        async with running(cfg) as daemon:
            with client03(endpoint_port(daemon)) as client:
                payload = [instance, kv.register_payload()]
                assert await client("REGISTER_KV_CACHE", payload) is None
                yield daemon, client, kv


async def store(client: Client03, kv: Any, instance: int, ks: list[Any]) -> list[Any]:
    expected = []
    for i, k in enumerate(ks):
        expected.append(fill(kv, chunk_ids(i)))
        reply = await client("STORE", [[k], instance, chunk_ids(i), EVENT])
        assert reply == (EVENT, True)
    return expected


async def written(daemon: Daemon, count: int) -> None:
    tiers = daemon.tiers
    assert tiers is not None
    while tiers.statistics()["remote"]["demotions"] < count:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def test_fresh_daemon_retrieves_what_another_stored_bit_exact(
    valkey_cluster: LocalCluster, prefix: str, tmp_path: Any
) -> None:
    ks = keys(6, "shared")
    with trio.fail_after(TIMEOUT):
        async with node(valkey_cluster, prefix, A_ID) as (a, client_a, kv_a):
            expected = await store(client_a, kv_a, A_ID, ks)
            await written(a, 6)
        # B: its own, empty CPU buffer and a disk of its own.
        async with node(
            valkey_cluster,
            prefix,
            B_ID,
            disk_path=str(tmp_path / "b"),
            disk_size=0.1,
            disk_policy="write-through",
        ) as (b, client_b, kv_b):
            assert b.storage.statistics().chunks == 0
            assert await client_b("LOOKUP", [ks, True]) == [True] * 6
            dst = [x for i in range(6) for x in chunk_ids(i + 1)]
            _, found = await client_b("RETRIEVE", [ks, B_ID, dst, EVENT])
            assert found == [True] * 6
            for i in range(6):
                assert same(blocks_of(kv_b, chunk_ids(i + 1)), expected[i])
            remote = b.handlers.stats()["tiers"]["remote"]
            assert remote["promotions"] == 6
            assert remote["hits"] == 6
            # ... and the chunks went to B's disk too.
            await quiet(b)
            tiers = b.tiers
            assert tiers is not None
            assert all(tiers.on_disk(neutral(k)) for k in ks)
            assert b.storage.statistics().locked_chunks == 0


async def test_a_damaged_part_in_the_cluster_is_a_miss(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    ks = keys(3, "damaged")
    with trio.fail_after(TIMEOUT):
        async with node(valkey_cluster, prefix, A_ID) as (a, client_a, kv_a):
            expected = await store(client_a, kv_a, A_ID, ks)
            await written(a, 3)
            tag = a.scheduler.instances()[0].layout.tag
        name = object_id(neutral(ks[1]), tag, CHUNK_BYTES).name()
        damaged = 0
        for n in valkey_cluster.nodes:
            for key in valkey_cluster.call(n, "KEYS", f"{prefix}{{{name}}}:*"):
                if not key.endswith(b":m"):
                    valkey_cluster.call(n, "SETRANGE", key, "10", "garbage")
                    damaged += 1
        assert damaged
        async with node(valkey_cluster, prefix, B_ID) as (b, client_b, kv_b):
            # The LOOKUP waits for the promotions and counts what arrived.
            assert await client_b("LOOKUP", [ks, True]) == [True, False, False]
            dst = chunk_ids(4) + chunk_ids(5)
            _, found = await client_b("RETRIEVE", [ks[:2], B_ID, dst, EVENT])
            assert found == [True, False]
            assert same(blocks_of(kv_b, chunk_ids(4)), expected[0])
            remote = b.handlers.stats()["tiers"]["remote"]
            assert remote["verify_failures"] >= 1
            assert b.storage.statistics().locked_chunks == 0


async def test_with_a_master_killed_both_daemons_keep_answering(
    fresh_cluster: LocalCluster, prefix: str
) -> None:
    ks = keys(12, "killed")
    with trio.fail_after(TIMEOUT):
        async with (
            node(fresh_cluster, prefix, A_ID) as (a, client_a, kv_a),
            node(fresh_cluster, prefix, B_ID) as (_, client_b, _),
        ):
            await store(client_a, kv_a, A_ID, ks[:6])
            await written(a, 6)
            tag = a.scheduler.instances()[0].layout.tag
            name = object_id(neutral(ks[0]), tag, CHUNK_BYTES).name()
            dead = fresh_cluster.node_of(f"{prefix}{{{name}}}:m".encode())
            dead.kill()
            slowest = []
            for k in ks[:6]:
                started = time.monotonic()
                # Chunk 0 lives on the dead master: a miss, quickly.
                assert await client_b("LOOKUP", [[k], True]) in ([True], [False])
                slowest.append(time.monotonic() - started)
            # At most one request pays a deadline (0.1 s lookup, 1 s
            # transfer); the others fail fast or hit the live masters.
            assert sorted(slowest)[-2] < 0.5, slowest
            assert await client_b("LOOKUP", [[ks[0]], True]) == [False]
            # A keeps storing (and serving what it holds).
            await store(client_a, kv_a, A_ID, ks[6:])
            assert await client_a("LOOKUP", [ks[6:], False]) == [True] * 6
            # The master comes back (empty): chunks stored again are shared.
            dead.start()
            dead.wait_ready()
            fresh_cluster.wait_ok()
            deadline = time.monotonic() + 30
            while True:
                await client_a("CLEAR", [])
                await store(client_a, kv_a, A_ID, ks[:1])
                await trio.sleep(0.3)
                if await client_b("LOOKUP", [ks[:1], True]) == [True]:
                    break
                assert time.monotonic() < deadline, "the tier did not recover"


async def test_stores_are_not_delayed_by_a_stalled_cluster(
    fresh_cluster: LocalCluster, prefix: str
) -> None:
    ks = keys(40, "flood")
    with trio.fail_after(TIMEOUT):
        async with node(fresh_cluster, prefix, A_ID, remote_queue=4) as (
            a,
            client_a,
            kv_a,
        ):
            await store(client_a, kv_a, A_ID, ks[:4])  # first contact made
            await written(a, 4)
            for n in fresh_cluster.nodes:
                n.pause()  # answers nothing, keeps its sockets open
            try:
                times = []
                for i, k in enumerate(ks[4:]):
                    fill(kv_a, chunk_ids(i % 8))
                    started = time.monotonic()
                    reply = await client_a(
                        "STORE", [[k], A_ID, chunk_ids(i % 8), EVENT]
                    )
                    times.append(time.monotonic() - started)
                    assert reply == (EVENT, True)
                remote = a.handlers.stats()["tiers"]["remote"]
                assert remote["dropped_writes"] > 0
                assert max(times) < 0.25, times
                # LOOKUPs of misses ask the stalled cluster: one deadline each
                # at most, and then the tier fails fast.
                started = time.monotonic()
                assert await client_a("LOOKUP", [keys(2, "none"), True]) == [False] * 2
                assert time.monotonic() - started < 2
            finally:
                for n in fresh_cluster.nodes:
                    n.resume()
