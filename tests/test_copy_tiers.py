"""Conformance suite for tiers that hold copies (`CopyTier`).

Every copy tier joins by adding a `Flavor` to `FLAVORS`: how to make one
(empty, with a capacity), how to reopen it after `aclose()`, and what it
promises (persistence across reopen, a capacity it enforces).
"""

from __future__ import annotations

import mmap
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import pytest
import trio

from lmcd.errors import TierError
from lmcd_backends.disk import DiskTier
from lmcd_backends.protocol import CopyTier, ObjectId

MiB = 1 << 20
TIMEOUT = 30


@attrs.frozen
class Flavor:
    name: str
    # make(root, capacity_bytes): a tier on storage named by `root` (a test's
    # temporary directory); made again with the same root after `aclose()`,
    # it must see the same storage when the flavor is persistent.
    make: Callable[[Path, int], CopyTier]
    persistent: bool = True
    bounded: bool = True


def _disk(direct: bool | None) -> Callable[[Path, int], CopyTier]:
    def make(root: Path, capacity: int) -> CopyTier:
        return DiskTier(root / "tier", capacity, threads=3, direct=direct)

    return make


FLAVORS = [
    Flavor("disk-auto", _disk(None)),
    Flavor("disk-buffered", _disk(False)),
]


@attrs.define
class Harness:
    flavor: Flavor
    root: Path
    tiers: list[CopyTier] = attrs.field(factory=list)

    async def open(self, capacity: int = 256 * MiB) -> CopyTier:
        tier = self.flavor.make(self.root, capacity)
        self.tiers.append(tier)
        await tier.scan()
        return tier


@pytest.fixture(params=FLAVORS, ids=lambda f: f.name)
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Harness]:
    h = Harness(request.param, tmp_path)
    with trio.fail_after(TIMEOUT):
        yield h
        for tier in h.tiers:
            await tier.aclose()


def payload(oid: ObjectId) -> bytes:
    return random.Random(oid.key + oid.layout.encode()).randbytes(oid.nbytes)


def oid(n: int, nbytes: int, layout: str = "mha") -> ObjectId:
    return ObjectId(b"model\x00" + n.to_bytes(8, "big"), layout, nbytes)


SIZES = [1, 4095, 4096, 4097, 65536, 3 * MiB + 123]


def aligned_buffer(nbytes: int) -> memoryview:
    """Page-aligned memory, as lmcd's chunk buffers are."""
    return memoryview(mmap.mmap(-1, max(nbytes, 1)))[:nbytes]


def unaligned_buffer(nbytes: int) -> memoryview:
    return memoryview(bytearray(nbytes + 7))[7 : 7 + nbytes]


async def test_put_contains_get_bit_exact(harness: Harness) -> None:
    tier = await harness.open()
    ids = [oid(i, n) for i, n in enumerate(SIZES)]
    assert await tier.contains(ids) == [False] * len(ids)
    assert await tier.put([(i, payload(i)) for i in ids]) == [True] * len(ids)
    assert await tier.contains(ids) == [True] * len(ids)
    for make in (aligned_buffer, unaligned_buffer):
        outs = [make(i.nbytes) for i in ids]
        assert await tier.get_into(list(zip(ids, outs, strict=True))) == [True] * len(
            ids
        )
        for i, out in zip(ids, outs, strict=True):
            assert bytes(out) == payload(i)


async def test_aligned_and_tensor_sources(harness: Harness) -> None:
    import torch

    tier = await harness.open()
    a, b = oid(1, 2 * MiB + 5), oid(2, 10000)
    src_a = aligned_buffer(a.nbytes)
    src_a[:] = payload(a)
    src_b = torch.frombuffer(bytearray(payload(b)), dtype=torch.uint8)
    assert await tier.put([(a, src_a), (b, src_b)]) == [True, True]
    out = torch.empty(b.nbytes, dtype=torch.uint8)
    assert await tier.get_into([(b, out)]) == [True]
    assert bytes(out.numpy()) == payload(b)


async def test_miss_for_unknown_id_other_layout_or_length(harness: Harness) -> None:
    tier = await harness.open()
    held = oid(7, 5000)
    assert await tier.put([(held, payload(held))]) == [True]
    others = [oid(8, 5000), oid(7, 5000, layout="mla"), oid(7, 5001), oid(7, 4999)]
    assert await tier.contains(others) == [False] * 4
    bufs = [bytearray(o.nbytes) for o in others]
    assert await tier.get_into(list(zip(others, bufs, strict=True))) == [False] * 4
    assert all(b == bytearray(len(b)) for b in bufs)  # nothing written into them
    assert await tier.contains([held]) == [True]


async def test_mixed_batch_hits_and_misses(harness: Harness) -> None:
    tier = await harness.open()
    ids = [oid(i, 8192 + i) for i in range(6)]
    await tier.put([(i, payload(i)) for i in ids[::2]])
    bufs = [bytearray(i.nbytes) for i in ids]
    assert (
        await tier.get_into(list(zip(ids, bufs, strict=True)))
        == [
            True,
            False,
        ]
        * 3
    )
    assert [bytes(b) == payload(i) for i, b in zip(ids, bufs, strict=True)][::2] == [
        True
    ] * 3


async def test_delete(harness: Harness) -> None:
    tier = await harness.open()
    ids = [oid(i, 70000) for i in range(4)]
    await tier.put([(i, payload(i)) for i in ids])
    before = tier.usage()
    await tier.delete([ids[1], ids[3], oid(99, 1)])  # one never held
    assert await tier.contains(ids) == [True, False, True, False]
    assert await tier.get_into([(ids[1], bytearray(70000))]) == [False]
    after = tier.usage()
    assert after.objects == before.objects - 2
    assert after.used_bytes < before.used_bytes
    await tier.delete([ids[1]])  # twice: no error
    # A deleted id can be stored again.
    assert await tier.put([(ids[1], payload(ids[1]))]) == [True]


async def test_put_of_held_id_is_true_and_not_rewritten(harness: Harness) -> None:
    tier = await harness.open()
    i = oid(1, 9000)
    assert await tier.put([(i, payload(i))]) == [True]
    writes = tier.usage().writes
    assert await tier.put([(i, payload(i))]) == [True]
    assert tier.usage().writes == writes


async def test_usage_counts(harness: Harness) -> None:
    tier = await harness.open()
    u0 = tier.usage()
    assert (u0.objects, u0.used_bytes, u0.queue_depth) == (0, 0, 0)
    ids = [oid(i, 10000) for i in range(3)]
    await tier.put([(i, payload(i)) for i in ids])
    await tier.get_into([(ids[0], bytearray(10000))])
    u = tier.usage()
    assert u.objects == 3
    assert u.used_bytes >= 30000
    assert (u.writes, u.written_bytes) == (3, 30000)
    assert (u.reads, u.read_bytes) == (1, 10000)
    assert (u.read_failures, u.verify_failures, u.queue_depth) == (0, 0, 0)


async def test_wrong_buffer_length_is_a_caller_error(harness: Harness) -> None:
    tier = await harness.open()
    i = oid(1, 100)
    with pytest.raises(ValueError):
        await tier.put([(i, b"x" * 99)])
    await tier.put([(i, b"x" * 100)])
    with pytest.raises(ValueError):
        await tier.get_into([(i, bytearray(101))])
    with pytest.raises(ValueError):
        await tier.get_into([(i, b"x" * 100)])  # read-only


async def test_capacity_refuses_instead_of_evicting(harness: Harness) -> None:
    if not harness.flavor.bounded:
        pytest.skip("the tier's engine evicts by itself")
    tier = await harness.open(capacity=4 * MiB)
    ids = [oid(i, MiB) for i in range(8)]
    results = await tier.put([(i, payload(i)) for i in ids])
    held = sum(results)
    assert 1 <= held < 8
    u = tier.usage()
    assert u.used_bytes <= u.capacity_bytes
    assert u.refused_writes == 8 - held
    assert await tier.contains(ids) == results  # nothing held was evicted
    first = ids[results.index(True)]
    await tier.delete([first])
    refused = ids[results.index(False)]
    assert await tier.put([(refused, payload(refused))]) == [True]


async def test_scan_and_reopen(harness: Harness) -> None:
    tier = await harness.open()
    ids = [oid(i, 5000 * (i + 1)) for i in range(5)]
    await tier.put([(i, payload(i)) for i in ids])
    await tier.delete([ids[2]])
    listed = await tier.scan()
    assert sorted(i.key for i, _ in listed) == sorted(i.key for i in ids if i != ids[2])
    assert all(size >= i.nbytes for i, size in listed)
    assert sum(size for _, size in listed) == tier.usage().used_bytes
    if not harness.flavor.persistent:
        return
    await tier.aclose()
    again = await harness.open()
    assert sorted(await again.scan(), key=lambda x: x[0].key) == sorted(
        listed, key=lambda x: x[0].key
    )
    survivors = [i for i in ids if i != ids[2]]
    bufs = [bytearray(i.nbytes) for i in survivors]
    assert await again.get_into(list(zip(survivors, bufs, strict=True))) == [True] * 4
    assert [bytes(b) for b in bufs] == [payload(i) for i in survivors]
    assert await again.contains([ids[2]]) == [False]


async def test_scan_lists_oldest_write_first(harness: Harness) -> None:
    if not harness.flavor.persistent:
        pytest.skip("no listing")
    tier = await harness.open()
    ids = [oid(i, 4096) for i in range(5)]
    for i in ids:
        await tier.put([(i, payload(i))])
    assert [i for i, _ in await tier.scan()] == ids
    await tier.aclose()
    assert [i for i, _ in await (await harness.open()).scan()] == ids


async def test_health_and_close(harness: Harness) -> None:
    tier = await harness.open()
    health = await tier.health()
    assert health.healthy, health.detail
    await tier.aclose()
    await tier.aclose()  # idempotent
    assert not (await tier.health()).healthy
    with pytest.raises(TierError):
        await tier.contains([oid(1, 1)])
    with pytest.raises(TierError):
        await tier.put([(oid(1, 1), b"x")])


async def test_concurrent_batches(harness: Harness) -> None:
    tier = await harness.open()
    ids = [oid(i, 20000 + i) for i in range(40)]

    async def writer(part: list[ObjectId]) -> None:
        assert await tier.put([(i, payload(i)) for i in part]) == [True] * len(part)

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(writer, ids[k::4])
    bufs = [bytearray(i.nbytes) for i in ids]

    async def reader(k: int) -> None:
        part = list(range(k, 40, 4))
        got = await tier.get_into([(ids[j], bufs[j]) for j in part])
        assert got == [True] * len(part)

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(reader, k)
    assert all(bytes(b) == payload(i) for i, b in zip(ids, bufs, strict=True))
    assert tier.usage().queue_depth == 0


async def test_cancelled_batches_leave_a_consistent_tier(harness: Harness) -> None:
    tier = await harness.open()
    ids = [oid(i, MiB) for i in range(16)]
    with trio.move_on_after(0.001):
        await tier.put([(i, payload(i)) for i in ids])
    u = tier.usage()
    assert u.queue_depth == 0
    held = await tier.contains(ids)
    assert u.objects == sum(held)
    bufs = [bytearray(MiB) for _ in ids]
    with trio.move_on_after(0.001):
        await tier.get_into(list(zip(ids, bufs, strict=True)))
    assert tier.usage().queue_depth == 0
    got = await tier.get_into(list(zip(ids, bufs, strict=True)))
    assert got == held
    assert all(
        bytes(b) == payload(i) for i, b, h in zip(ids, bufs, held, strict=True) if h
    )
