"""The disk and remote tiers through `lmcd serve`, against same-run baselines.

    python -m lmcd.benchmarks.tiers [--dir /path/on/nvme] [--out FILE]

Every figure is measured end to end (a client process talking to spawned
daemons over ZMQ, host-path KV caches in /dev/shm), next to a baseline
measured in the same run on the same machine:

- **disk retrieve**: LOOKUP(lock) + RETRIEVE of N chunks that are only on
  disk (evicted from the CPU buffer), against N chunks' bytes at the read
  rate of a plain direct-I/O reader of the same chunk size in the same
  directory (goal: within 1.25 x that + 5 ms);
- **LOOKUP under disk writes**: LOOKUP p99 while the disk tier demotes a
  full CPU buffer flat out, against the same daemon idle (goal: <= +10%);
- **restart**: a daemon started on a disk tier of >= 20,000 chunks, from
  process start to its first LOOKUP hit and its first RETRIEVE served from
  disk (goal: <= 2 s), by a client that does not register again;
- **cross-daemon retrieve**: daemon A stores N chunks, daemon B (empty
  CPU) looks them up and retrieves them through a 3-master Valkey cluster
  on loopback, in GB/s, against a raw-socket floor (plain TCP, messages of
  the chunk size, as many connections as B's read threads) measured in
  every round beside it; goal: median per-round ratio >= 50%. B's
  retrieve of the same chunks once local is shown beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from lmcd.bench import (
    LatencyResult,
    ModelShape,
    closed_loop,
    lookup_payloads,
    prefill_lookup_keys,
)
from lmcd.benchmarks.disk import drop_caches
from lmcd.client import Client, Unreachable
from lmcd.spawn import free_port, serve_command, stop, wait_ready
from lmcd.wire.lmcache03 import RequestType

MiB = 1 << 20
GiB = 1 << 30
# 4 MiB chunks: 8 layers, 4 KV heads of 128, bf16, 256 tokens.
SHAPE = ModelShape(layers=8, heads=4, head_size=128)
# 16 KiB chunks for the restart's 20,000 (files of 20 KiB).
SMALL = ModelShape(layers=1, heads=1, head_size=16)
EVENT = b"\0" * 64
INSTANCE = 0x7135


# -- plumbing ---------------------------------------------------------------------


@contextlib.contextmanager
def daemon(*flags: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """`lmcd serve FLAGS` on a free loopback port, stopped (SIGINT) at the end."""
    port = free_port()
    proc = subprocess.Popen(
        serve_command(port, "--log-level", "warning", *flags), text=True
    )
    try:
        wait_ready(port, proc)
        yield port, proc
    finally:
        stop(proc)


def _buffer_flags(chunks: int, shape: ModelShape) -> list[str]:
    nbytes = chunks * shape.chunk_bytes(256)
    segment = max(1, min(1024, nbytes >> 20))
    return ["--cpu-buffer-size", f"{nbytes / GiB:.6f}", "--segment-mb", str(segment)]


@attrs.define
class HostKV:
    """A registered /dev/shm KV cache of `slots` chunks of random data."""

    client: Client
    kv: Any
    per_chunk: int
    instance: int = INSTANCE

    @classmethod
    @contextlib.contextmanager
    def open(cls, client: Client, shape: ModelShape, slots: int) -> Iterator[HostKV]:
        """A new KV cache, registered through `client`."""
        with cls.create(client, shape, slots) as host:
            host.register(client)
            yield host

    @classmethod
    @contextlib.contextmanager
    def create(cls, client: Client, shape: ModelShape, slots: int) -> Iterator[HostKV]:
        """A new KV cache, not registered yet."""
        from lmcd.shmkv import SharedKVCache

        per_chunk = 256 // shape.block_size
        kv = SharedKVCache.create(
            "mha",
            num_layers=shape.layers,
            num_blocks=slots * per_chunk,
            block_size=shape.block_size,
            num_heads=shape.heads,
            head_size=shape.head_size,
            dtype=shape.dtype,
            name="tierbench",
            # One file per layer, as lmcache 0.5's cpu_shm workers share
            # theirs and as `lmcd.bench` does: the kernel serializes writes
            # into one file, so a single file would hold every RETRIEVE to
            # one copy thread.
            file_per_layer=True,
        )
        try:
            for layer in kv.layers:
                layer.view(-1).view(dtype=_int_dtype(layer)).random_()
            yield cls(client, kv, per_chunk)
        finally:
            kv.close()

    def register(self, client: Client) -> None:
        client.call(
            RequestType.REGISTER_KV_CACHE, self.instance, self.kv.register_payload()
        )

    def blocks(self, first_slot: int, count: int) -> list[int]:
        p = self.per_chunk
        return list(range(first_slot * p, (first_slot + count) * p))

    def same(self, a: int, b: int, count: int) -> bool:
        """Whether slots a.. and b.. hold the same bytes."""
        import torch

        ia, ib = self.blocks(a, count), self.blocks(b, count)
        return all(
            torch.equal(layer[:, ia].view(torch.uint8), layer[:, ib].view(torch.uint8))
            for layer in self.kv.layers
        )


def _int_dtype(t: Any) -> Any:
    import torch

    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        t.element_size()
    ]


def keys(tag: str, n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "model_name": "tierbench",
            "world_size": 1,
            "worker_id": 0,
            "chunk_hash": f"{tag}:{i}".encode(),
        }
        for i in range(start, start + n)
    ]


def stats(client: Client) -> dict[str, Any]:
    return dict(client.call(RequestType.STATS, timeout=10))


def wait_until(test: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon did not settle")
        time.sleep(0.02)


def disk_settled(client: Client) -> bool:
    disk = stats(client)["tiers"]["disk"]
    return bool(disk["dirty_chunks"] == 0 and disk["queue_depth"] == 0)


# -- disk retrieve ----------------------------------------------------------------


@attrs.frozen
class DiskRetrieve:
    chunks: int
    chunk_bytes: int
    seconds: float  # median LOOKUP(lock) + RETRIEVE of `chunks` disk-only chunks
    read_gbps: float  # the plain direct-I/O reader's rate, same directory
    direct: bool

    @property
    def budget_s(self) -> float:
        return 1.25 * self.chunks * self.chunk_bytes / (self.read_gbps * 1e9) + 0.005

    @property
    def gbps(self) -> float:
        return self.chunks * self.chunk_bytes / self.seconds / 1e9


def disk_retrieve(root: Path, n: int, rounds: int, threads: int) -> DiskRetrieve:
    from lmcd.benchmarks.disk import baseline_read, baseline_write
    from lmcd_backends.disk import io as disk_io

    chunk = SHAPE.chunk_bytes(256)
    cpu_chunks = 2 * n + 8
    path = root / "retrieve"
    flags = [
        *_buffer_flags(cpu_chunks, SHAPE),
        "--disk-path",
        str(path),
        "--disk-size",
        f"{(rounds + 2) * (cpu_chunks + n) * (chunk + 8192) / GiB:.4f}",
        "--disk-policy",
        "write-through",
        "--disk-threads",
        str(threads),
    ]
    times = []
    with (
        daemon(*flags) as (port, _),
        Client("127.0.0.1", port) as client,
        HostKV.open(client, SHAPE, 2 * n) as kv,
    ):
        src, dst = kv.blocks(0, n), kv.blocks(n, n)
        for r in range(rounds):
            targets = keys(f"r{r}", n)
            client.call(RequestType.STORE, targets, INSTANCE, src, EVENT)
            # Fillers push every target out of the CPU buffer (onto disk).
            for f in range(0, cpu_chunks + n, n):
                fill = keys(f"r{r}-fill", n, f)
                client.call(RequestType.STORE, fill, INSTANCE, src, EVENT)
                wait_until(lambda: disk_settled(client))
            started = time.perf_counter()
            found = client.call(RequestType.LOOKUP, targets, True)
            _, got = client.call(RequestType.RETRIEVE, targets, INSTANCE, dst, EVENT)
            times.append(time.perf_counter() - started)
            if sum(found) != n or sum(got) != n or not kv.same(0, n, n):
                raise RuntimeError(f"disk retrieve round {r}: {sum(got)} of {n}")
        promoted = stats(client)["tiers"]["disk"]["promotions"]
        if promoted < rounds * n:
            raise RuntimeError(f"only {promoted} chunks came from disk")
    base = root / "baseline"
    base.mkdir()
    direct = disk_io.probe_direct(str(base))
    baseline_write(base, chunk, n, threads, direct)
    drop_caches()
    read = baseline_read(base, chunk, n, threads, direct)
    return DiskRetrieve(n, chunk, statistics.median(times), read, direct)


# -- LOOKUP under disk writes -----------------------------------------------------


@attrs.frozen
class LookupUnderWrites:
    busy: list[LatencyResult]  # one per round, while the tier demotes
    idle: list[LatencyResult]  # one per round, once the writes are done
    plain: list[LatencyResult]  # one per round, while a plain writer writes
    busy_written_bytes: int  # written by the disk tier during the busy windows
    busy_window_s: float
    writing_at_end: int  # rounds whose demotion outlasted the busy window
    plain_written_bytes: int
    plain_window_s: float

    @property
    def busy_p99_us(self) -> float:
        return statistics.median(r.p99_us for r in self.busy)

    @property
    def idle_p99_us(self) -> float:
        return statistics.median(r.p99_us for r in self.idle)

    @property
    def plain_p99_us(self) -> float:
        return statistics.median(r.p99_us for r in self.plain)

    @property
    def growth(self) -> float:
        return self.busy_p99_us / self.idle_p99_us - 1

    @property
    def growth_over_plain(self) -> float:
        return self.busy_p99_us / self.plain_p99_us - 1


# A plain writer in a process of its own: files of `chunk` bytes, O_DIRECT
# where possible, `threads` at once, for `seconds`; prints the bytes written.
_PLAIN_WRITER = """
import sys, time
from pathlib import Path
from lmcd.benchmarks.disk import baseline_write
from lmcd_backends.disk.io import probe_direct
root, chunk, threads, seconds = Path(sys.argv[1]), *map(float, sys.argv[2:])
direct = probe_direct(str(root))
end, written = time.monotonic() + seconds, 0
while time.monotonic() < end:
    baseline_write(root, int(chunk), 16, int(threads), direct)
    written += 16 * int(chunk)
print(written)
"""


def lookup_under_writes(
    root: Path, buffer_gib: float, duration: float, rounds: int, threads: int = 4
) -> LookupUnderWrites:
    """Rounds of: LOOKUPs while a plain writer (another process) writes
    flat out; fill the buffer with new chunks (write-back then writes every
    one of them, flat out) and LOOKUPs while it writes; LOOKUPs once it is
    done. p99s compared as medians over the rounds."""
    chunk = SHAPE.chunk_bytes(256)
    chunks = int(buffer_gib * GiB // chunk)
    flags = [
        *_buffer_flags(chunks, SHAPE),
        "--disk-path",
        str(root / "writes"),
        "--disk-size",
        f"{(rounds + 1) * buffer_gib + 0.5:.2f}",
        "--disk-threads",
        str(threads),
        # Demote only once the buffer is full: the whole buffer is then
        # written after the last STORE, inside the LOOKUP window.
        "--disk-high-water",
        "1.0",
    ]
    plain_dir = root / "plain"
    plain_dir.mkdir()
    n_keys = 64
    payloads = lookup_payloads(n_keys, hits=True)
    busy: list[LatencyResult] = []
    idle: list[LatencyResult] = []
    plain: list[LatencyResult] = []
    written = writing = plain_written = 0
    window = plain_window = 0.0
    with daemon(*flags) as (port, _), Client("127.0.0.1", port) as client:
        prefill_lookup_keys("127.0.0.1", port, n_keys)
        url = f"tcp://127.0.0.1:{port}"

        def lookups() -> LatencyResult:
            return closed_loop(
                url, RequestType.LOOKUP, payloads, clients=2, duration=duration
            )

        with HostKV.open(client, SHAPE, 8) as kv:
            src = kv.blocks(0, 8)
            for r in range(rounds):
                writer = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _PLAIN_WRITER,
                        str(plain_dir),
                        str(chunk),
                        str(threads),
                        str(duration + 1.0),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(0.3)  # its interpreter is up and writing
                started = time.monotonic()
                plain.append(lookups())
                plain_window += time.monotonic() - started
                plain_written += int(writer.communicate()[0].strip() or 0)
                # Fill the buffer with new chunks: then write-back writes
                # every one of them while the LOOKUPs are the only other
                # traffic.
                for f in range(0, chunks, 8):
                    batch = keys(f"w{r}", 8, f)
                    client.call(RequestType.STORE, batch, INSTANCE, src, EVENT)
                before = stats(client)["tiers"]["disk"]["written_bytes"]
                started = time.monotonic()
                busy.append(lookups())
                window += time.monotonic() - started
                after = stats(client)["tiers"]["disk"]
                written += after["written_bytes"] - before
                writing += after["dirty_chunks"] + after["queue_depth"] > 0
                wait_until(lambda: disk_settled(client))
                idle.append(lookups())
    return LookupUnderWrites(
        busy,
        idle,
        plain,
        written,
        window,
        writing,
        plain_written,
        plain_window,
    )


# -- restart ----------------------------------------------------------------------


@attrs.frozen
class Restart:
    chunks: int
    chunk_bytes: int
    first_lookup_s: float  # process start to the first LOOKUP hit
    first_retrieve_s: float  # process start to the first RETRIEVE served from disk
    recovery_s: float  # the daemon's own index recovery
    cold: bool  # page cache dropped before the restart
    plain_start_s: float  # process start to first answer, no tiers (imports warm)


def restart(root: Path, n: int) -> Restart:
    chunk = SMALL.chunk_bytes(256)
    per_store = 64
    flags = [
        *_buffer_flags(4 * per_store, SMALL),
        "--disk-path",
        str(root / "restart"),
        "--disk-size",
        f"{2 * n * (chunk + 8192) / GiB:.4f}",
        "--disk-policy",
        "write-through",
    ]
    probe = keys("s", 1, n - 1)
    with contextlib.ExitStack() as stack:
        with daemon(*flags) as (port, _), Client("127.0.0.1", port) as client:
            kv = stack.enter_context(HostKV.create(client, SMALL, 2 * per_store))
            kv.register(client)
            src = kv.blocks(0, per_store)
            for f in range(0, n, per_store):
                batch = keys("s", min(per_store, n - f), f)
                client.call(RequestType.STORE, batch, INSTANCE, src, EVENT)
                wait_until(lambda: stats(client)["tiers"]["disk"]["dirty_chunks"] < 64)
            wait_until(lambda: disk_settled(client))
            on_disk = stats(client)["tiers"]["disk"]["chunks"]
            if on_disk < n:
                raise RuntimeError(f"only {on_disk} of {n} chunks reached the disk")
        # The measured restart: a new process on the same directory, and a
        # client that never registers (the daemon reopens the saved one).
        # The chunk files and the index are cold; the interpreter and its
        # imports are warmed first (they are the same with or without a
        # disk tier: `plain_start_s` measures them).
        cold = drop_caches()
        plain = _plain_start()
        started = time.perf_counter()
        port = free_port()
        proc = subprocess.Popen(
            serve_command(port, "--log-level", "warning", *flags), text=True
        )
        try:
            with Client("127.0.0.1", port) as client:
                while True:
                    try:
                        hit = client.call(RequestType.LOOKUP, probe, True, timeout=0.05)
                    except Unreachable:
                        if proc.poll() is not None:
                            raise RuntimeError("the restarted daemon exited") from None
                        continue
                    if hit == [True]:
                        break
                first_lookup = time.perf_counter() - started
                dst = kv.blocks(per_store, 1)
                _, got = client.call(RequestType.RETRIEVE, probe, INSTANCE, dst, EVENT)
                first_retrieve = time.perf_counter() - started
                if got != [True] or not kv.same((n - 1) % per_store, per_store, 1):
                    raise RuntimeError("the restarted daemon did not serve the chunk")
                recovery = stats(client)["tiers"]["disk"]["recovery_s"]
        finally:
            stop(proc)
    return Restart(n, chunk, first_lookup, first_retrieve, recovery, cold, plain)


def _plain_start() -> float:
    """Seconds from process start to the first answer of a daemon without
    tiers, imports warm (the first of two starts warms them for both this
    one and the measured restart)."""
    took = 0.0
    for _ in range(2):
        port = free_port()
        started = time.perf_counter()
        proc = subprocess.Popen(
            serve_command(port, "--log-level", "warning"), text=True
        )
        try:
            wait_ready(port, proc)
            took = time.perf_counter() - started
        finally:
            stop(proc)
    return took


# -- cross-daemon retrieve --------------------------------------------------------


@attrs.frozen
class CrossDaemon:
    """Per round (all lists in round order), measured in the same round:
    the floor, B's LOOKUP(lock) + RETRIEVE of chunks only in the cluster,
    and B's LOOKUP + RETRIEVE of the same chunks again, now in its CPU
    buffer (what any retrieve costs: the copy into the client's memory)."""

    chunks: int
    chunk_bytes: int
    totals: list[float]  # LOOKUP(lock) + RETRIEVE on B, seconds
    lookups: list[float]  # the LOOKUP alone: cluster lookup and promotion
    locals_: list[float]  # LOOKUP + RETRIEVE of the same chunks, now local
    floors: list[float]  # floor GB/s

    @property
    def nbytes(self) -> int:
        return self.chunks * self.chunk_bytes

    @property
    def seconds(self) -> float:
        return statistics.median(self.totals)

    @property
    def lookup_seconds(self) -> float:
        return statistics.median(self.lookups)

    @property
    def local_seconds(self) -> float:
        return statistics.median(self.locals_)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9

    @property
    def promotion_gbps(self) -> float:
        return self.nbytes / self.lookup_seconds / 1e9

    @property
    def floor_gbps(self) -> float:
        return statistics.median(self.floors)

    def ratio(self, seconds: list[float]) -> float:
        """Median over rounds of (GB/s in `seconds`) / (that round's floor)."""
        return statistics.median(
            self.nbytes / t / 1e9 / f for t, f in zip(seconds, self.floors, strict=True)
        )


def cross_daemon(n: int, rounds: int) -> CrossDaemon:
    """Daemon A stores `n` chunks, B (empty) retrieves them through a fresh
    3-master cluster. Each round also measures the floor, in the same
    conditions (cluster and daemons up, idle): one figure per round, so
    that the machine's drifting load touches both alike; compare medians
    of per-round ratios, never one side's best with the other's median.
    One round more runs first, unmeasured: it finds B still finishing its
    start-up in the background (the first buffer segments, torch's
    import) and every connection still to open, on both sides."""
    from lmcd.benchmarks.valkey import Floor
    from lmcd.benchmarks.valkey_cluster import local_cluster

    chunk = SHAPE.chunk_bytes(256)
    prefix = f"tb{os.getpid()}:"
    totals: list[float] = []
    lookups: list[float] = []
    locals_: list[float] = []
    floors: list[float] = []
    with local_cluster(3) as cluster:
        common = ["--remote", cluster.url, "--remote-prefix", prefix]
        a_flags = [*_buffer_flags(2 * n + 8, SHAPE), *common]
        b_flags = [*_buffer_flags(2 * n + 8, SHAPE), *common]
        floor = Floor(chunk, 4)
        with (
            contextlib.closing(floor),
            daemon(*a_flags) as (port_a, _),
            daemon(*b_flags) as (port_b, _),
            Client("127.0.0.1", port_a) as a,
            Client("127.0.0.1", port_b) as b,
            HostKV.open(a, SHAPE, n) as kv_a,
            HostKV.open(b, SHAPE, n) as kv_b,
        ):
            for r in range(rounds + 1):
                if r == 1:  # the warm-up round is over
                    for figures in (totals, lookups, locals_, floors):
                        figures.clear()
                ks = keys(f"x{r}", n)
                a.call(RequestType.STORE, ks, INSTANCE, kv_a.blocks(0, n), EVENT)
                wait_until(functools.partial(_written_remote, a, (r + 1) * n))
                floors.append(floor.gbps(n, 1))
                started = time.perf_counter()
                found = b.call(RequestType.LOOKUP, ks, True)
                lookups.append(time.perf_counter() - started)
                _, got = b.call(
                    RequestType.RETRIEVE, ks, INSTANCE, kv_b.blocks(0, n), EVENT
                )
                totals.append(time.perf_counter() - started)
                if sum(found) != n or sum(got) != n:
                    raise RuntimeError(f"cross-daemon round {r}: {sum(got)} of {n}")
                started = time.perf_counter()
                b.call(RequestType.LOOKUP, ks, True)
                b.call(RequestType.RETRIEVE, ks, INSTANCE, kv_b.blocks(0, n), EVENT)
                locals_.append(time.perf_counter() - started)
                b.call(RequestType.CLEAR)
            import torch

            for layer_a, layer_b in zip(kv_a.kv.layers, kv_b.kv.layers, strict=True):
                if not torch.equal(
                    layer_a.view(torch.uint8), layer_b.view(torch.uint8)
                ):
                    raise RuntimeError("cross-daemon retrieve is not bit-exact")
    return CrossDaemon(n, chunk, totals, lookups, locals_, floors)


def _written_remote(client: Client, count: int) -> bool:
    return bool(stats(client)["tiers"]["remote"]["demotions"] >= count)


# -- report -----------------------------------------------------------------------


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


@attrs.frozen
class Options:
    directory: str | None = None  # where the disk tiers go (None: a temp dir)
    chunks: int = 16
    rounds: int = 3
    threads: int = 4
    buffer_gib: float = 2.0
    duration: float = 0.75
    restart_chunks: int = 20_000


def run_section(options: Options) -> list[str]:
    """Measure everything under a fresh directory (removed after); the
    "Disk and remote tiers" section of docs/performance.md."""
    root = Path(tempfile.mkdtemp(prefix="lmcd-tiers-", dir=options.directory))
    try:
        return section(root, options)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def section(root: Path, args: Options) -> list[str]:
    started = time.time()
    dr = disk_retrieve(root, args.chunks, args.rounds, args.threads)
    lw = lookup_under_writes(
        root, args.buffer_gib, args.duration, args.rounds, args.threads
    )
    rs = restart(root, args.restart_chunks)
    # At least 7 rounds: medians of per-round ratios on a drifting machine.
    cd = cross_daemon(args.chunks, max(7, args.rounds))
    mb = SHAPE.chunk_bytes(256) // MiB
    return [
        "## Disk and remote tiers",
        "",
        "`python -m lmcd.benchmarks.tiers`: spawned daemons driven over ZMQ by",
        f"a client process, host-path KV caches, {mb} MiB chunks (8 layers, 4 KV",
        "heads of 128, bf16); each baseline measured in the same run"
        f" ({time.time() - started:.0f} s). The development machine is a shared",
        "2-core VM with a virtual disk: figures swing between runs.",
        "",
        "| figure | measured | baseline / goal | |",
        "| --- | ---: | ---: | --- |",
        f"| retrieve of {dr.chunks} disk-only chunks (LOOKUP+RETRIEVE) | "
        f"{dr.seconds * 1e3:.1f} ms ({dr.gbps:.2f} GB/s) | "
        f"<= {dr.budget_s * 1e3:.1f} ms (1.25 x bytes at {dr.read_gbps:.2f} GB/s "
        f"{'direct' if dr.direct else 'buffered'} read + 5 ms) | "
        f"{_check(dr.seconds <= dr.budget_s)} |",
        f"| LOOKUP x64 p99 while demoting a full buffer (median of "
        f"{len(lw.busy)} rounds) | {lw.busy_p99_us:,.0f} µs | idle "
        f"{lw.idle_p99_us:,.0f} µs: {lw.growth:+.0%} (goal <= +10%) | "
        f"{_check(lw.growth <= 0.10)} |",
        f"| the same, against LOOKUPs while a plain direct-I/O writer (another "
        f"process, {args.threads} threads) writes flat out | "
        f"{lw.busy_p99_us:,.0f} µs | {lw.plain_p99_us:,.0f} µs: "
        f"{lw.growth_over_plain:+.0%} | |",
        f"| restart on {rs.chunks:,} chunks: first LOOKUP hit, first RETRIEVE | "
        f"{rs.first_lookup_s:.2f} s, {rs.first_retrieve_s:.2f} s from process "
        f"start (index {rs.recovery_s:.2f} s; chunk files "
        f"{'cold' if rs.cold else 'warm: could not drop the page cache'}) | "
        f"<= 2 s; a daemon without tiers answers in {rs.plain_start_s:.2f} s | "
        f"{_check(rs.first_retrieve_s <= 2)} |",
        f"| cross-daemon retrieve of {cd.chunks} chunks through Valkey "
        f"(LOOKUP+RETRIEVE on B; medians of {len(cd.totals)} rounds) | "
        f"{cd.gbps:.2f} GB/s ({cd.seconds * 1e3:.0f} ms) | floor "
        f"{cd.floor_gbps:.2f} GB/s; median per-round ratio "
        f"{cd.ratio(cd.totals):.0%} (goal >= 50%) | "
        f"{_check(cd.ratio(cd.totals) >= 0.5)} |",
        "| the LOOKUP alone (cluster lookup and promotion into B's CPU buffer) | "
        f"{cd.promotion_gbps:.2f} GB/s ({cd.lookup_seconds * 1e3:.0f} ms) | "
        f"{cd.ratio(cd.lookups):.0%} of the floor | |",
        "| LOOKUP+RETRIEVE of the same chunks once in B's CPU buffer (the "
        "copy into the client's memory, part of any retrieve) | "
        f"{cd.nbytes / cd.local_seconds / 1e9:.2f} GB/s "
        f"({cd.local_seconds * 1e3:.0f} ms) | | |",
        "",
        f"During the busy windows ({lw.busy_window_s:.1f} s in all) the disk tier "
        f"wrote {lw.busy_written_bytes / GiB:.2f} GiB "
        f"({lw.busy_written_bytes / lw.busy_window_s / 1e9:.2f} GB/s; still "
        f"writing at the end of {lw.writing_at_end} of {len(lw.busy)} windows),"
        f" the plain writer {lw.plain_written_bytes / GiB:.2f} GiB in about "
        f"{lw.plain_window_s + 1.3 * len(lw.plain):.1f} s. Per-round p99s, "
        "tier / plain writer / idle (µs): "
        + ", ".join(
            f"{b.p99_us:,.0f} / {p.p99_us:,.0f} / {i.p99_us:,.0f}"
            for b, p, i in zip(lw.busy, lw.plain, lw.idle, strict=True)
        )
        + ".",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else ""
    )
    defaults = Options()
    parser.add_argument(
        "--dir", default=None, help="where the disk tiers go (default: a temp dir)"
    )
    parser.add_argument("--chunks", type=int, default=defaults.chunks)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--buffer-gib", type=float, default=defaults.buffer_gib)
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--restart-chunks", type=int, default=defaults.restart_chunks)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    options = Options(
        args.dir,
        args.chunks,
        args.rounds,
        args.threads,
        args.buffer_gib,
        args.duration,
        args.restart_chunks,
    )
    text = "\n".join(run_section(options)) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
