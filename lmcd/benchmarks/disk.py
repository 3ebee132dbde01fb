"""The disk tier against a plain direct-I/O writer and reader, same run.

    python -m lmcd.benchmarks.disk --dir /mnt/nvme/scratch [--chunk-mb 2 32]

For each chunk size: write then read `--total-gb` of chunks with the disk
tier, and with a plain baseline on the same directory: one file per chunk,
O_DIRECT, `pwrite`/`preadv` of the whole chunk from an aligned buffer, in
`--threads` threads (so `--threads` I/Os in flight) at the tier's worker
priority (nice +`WORKER_NICE`). The tier gets the same
number of worker threads, so the same number of I/Os in flight, and is fed
as the daemon feeds it: `DEMOTION_WRITERS` callers, each with a `put` (or
`get_into`) of `--threads` chunks at a time. Rounds alternate baseline and
tier; the median round counts.
Then the restart: `--restart-chunks` chunks written by the tier, a new
process opens the directory, and the time to its first verified hit is
measured (tier open + scan + one read; and from process start).

Everything is written under a fresh subdirectory of `--dir`, removed at the
end.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from lmcd.tiering import DEMOTION_WRITERS
from lmcd_backends.disk import DiskTier
from lmcd_backends.disk import io as disk_io
from lmcd_backends.disk.tier import (
    DEFAULT_THREADS,
    WORKER_NICE,
    lower_thread_priority,
)
from lmcd_backends.protocol import ObjectId

MiB = 1 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


@attrs.frozen
class Throughput:
    chunk_bytes: int
    chunks: int
    write_gbps: float  # the tier's median over rounds
    read_gbps: float
    base_write_gbps: float  # the baseline's median over rounds
    base_read_gbps: float

    @property
    def write_ratio(self) -> float:
        return self.write_gbps / self.base_write_gbps

    @property
    def read_ratio(self) -> float:
        return self.read_gbps / self.base_read_gbps


@attrs.frozen
class Restart:
    chunks: int
    chunk_bytes: int
    open_to_hit_s: float  # DiskTier() to the first verified get_into, in a new process
    process_to_hit_s: float  # from process start (interpreter, imports) to that hit
    no_journal_open_to_hit_s: float  # the same with the journal deleted
    cold: bool  # page cache dropped before each restart


def _aligned(nbytes: int) -> mmap.mmap:
    buf = mmap.mmap(-1, nbytes)
    buf.write(os.urandom(min(nbytes, 1 << 16)) * (nbytes // (1 << 16) or 1))
    return buf


def _parallel(threads: int, work: Callable[[int], None]) -> float:
    """Run work(0..threads-1) in threads, at the disk tier's worker priority
    (`WORKER_NICE`: a fair baseline on a busy machine); seconds from start
    to last end."""

    def run(k: int) -> None:
        lower_thread_priority()
        work(k)

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - started


def baseline_write(
    root: Path, chunk: int, chunks: int, threads: int, direct: bool
) -> float:
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | (_O_DIRECT if direct else 0)
    bufs = [_aligned(chunk) for _ in range(threads)]

    def work(k: int) -> None:
        for n in range(k, chunks, threads):
            fd = os.open(root / f"base-{n}", flags, 0o644)
            try:
                os.pwrite(fd, bufs[k], 0)
            finally:
                os.close(fd)

    return chunk * chunks / _parallel(threads, work) / 1e9


def baseline_read(
    root: Path, chunk: int, chunks: int, threads: int, direct: bool
) -> float:
    bufs = [mmap.mmap(-1, chunk) for _ in range(threads)]

    def work(k: int) -> None:
        for n in range(k, chunks, threads):
            fd = os.open(root / f"base-{n}", os.O_RDONLY | (_O_DIRECT if direct else 0))
            try:
                if os.preadv(fd, [bufs[k]], 0) != chunk:
                    raise RuntimeError("short baseline read")
            finally:
                os.close(fd)

    return chunk * chunks / _parallel(threads, work) / 1e9


def _ids(chunk: int, chunks: int, tag: bytes) -> list[ObjectId]:
    return [ObjectId(tag + n.to_bytes(8, "big"), "bench", chunk) for n in range(chunks)]


async def _callers(
    tier: DiskTier, ids: list[ObjectId], batch: int, callers: int, read: bool
) -> float:
    """GB/s of `callers` concurrent loops of put (or get_into) of `batch`
    chunks each, over `ids`."""
    size = ids[0].nbytes
    bufs = [
        [_aligned(size) if not read else mmap.mmap(-1, size) for _ in range(batch)]
        for _ in range(callers)
    ]
    starts = iter(range(0, len(ids), batch))

    async def caller(c: int) -> None:
        for k in starts:
            items = list(zip(ids[k : k + batch], bufs[c], strict=False))
            ok = await (tier.get_into(items) if read else tier.put(items))
            if not all(ok):
                raise RuntimeError(f"tier {'read' if read else 'write'} failed")

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for c in range(callers):
            nursery.start_soon(caller, c)
    return size * len(ids) / (time.perf_counter() - started) / 1e9


async def tier_write(
    tier: DiskTier, ids: list[ObjectId], batch: int, callers: int = DEMOTION_WRITERS
) -> float:
    return await _callers(tier, ids, batch, callers, read=False)


async def tier_read(
    tier: DiskTier, ids: list[ObjectId], batch: int, callers: int = DEMOTION_WRITERS
) -> float:
    return await _callers(tier, ids, batch, callers, read=True)


def throughput(
    root: Path, chunk: int, total: int, threads: int, rounds: int
) -> Throughput:
    chunks = max(threads * 2, total // chunk)
    batch = threads
    base_dir = root / "baseline"
    tier_dir = root / f"tier-{chunk}"
    results: dict[str, list[float]] = {"bw": [], "br": [], "tw": [], "tr": []}

    async def tier_round(r: int) -> tuple[float, float]:
        tier = DiskTier(tier_dir, chunks * (chunk + 2 * MiB), threads=threads)
        await tier.scan()
        ids = _ids(chunk, chunks, b"round%d-" % r)
        w = await tier_write(tier, ids, batch)
        rd = await tier_read(tier, ids, batch)
        await tier.delete(ids)
        direct = tier.direct_io
        await tier.aclose()
        if not direct:
            raise RuntimeError(f"{root} does not support direct I/O: no fair baseline")
        return w, rd

    for r in range(rounds):
        base_dir.mkdir(exist_ok=True)
        results["bw"].append(baseline_write(base_dir, chunk, chunks, threads, True))
        results["br"].append(baseline_read(base_dir, chunk, chunks, threads, True))
        shutil.rmtree(base_dir)
        w, rd = trio.run(tier_round, r)
        results["tw"].append(w)
        results["tr"].append(rd)
    med = {k: statistics.median(v) for k, v in results.items()}
    return Throughput(chunk, chunks, med["tw"], med["tr"], med["bw"], med["br"])


_RESTART = """
import sys, time
started = time.perf_counter()
import trio
from lmcd.tiering import DEMOTION_WRITERS
from lmcd_backends.disk import DiskTier
from lmcd_backends.protocol import ObjectId
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    t0 = time.perf_counter()
    tier = DiskTier(root, 1 << 50)
    listed = await tier.scan()
    target = ObjectId(b"restart-" + (n - 1).to_bytes(8, "big"), "bench", size)
    buf = bytearray(size)
    assert (await tier.get_into([(target, buf)])) == [True], "no hit"
    t1 = time.perf_counter()
    assert len(listed) == n, len(listed)
    await tier.aclose()
    print(f"{t1 - t0:.4f} {t1 - started:.4f}")

trio.run(main)
"""


def drop_caches() -> bool:
    """Flush and drop the page cache (root only); False if it could not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _restart_once(
    root: Path, chunks: int, chunk: int, cold: bool
) -> tuple[float, float]:
    if cold:
        drop_caches()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", _RESTART, str(root), str(chunks), str(chunk)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    ).stdout.split()
    return float(out[0]), float(out[1])


def restart(root: Path, chunks: int, chunk: int, drop: bool) -> Restart:
    tier_dir = root / "restart"

    async def fill() -> None:
        tier = DiskTier(tier_dir, 1 << 50)
        await tier.scan()
        buf = _aligned(chunk)
        ids = _ids(chunk, chunks, b"restart-")
        for k in range(0, chunks, 64):
            if not all(await tier.put([(i, buf) for i in ids[k : k + 64]])):
                raise RuntimeError("restart fill failed")
        await tier.aclose()

    trio.run(fill)
    cold = drop and drop_caches()
    open_s, process_s = _restart_once(tier_dir, chunks, chunk, cold)
    (tier_dir / disk_io.JOURNAL).unlink()
    lost, _ = _restart_once(tier_dir, chunks, chunk, cold)
    return Restart(chunks, chunk, open_s, process_s, lost, cold)


def report(tp: list[Throughput], rs: Restart, threads: int, rounds: int) -> str:
    lines = [
        "| chunk | chunks | tier write GB/s | baseline write GB/s | ratio | "
        "tier read GB/s | baseline read GB/s | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in tp:
        lines.append(
            f"| {t.chunk_bytes / MiB:g} MiB | {t.chunks} | {t.write_gbps:.2f} | "
            f"{t.base_write_gbps:.2f} | {t.write_ratio:.0%} | {t.read_gbps:.2f} | "
            f"{t.base_read_gbps:.2f} | {t.read_ratio:.0%} |"
        )
    ok_tp = all(t.write_ratio >= 0.8 and t.read_ratio >= 0.8 for t in tp)
    lines += [
        "",
        f"{threads} threads for both ({threads} I/Os in flight, nice "
        f"+{WORKER_NICE}); the tier fed by "
        f"{DEMOTION_WRITERS} callers of {threads} chunks each, as the daemon's "
        f"demotion does; median of {rounds} rounds; goal >= 80% of the "
        f"baseline: {'met' if ok_tp else '**not met**'}.",
        "",
        f"Restart with {rs.chunks:,} chunks of {rs.chunk_bytes // 1024} KiB "
        "(" + ("page cache dropped first" if rs.cold else "warm page cache") + "):",
        "",
        "| restart | seconds |",
        "| --- | ---: |",
        f"| open + scan + first verified hit | {rs.open_to_hit_s:.3f} |",
        "| the same from process start (interpreter, imports) | "
        f"{rs.process_to_hit_s:.3f} |",
        f"| open + first hit with the journal lost (every header read) | "
        f"{rs.no_journal_open_to_hit_s:.3f} |",
        "",
        "Goal: first hit within 2 s: "
        + ("met." if rs.open_to_hit_s <= 2 else "**not met**."),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--dir", required=True, help="a directory on the disk to test")
    parser.add_argument("--chunk-mb", type=float, nargs="+", default=[2.0, 32.0])
    parser.add_argument(
        "--total-gb", type=float, default=2.0, help="per size and round"
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--restart-chunks", type=int, default=20000)
    parser.add_argument("--restart-chunk-kb", type=int, default=64)
    parser.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="measure the restart with a warm page cache (by default, as root, "
        "the whole machine's page cache is dropped before each restart)",
    )
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args()
    root = Path(args.dir) / f"lmcd-disk-bench-{os.getpid()}"
    root.mkdir(parents=True)
    try:
        if not disk_io.probe_direct(str(root)):
            sys.exit(f"{args.dir} does not support O_DIRECT: no fair baseline")
        tp = [
            throughput(
                root,
                int(mb * MiB),
                int(args.total_gb * (1 << 30)),
                args.threads,
                args.rounds,
            )
            for mb in args.chunk_mb
        ]
        rs = restart(
            root, args.restart_chunks, args.restart_chunk_kb * 1024, args.drop_caches
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = report(tp, rs, args.threads, args.rounds)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
