"""The disk tier beyond the conformance suite: on-disk format, corruption,
recovery after restart and kill -9, capacity under churn, cancellation."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from crc32c import crc32c

from lmcd.errors import TierError
from lmcd_backends.disk import DiskTier, format, io
from lmcd_backends.disk import tier as tier_module
from lmcd_backends.protocol import ObjectId
from tests.test_copy_tiers import aligned_buffer, oid, payload, unaligned_buffer

MiB = 1 << 20
TIMEOUT = 60
MODES = {"auto": None, "buffered": False}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> bool | None:
    return MODES[request.param]


@pytest.fixture
async def cap() -> AsyncIterator[None]:
    with trio.fail_after(TIMEOUT):
        yield


def chunk_file(tier: DiskTier, i: ObjectId) -> Path:
    return Path(io.chunk_path(tier.path, i.name()))


def disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


# -- format -------------------------------------------------------------------


def test_header_round_trip_and_size() -> None:
    i = oid(1, 12345)
    head = format.encode_header(i, 0xDEADBEEF)
    assert len(head) == format.header_size(i) == format.BLOCK
    decoded = format.decode_header(head)
    assert (decoded.oid, decoded.payload_crc) == (i, 0xDEADBEEF)
    assert format.file_size(i) == 4096 + 16384
    long_key = ObjectId(b"k" * 10000, "mha", 1)
    assert format.header_size(long_key) == 3 * format.BLOCK
    assert format.decode_header(format.encode_header(long_key, 1)).oid == long_key


@pytest.mark.parametrize(
    "bad",
    [
        lambda h: h[:20],  # short
        lambda h: b"LMCDXXXX" + h[8:],  # magic
        lambda h: h[:8] + b"\x02\x00" + h[10:],  # version
        lambda h: h[:45] + bytes([h[45] ^ 1]) + h[46:],  # a bit of the key
        lambda h: h[:16] + struct.pack("<Q", 1) + h[24:],  # length field
    ],
)
def test_header_checks(bad: Callable[[bytes], bytes]) -> None:
    head = format.encode_header(oid(1, 100), 7)
    with pytest.raises(format.FormatError):
        format.decode_header(bad(head))


def test_unstorable_ids() -> None:
    with pytest.raises(format.FormatError):
        format.check_id(ObjectId(b"k", "x" * 2000, 1))
    with pytest.raises(format.FormatError):
        format.check_id(ObjectId(b"k", "mha", 0))


def test_journal_stops_at_a_torn_record() -> None:
    ids = [oid(i, 100 + i) for i in range(5)]
    data = format.encode_journal_header() + b"".join(map(format.encode_record, ids))
    start = format.journal_header_size()
    assert format.decode_records(data, start)[0] == ids
    assert format.decode_records(data[:-3], start)[0] == ids[:4]
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    assert format.decode_records(bytes(flipped), start)[0] == ids[:4]


# -- corruption: each a counted miss, never served ------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def _forged_header(i: ObjectId, magic: bytes, version: int) -> bytes:
    """A header with a valid header checksum but another magic or version."""
    head = bytearray(format.encode_header(i, 0))
    head[0:8] = magic
    head[8:10] = version.to_bytes(2, "little")
    end = 40 + len(i.layout) + len(i.key)
    head[end : end + 4] = format.crc32c(bytes(head[:end])).to_bytes(4, "little")
    return bytes(head)


def corrupt_payload_bit(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    _flip(chunk_file(t, a), format.BLOCK + a.nbytes // 2)


def corrupt_last_payload_byte(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    _flip(chunk_file(t, a), format.BLOCK + a.nbytes - 1)


def corrupt_header_key_bit(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    _flip(chunk_file(t, a), 45)


def corrupt_header_crc_field(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    _flip(chunk_file(t, a), 25)  # the payload CRC stored in the header


def corrupt_magic(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    _flip(chunk_file(t, a), 2)


def forge_magic(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    path = chunk_file(t, a)
    data = path.read_bytes()
    good = format.decode_header(data).payload_crc
    head = bytearray(_forged_header(a, b"OTHERFMT", format.FORMAT_VERSION))
    head[24:28] = good.to_bytes(4, "little")
    end = 40 + len(a.layout) + len(a.key)
    head[end : end + 4] = format.crc32c(bytes(head[:end])).to_bytes(4, "little")
    path.write_bytes(bytes(head) + data[len(head) :])


def forge_version(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    path = chunk_file(t, a)
    data = path.read_bytes()
    good = format.decode_header(data).payload_crc
    head = bytearray(_forged_header(a, format.MAGIC, format.FORMAT_VERSION + 1))
    head[24:28] = good.to_bytes(4, "little")
    end = 40 + len(a.layout) + len(a.key)
    head[end : end + 4] = format.crc32c(bytes(head[:end])).to_bytes(4, "little")
    path.write_bytes(bytes(head) + data[len(head) :])


def truncate_payload(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    os.truncate(chunk_file(t, a), format.BLOCK + 4096)


def truncate_to_header(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    os.truncate(chunk_file(t, a), format.BLOCK)


def truncate_empty(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    os.truncate(chunk_file(t, a), 0)


def extend(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    with open(chunk_file(t, a), "ab") as f:
        f.write(bytes(4096))


def swap_files(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    pa, pb = chunk_file(t, a), chunk_file(t, b)
    tmp = pa.with_name("swap")
    os.rename(pa, tmp)
    os.rename(pb, pa)
    os.rename(tmp, pb)


def copy_other_over(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    chunk_file(t, a).write_bytes(chunk_file(t, b).read_bytes())


def zero_payload_block(t: DiskTier, a: ObjectId, b: ObjectId) -> None:
    with open(chunk_file(t, a), "r+b") as f:
        f.seek(format.BLOCK + 8192)
        f.write(bytes(4096))


CORRUPTIONS = [
    corrupt_payload_bit,
    corrupt_last_payload_byte,
    zero_payload_block,
    corrupt_header_key_bit,
    corrupt_header_crc_field,
    corrupt_magic,
    forge_magic,
    forge_version,
    truncate_payload,
    truncate_to_header,
    truncate_empty,
    extend,
    swap_files,
    copy_other_over,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("buffer", [aligned_buffer, unaligned_buffer])
async def test_corruption_is_a_counted_miss(
    tmp_path: Path,
    mode: bool | None,
    corrupt: Callable[[DiskTier, ObjectId, ObjectId], None],
    buffer: Callable[[int], memoryview],
    cap: None,
) -> None:
    t = DiskTier(tmp_path / "d", 64 * MiB, direct=mode)
    # Same length: a swapped file passes the length check, so only the id
    # check can catch it.
    a, b = oid(1, 50000), oid(2, 50000)
    assert await t.put([(a, payload(a)), (b, payload(b))]) == [True, True]
    corrupt(t, a, b)
    out = buffer(a.nbytes)
    assert await t.get_into([(a, out)]) == [False]
    u = t.usage()
    assert (u.read_failures, u.verify_failures, u.reads) == (1, 1, 0)
    assert u.objects == 1
    assert not chunk_file(t, a).exists() or corrupt in (swap_files,)
    assert await t.contains([a]) == [False]
    assert await t.get_into([(a, out)]) == [False]  # no second read attempt
    assert t.usage().read_failures == 1
    # The tier stays usable: the chunk can be stored again.
    assert await t.put([(a, payload(a))]) == [True]
    assert await t.get_into([(a, out)]) == [True]
    assert bytes(out) == payload(a)
    await t.aclose()


async def test_swapped_files_are_both_misses(tmp_path: Path, cap: None) -> None:
    t = DiskTier(tmp_path / "d", 64 * MiB)
    a, b = oid(1, 50000), oid(2, 50000)
    await t.put([(a, payload(a)), (b, payload(b))])
    swap_files(t, a, b)
    got = await t.get_into([(a, bytearray(50000)), (b, bytearray(50000))])
    assert got == [False, False]
    assert t.usage().verify_failures == 2
    assert not chunk_file(t, a).exists()
    assert not chunk_file(t, b).exists()
    await t.aclose()


async def test_file_removed_behind_the_tiers_back(tmp_path: Path, cap: None) -> None:
    t = DiskTier(tmp_path / "d", 64 * MiB)
    a = oid(1, 5000)
    await t.put([(a, payload(a))])
    chunk_file(t, a).unlink()
    assert await t.get_into([(a, bytearray(5000))]) == [False]
    u = t.usage()
    assert (u.read_failures, u.verify_failures, u.objects, u.used_bytes) == (
        1,
        0,
        0,
        0,
    )
    await t.aclose()


# -- restart ------------------------------------------------------------------


async def _store(path: Path, ids: list[ObjectId], **kw: Any) -> None:
    t = DiskTier(path, 256 * MiB, **kw)
    assert await t.put([(i, payload(i)) for i in ids]) == [True] * len(ids)
    await t.aclose()


async def _check_all(t: DiskTier, ids: list[ObjectId]) -> None:
    bufs = [bytearray(i.nbytes) for i in ids]
    assert await t.get_into(list(zip(ids, bufs, strict=True))) == [True] * len(ids)
    assert [bytes(b) for b in bufs] == [payload(i) for i in ids]


async def test_reopen_without_journal_reads_headers(tmp_path: Path, cap: None) -> None:
    ids = [oid(i, 3000 + i) for i in range(20)]
    await _store(tmp_path, ids)
    (tmp_path / io.JOURNAL).unlink()
    t = DiskTier(tmp_path, 256 * MiB)
    assert {i for i, _ in await t.scan()} == set(ids)
    await _check_all(t, ids)
    await t.aclose()


async def test_reopen_with_a_torn_journal(tmp_path: Path, cap: None) -> None:
    ids = [oid(i, 3000 + i) for i in range(20)]
    t = DiskTier(tmp_path, 256 * MiB)
    await t.put([(i, payload(i)) for i in ids])
    # Simulate a crash: no aclose (so no compaction), a torn last record.
    assert t._journal is not None
    t._journal.close()
    os.close(t._lock_fd)
    journal = tmp_path / io.JOURNAL
    os.truncate(journal, journal.stat().st_size - 5)
    again = DiskTier(tmp_path, 256 * MiB)
    assert {i for i, _ in await again.scan()} == set(ids)
    await _check_all(again, ids)
    await again.aclose()


async def test_a_clean_journal_is_kept_and_its_torn_tail_cut(
    tmp_path: Path, cap: None
) -> None:
    ids = [oid(i, 3000 + i) for i in range(6)]
    t = DiskTier(tmp_path, 256 * MiB)
    await t.put([(i, payload(i)) for i in ids[:5]])
    await t.aclose()  # a compact journal: one record per chunk
    journal = tmp_path / io.JOURNAL
    size = journal.stat().st_size
    with journal.open("ab") as f:
        f.write(format.encode_record(ids[5])[:-3])  # a crash mid-append
    opened = tier_module._open_directory(str(tmp_path), None, False)
    try:
        # Nothing to rewrite: the torn record is cut off, the rest kept.
        assert set(opened.index) == {i.name() for i in ids[:5]}
        assert opened.from_headers == opened.removed == 0
        assert journal.stat().st_size == size
        assert opened.journal.records == 5
        opened.journal.append(ids[5])  # lands after the cut
    finally:
        opened.journal.close()
        os.close(opened.lock_fd)
    recorded = opened.journal.read()
    assert recorded is not None
    assert recorded[0] == ids[:6]
    assert recorded[1] == journal.stat().st_size


def test_a_journal_record_no_tier_writes_is_skipped(tmp_path: Path) -> None:
    # CRC-valid, but with a key longer than any chunk header may hold.
    huge = ObjectId(b"k" * (format.MAX_KEY_BYTES + 1), "bench", 4096)
    body = struct.pack("<QHI", huge.nbytes, 5, len(huge.key)) + b"bench" + huge.key
    record = struct.pack("<III", format.RECORD_MAGIC, len(body), crc32c(body)) + body
    (tmp_path / tier_module.MARKER).write_text(tier_module.MARKER_TEXT)
    (tmp_path / io.JOURNAL).write_bytes(format.encode_journal_header() + record)
    file = Path(io.chunk_path(str(tmp_path), huge.name()))
    file.parent.mkdir(parents=True)
    file.write_bytes(b"x" * 8192)
    opened = tier_module._open_directory(str(tmp_path), None, False)
    opened.journal.close()
    os.close(opened.lock_fd)
    assert opened.index == {}
    assert opened.removed == 1  # not a chunk file of its name either
    assert not file.exists()


async def test_reopen_cleans_temporaries_and_ignores_foreign_files(
    tmp_path: Path, cap: None
) -> None:
    good = [oid(i, 7000) for i in range(3)]
    await _store(tmp_path, good)
    sub = tmp_path / io.CHUNKS_DIR / "ab"
    temp = sub / ("ab" + "0" * 30 + ".1234abcd.tmp")
    temp.write_bytes(b"partial")
    (tmp_path / "index.jnl.99.tmp").write_bytes(b"x")
    foreign = sub / "notes.txt"
    foreign.write_bytes(b"someone else's")
    # A file under a chunk name that the journal does not know and that is
    # not a valid chunk: removed at open.
    garbage = sub / ("ab" + "1" * 30)
    garbage.write_bytes(bytes(8192))
    # A valid chunk under the wrong name: removed at open.
    misnamed = sub / ("ab" + "2" * 30)
    misnamed.write_bytes(chunk_file(DiskTier(tmp_path, 1), good[0]).read_bytes())
    t = DiskTier(tmp_path, 256 * MiB)
    assert {i for i, _ in await t.scan()} == set(good)
    assert not temp.exists()
    assert not (tmp_path / "index.jnl.99.tmp").exists()
    assert not garbage.exists()
    assert not misnamed.exists()
    assert foreign.read_bytes() == b"someone else's"
    await _check_all(t, good)
    await t.aclose()


async def test_journaled_but_bad_file_is_a_miss_at_first_read(
    tmp_path: Path, cap: None
) -> None:
    ids = [oid(i, 9000) for i in range(3)]
    await _store(tmp_path, ids)
    probe = DiskTier(tmp_path, 1)
    _flip(chunk_file(probe, ids[1]), format.BLOCK + 10)
    t = DiskTier(tmp_path, 256 * MiB)
    assert len(await t.scan()) == 3  # verification is lazy
    got = await t.get_into([(i, bytearray(9000)) for i in ids])
    assert got == [True, False, True]
    assert t.usage().verify_failures == 1
    await t.aclose()
    again = DiskTier(tmp_path, 256 * MiB)
    assert len(await again.scan()) == 2
    await again.aclose()


async def test_refuses_foreign_directories_and_a_second_user(
    tmp_path: Path, cap: None
) -> None:
    (tmp_path / "mine.txt").write_text("not a cache")
    with pytest.raises(TierError, match="not an lmcd disk tier"):
        await DiskTier(tmp_path, MiB).scan()
    assert (tmp_path / "mine.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / tier_module.MARKER).write_text("lmcd disk tier, chunk format 99\n")
    with pytest.raises(TierError, match="another format"):
        await DiskTier(other, MiB).scan()
    first = DiskTier(tmp_path / "shared", MiB)
    await first.scan()
    second = DiskTier(tmp_path / "shared", MiB)
    with pytest.raises(TierError, match="in use"):
        await second.scan()
    assert not (await second.health()).healthy
    await first.aclose()
    third = DiskTier(tmp_path / "shared", MiB)
    await third.scan()  # released by aclose
    await third.aclose()


async def test_direct_io_detection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: None
) -> None:
    auto = DiskTier(tmp_path / "a", MiB)
    await auto.scan()
    assert auto.direct_io == io.probe_direct(str(tmp_path))
    await auto.aclose()
    monkeypatch.setattr(io, "probe_direct", lambda root: False)
    fallback = DiskTier(tmp_path / "b", MiB)
    await fallback.scan()
    assert not fallback.direct_io
    a = oid(1, 5000)
    await fallback.put([(a, payload(a))])
    await _check_all(fallback, [a])
    await fallback.aclose()
    with pytest.raises(TierError, match="direct I/O"):
        await DiskTier(tmp_path / "c", MiB, direct=True).scan()


async def test_reopen_in_the_other_io_mode(tmp_path: Path, cap: None) -> None:
    ids = [oid(i, 10000 + 777 * i) for i in range(6)]
    await _store(tmp_path, ids, direct=False)
    t = DiskTier(tmp_path, 256 * MiB, direct=None)
    await t.scan()
    await _check_all(t, ids)
    await t.aclose()


def _write_many(root: Path, n: int) -> list[ObjectId]:
    """`n` small chunks written the way the tier writes them (no Trio)."""
    from lmcd_backends.disk.tier import _open_directory

    opened = _open_directory(str(root), False, False)
    opts = io.WriteOptions(str(root), False, False)
    bounce = io.Bounce()
    ids = [ObjectId(b"restart" + k.to_bytes(8, "big"), "mha", 100) for k in range(n)]
    body = memoryview(bytes(range(100)))
    for i in ids:
        io.write_chunk(opts, opened.journal, i.name(), i, body, bounce)
    opened.journal.close()
    os.close(opened.lock_fd)
    return ids


async def test_restart_with_20000_chunks_is_fast(tmp_path: Path, cap: None) -> None:
    ids = await trio.to_thread.run_sync(_write_many, tmp_path, 20000)
    started = time.perf_counter()
    t = DiskTier(tmp_path, 1 << 40)
    listed = await t.scan()
    first = bytearray(100)
    assert await t.get_into([(ids[-1], first)]) == [True]
    elapsed = time.perf_counter() - started
    assert len(listed) == 20000
    assert bytes(first) == bytes(range(100))
    assert elapsed < 2.0, f"restart to first hit took {elapsed:.2f} s"
    await t.aclose()


# -- kill -9 during heavy writes ------------------------------------------------

WRITER = """
import sys, trio
from lmcd_backends.disk import DiskTier
from lmcd_backends.protocol import ObjectId
from tests.test_disk_tier import kill_payload

path, mode = sys.argv[1], sys.argv[2]

def oid(n):
    return ObjectId(b"kill" + n.to_bytes(8, "big"), "mha", 256 * 1024 + n % 7 * 1000)

payload = kill_payload

async def main():
    tier = DiskTier(path, 1 << 40, threads=4, direct=None if mode == "auto" else False)
    await tier.scan()
    n = 0
    while True:
        batch = [oid(n + k) for k in range(8)]
        assert all(await tier.put([(i, payload(i)) for i in batch]))
        n += 8
        print(n, flush=True)

trio.run(main)
"""


_BASE = random.Random(0).randbytes(512 * 1024)


def kill_payload(i: ObjectId) -> bytes:
    """Content derived from the id, cheap to make (the writer must spend its
    time writing, so that the kill lands mid-write)."""
    return (i.key * 4)[:48] + _BASE[48 : i.nbytes]


def _complete_on_disk(path: Path) -> bool:
    """Whether the file is a whole, valid chunk named after its id."""
    data = path.read_bytes()
    try:
        header = format.decode_header(data)
    except format.FormatError:
        return False
    n = header.oid.nbytes
    body = data[header.header_size : header.header_size + n]
    return (
        header.oid.name() == path.name
        and len(data) == format.file_size(header.oid)
        and format.crc32c(body) == header.payload_crc
    )


def _kill_writer(path: Path, mode: str, after: int, extra: float) -> int:
    """Run the writer, SIGKILL it `extra` seconds after it acknowledged
    `after` chunks; returns how many it acknowledged."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    acked = 0
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []))
    reader.start()
    deadline = time.monotonic() + 60
    while acked < after and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
        acked = int(lines[-1]) if lines else 0
    time.sleep(extra)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    proc.stdout.close()
    assert acked >= after, "the writer did not get going"
    return int(lines[-1])


@pytest.mark.parametrize("mode_name", list(MODES))
async def test_kill_9_during_heavy_writes(
    tmp_path: Path, mode_name: str, cap: None
) -> None:
    rng = random.Random(0)
    for round_ in range(3):
        acked = await trio.to_thread.run_sync(
            _kill_writer, tmp_path, mode_name, 48 * (round_ + 1), rng.random() * 0.05
        )
        # What a write leaves under a chunk's final name is always whole
        # (temporary name, then rename): never a torn chunk, before recovery.
        for path in (tmp_path / io.CHUNKS_DIR).glob("*/" + "?" * io.NAME_LEN):
            assert _complete_on_disk(path), path
        t = DiskTier(tmp_path, 1 << 40, direct=MODES[mode_name])
        listed = [i for i, _ in await t.scan()]
        leftovers = list((tmp_path / io.CHUNKS_DIR).glob("*/*.tmp"))
        assert not leftovers
        by_n = {int.from_bytes(i.key[4:], "big"): i for i in listed}
        # Everything acknowledged survived; anything else is whole or absent.
        assert set(range(acked)) <= set(by_n)
        bufs = [bytearray(i.nbytes) for i in listed]
        got = await t.get_into(list(zip(listed, bufs, strict=True)))
        assert all(got)
        for i, b in zip(listed, bufs, strict=True):
            assert bytes(b) == kill_payload(i)
        assert t.usage().verify_failures == 0
        await t.aclose()


# -- capacity, churn, cancellation ------------------------------------------------


async def test_disk_use_stays_within_capacity_under_churn(
    tmp_path: Path, mode: bool | None, cap: None
) -> None:
    capacity = 6 * MiB
    t = DiskTier(tmp_path / "d", capacity, threads=4, direct=mode)
    await t.scan()
    biggest = MiB + 2 * format.BLOCK
    rng = random.Random(1)
    held: list[ObjectId] = []
    worst = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.002):
            worst[0] = max(worst[0], disk_bytes(tmp_path / "d" / io.CHUNKS_DIR))

    async def churn(worker: int) -> None:
        for k in range(40):
            i = oid(worker * 1000 + k, rng.randrange(1, MiB))
            while not (await t.put([(i, payload(i))]))[0]:
                if held:  # evict the oldest, as the manager's LRU would
                    await t.delete([held.pop(0)])
                else:
                    await trio.sleep(0.001)
            held.append(i)
            assert t.usage().used_bytes <= capacity

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, watch)
        try:
            async with trio.open_nursery() as workers:
                for w in range(3):
                    workers.start_soon(churn, w)
        finally:
            done.set()
    assert worst[0] <= capacity + biggest
    assert disk_bytes(tmp_path / "d") <= capacity + biggest
    assert t.usage().used_bytes == sum(s for _, s in await t.scan())
    await t.aclose()


class Gate:
    """Holds the worker threads of io.`name` until `open()`, and logs when
    each starts and ends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.events: list[str] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._starts = 0
        self._waiters: dict[int, trio.Event] = {}
        self._token = trio.lowlevel.current_trio_token()
        real = getattr(io, name)

        def gated(*args: Any) -> Any:
            self._log("start")
            trio.from_thread.run_sync(self._started, trio_token=self._token)
            self._open.wait(TIMEOUT)
            try:
                return real(*args)
            finally:
                self._log("end")

        monkeypatch.setattr(io, name, gated)

    def _log(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def log(self) -> list[str]:
        with self._lock:
            return list(self.events)

    def open(self) -> None:
        self._open.set()

    def _started(self) -> None:  # on the Trio thread
        self._starts += 1
        for n, event in self._waiters.items():
            if self._starts >= n:
                event.set()

    async def wait_started(self, n: int) -> None:
        event = self._waiters.setdefault(n, trio.Event())
        if self._starts >= n:
            event.set()
        await event.wait()


@pytest.mark.parametrize("op", ["write_chunk", "read_chunk"])
async def test_cancellation_waits_for_threads_touching_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, cap: None
) -> None:
    t = DiskTier(tmp_path / "d", 64 * MiB, threads=2)
    ids = [oid(i, 100000) for i in range(6)]
    if op == "read_chunk":
        await t.put([(i, payload(i)) for i in ids])
    gate = Gate(monkeypatch, op)
    bufs = [bytearray(i.nbytes) for i in ids]
    returned = trio.Event()

    async def call(scope: trio.CancelScope) -> None:
        with scope:
            if op == "write_chunk":
                await t.put([(i, payload(i)) for i in ids])
            else:
                await t.get_into(list(zip(ids, bufs, strict=True)))
        returned.set()

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, scope)
        await gate.wait_started(2)  # two threads now hold buffers
        scope.cancel()
        with trio.move_on_after(0.1):
            await returned.wait()
        # Cancelled, yet still waiting for the two threads.
        assert not returned.is_set()
        gate.open()
        await returned.wait()
    assert scope.cancelled_caught
    # The queued items never started; both running threads ended first.
    assert gate.log() == ["start", "start", "end", "end"]
    assert t.usage().queue_depth == 0
    assert (await t.contains(ids)).count(True) == (2 if op == "write_chunk" else 6)
    await t.aclose()


async def test_delete_waits_for_an_in_flight_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: None
) -> None:
    t = DiskTier(tmp_path / "d", 64 * MiB)
    await t.scan()
    gate = Gate(monkeypatch, "write_chunk")
    a = oid(1, 5000)
    deleted = trio.Event()

    async def delete() -> None:
        await t.delete([a])
        deleted.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.put, [(a, payload(a))])
        await gate.wait_started(1)
        assert await t.put([(a, payload(a))]) == [False]  # already being written
        nursery.start_soon(delete)
        await trio.sleep(0.05)
        assert not deleted.is_set()  # waits for the write
        gate.open()
    assert await t.contains([a]) == [False]
    assert not chunk_file(t, a).exists()
    assert t.usage().used_bytes == 0
    await t.aclose()


async def test_write_failure_is_counted_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: None
) -> None:
    t = DiskTier(tmp_path / "d", 64 * MiB)
    await t.scan()

    def full(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    a = oid(1, 5000)
    assert await t.put([(a, payload(a))]) == [False]
    monkeypatch.undo()
    u = t.usage()
    assert (u.write_failures, u.objects, u.used_bytes, u.queue_depth) == (1, 0, 0, 0)
    assert not list((tmp_path / "d" / io.CHUNKS_DIR).glob("*/*"))
    assert await t.put([(a, payload(a))]) == [True]
    await t.aclose()


async def test_journal_is_compacted_under_churn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: None
) -> None:
    monkeypatch.setattr(tier_module, "JOURNAL_SLACK", 16)
    t = DiskTier(tmp_path, 64 * MiB)
    live: list[ObjectId] = []
    for k in range(200):
        i = oid(k, 100)
        await t.put([(i, payload(i))])
        live.append(i)
        if len(live) > 5:
            await t.delete([live.pop(0)])
    assert t._journal is not None
    assert t._journal.records <= 2 * 5 + 16 + 1
    size = (tmp_path / io.JOURNAL).stat().st_size
    assert size < 40 * len(format.encode_record(live[0]))
    # Crash (no compaction at close), then reopen: exactly the live set.
    t._journal.close()
    os.close(t._lock_fd)
    again = DiskTier(tmp_path, 64 * MiB)
    assert [i for i, _ in await again.scan()] == live
    await again.aclose()


async def test_health(tmp_path: Path, cap: None) -> None:
    t = DiskTier(tmp_path / "d", MiB, min_free_bytes=1 << 60)
    health = await t.health()
    assert not health.healthy
    assert "nearly full" in health.detail
    await t.aclose()
    ok = DiskTier(tmp_path / "e", MiB)
    assert (await ok.health()).healthy
    os.rename(tmp_path / "e", tmp_path / "gone")
    assert not (await ok.health()).healthy
    await ok.aclose()


def test_benchmark_runs_small(tmp_path: Path) -> None:
    from lmcd.benchmarks import disk as bench

    if not io.probe_direct(str(tmp_path)):
        pytest.skip("no O_DIRECT here: the benchmark refuses to run")
    tp = bench.throughput(tmp_path, 64 * 1024, MiB, threads=2, rounds=1)
    assert tp.chunks == 16
    assert min(tp.write_gbps, tp.read_gbps, tp.base_write_gbps) > 0
    rs = bench.restart(tmp_path, 50, 4096, drop=False)
    assert rs.chunks == 50
    assert 0 < rs.open_to_hit_s <= rs.process_to_hit_s
    text = bench.report([tp], rs, threads=2, rounds=1)
    assert "| 0.0625 MiB | 16 |" in text
    assert "Restart with 50 chunks" in text
