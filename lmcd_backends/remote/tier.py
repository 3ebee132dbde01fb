"""`ValkeyTier`: the remote copy tier on a Valkey (or Redis) cluster.

The Trio side of the tier: it validates buffers, routes each chunk to its
node, enforces the in-flight budget, dispatches blocking work to worker
threads (`client.RemoteClient`) and keeps the counters. Nothing here blocks
the Trio thread; a worker is never abandoned while it touches a caller's
buffer (cancellation waits for it, and it ends by its deadline).
"""

from __future__ import annotations

import collections
import logging
import os
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from lmcd.errors import ConfigError, TierError
from lmcd_backends.protocol import CopyTierUsage, ObjectId, TierHealth
from lmcd_backends.remote.client import (
    Credentials,
    Mode,
    Node,
    NodeStatus,
    Outcome,
    RemoteClient,
)
from lmcd_backends.remote.layout import KeySpace, Manifest

log = logging.getLogger("lmcd.remote")

MiB = 1 << 20
DEFAULT_PORT = 6379
# On loopback no part size won consistently (docs/valkey.md); 4 MiB bounds
# what one GET costs the server's main thread (other daemons' lookups wait
# behind it) and the output buffer a reader holds there.
DEFAULT_PART_SIZE = 4 * MiB
MAX_PART_SIZE = 512 * MiB  # the server's proto-max-bulk-len default
# Manifests found by `contains` are kept this long (and at most this many)
# for the `get_into` that usually follows (a promotion): it then asks for
# the parts at once, one round trip fewer per chunk. A stale one only costs
# a second read (`RemoteClient.read_chunk`).
MANIFEST_MEMO_S = 2.0
MANIFEST_MEMO_MAX = 4096


@attrs.frozen
class Address:
    host: str
    port: int


@attrs.frozen
class RemoteUrl:
    """A parsed `valkey://[user[:password]@]HOST:PORT[,HOST:PORT...]`.
    `valkeys://` (or `rediss://`) asks for TLS."""

    addresses: tuple[Address, ...]
    tls: bool
    username: str | None
    password: str | None = attrs.field(repr=False)


def parse_url(url: str) -> RemoteUrl:
    """Parse a remote tier URL; raises `ConfigError` when it is not one."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("valkey", "valkeys", "redis", "rediss"):
        raise ConfigError(
            f"remote URL must start with valkey:// or valkeys://: {url!r}"
        )
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    username = password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, has_pw, pw = auth.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(pw) if has_pw else None
        if not has_pw:  # valkey://secret@host: a password without a user
            username, password = None, urllib.parse.unquote(user)
    addresses = []
    for raw in rest.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("["):  # [::1]:6379
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.lstrip(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"bad port in remote URL: {item!r}") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"bad address in remote URL: {item!r}")
        addresses.append(Address(host, port))
    if not addresses:
        raise ConfigError(f"no address in remote URL {url!r}")
    return RemoteUrl(tuple(addresses), scheme.endswith("s"), username, password)


@attrs.frozen
class ValkeyStatistics:
    """What the remote tier has done since it was made (chunk counts unless
    named bytes), and the state of each node."""

    mode: str  # cluster, standalone, or unknown before the first contact
    nodes: tuple[NodeStatus, ...]
    lookups: int  # ids asked by `contains`
    lookup_hits: int
    hits: int
    misses: int  # no such chunk in the cluster
    verify_failures: int  # a part missing, damaged or of another size; a bad manifest
    io_failures: int  # error replies and broken connections
    timeouts: int
    fast_fails: int  # answered without I/O: node marked down or no topology
    writes: int
    written_bytes: int
    already_held: int  # puts of chunks the cluster already held (not rewritten)
    write_failures: int
    dropped_writes: int  # refused at once: the in-flight budget was spent
    inflight_bytes: int
    queue_depth: int
    topology_refreshes: int
    redirects: int


@attrs.define(slots=True)
class _Counters:
    lookups: int = 0
    lookup_hits: int = 0
    hits: int = 0
    read_bytes: int = 0
    misses: int = 0
    verify_failures: int = 0
    io_failures: int = 0
    timeouts: int = 0
    fast_fails: int = 0
    writes: int = 0
    written_bytes: int = 0
    already_held: int = 0
    write_failures: int = 0
    dropped_writes: int = 0

    def failure(self, outcome: Outcome) -> None:
        if outcome is Outcome.TIMEOUT:
            self.timeouts += 1
        elif outcome is Outcome.FAILED:
            self.io_failures += 1
        elif outcome is Outcome.SKIPPED:
            self.fast_fails += 1
        elif outcome in (Outcome.BROKEN, Outcome.BAD_MANIFEST):
            self.verify_failures += 1


@attrs.define(slots=True)
class _RateLimitedLog:
    every_s: float = 10.0
    _last: dict[str, float] = attrs.field(factory=dict)
    _suppressed: dict[str, int] = attrs.field(factory=dict)

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.every_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        suffix = f" ({skipped} more since the last report)" if skipped else ""
        log.warning(msg + suffix, *args)


def _view(buf: Any, oid: ObjectId, writable: bool) -> memoryview:
    """`buf` (a CPU uint8 tensor or bytes-like of `oid.nbytes`) as a flat
    byte memoryview; `ValueError` if it cannot be one."""
    if type(buf).__module__.startswith("torch"):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("tensor buffers must be contiguous CPU tensors")
        buf = buf.detach().numpy()
    try:
        view = memoryview(buf).cast("B")
    except TypeError as e:
        raise ValueError(
            f"buffer for {oid.name()} is not contiguous memory: {e}"
        ) from e
    if view.nbytes != oid.nbytes:
        raise ValueError(f"buffer of {view.nbytes} bytes for a chunk of {oid.nbytes}")
    if writable and view.readonly:
        raise ValueError("get_into needs a writable buffer")
    return view


def _tls_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None, verify: bool
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@attrs.define(slots=True, eq=False)
class ValkeyTier:
    """A copy tier on a Valkey cluster (or standalone server) shared by
    several lmcd daemons; implements `lmcd_backends.protocol.CopyTier`.

    - `url`: `valkey://HOST:PORT[,HOST:PORT...]` (seeds; the rest of a
      cluster is discovered), `valkeys://` for TLS; `user:password@` may
      precede the addresses, but `password=` keeps it out of the URL.
    - `mode`: "auto" (ask the server), "cluster" or "standalone".
    - `prefix`: starts every key, so deployments can share a cluster.
    - `timeout`: seconds a chunk transfer may wait on a silent node, plus
      `nbytes / min_bandwidth` for the payload. `lookup_timeout`: the
      deadline of `contains` and of the first contact. A node that misses a
      deadline (or refuses connections) is marked down and skipped (misses,
      False) until a background probe reaches it again.
    - `part_size`: chunks are cut into parts of this size.
    - `ttl`: seconds a stored chunk lives (None: until the cluster evicts it).
    - `read_threads`/`write_threads`/`lookup_threads`: worker threads for
      each kind of work, so that lookups never queue behind transfers.
    - `max_inflight_bytes`: `put` refuses (False, counted as dropped) what
      would take the bytes being written past this, instead of waiting.

    Construction does no I/O; the first method awaited makes the first
    contact. Methods raise `TierError` after `aclose()`, `ValueError` for a
    buffer of the wrong length (before any I/O); every other failure is a
    per-chunk False. `scan()` is empty: a shared cluster is not listed.
    `usage()` reports capacity, use and object count as 0 (unknown: the
    cluster's own, shared by every daemon).
    """

    url: str = attrs.field(repr=lambda u: parse_url(u).addresses.__repr__())
    prefix: str = "lmcd:"
    mode: str = "auto"
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool | None = None  # None: from the URL scheme
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    tls_verify: bool = True
    timeout: float = 1.0
    lookup_timeout: float = 0.1
    min_bandwidth: float = 200e6
    part_size: int = DEFAULT_PART_SIZE
    ttl: float | None = None
    read_threads: int = 4
    write_threads: int = 2
    lookup_threads: int = 4
    max_inflight_bytes: int = 256 * MiB
    probe_interval: float = 0.25
    name: str = "valkey"

    _client: RemoteClient = attrs.field(init=False)
    _counters: _Counters = attrs.field(factory=_Counters, init=False)
    _warn: _RateLimitedLog = attrs.field(factory=_RateLimitedLog, init=False)
    _read_limiter: trio.CapacityLimiter = attrs.field(init=False)
    _write_limiter: trio.CapacityLimiter = attrs.field(init=False)
    _lookup_limiter: trio.CapacityLimiter = attrs.field(init=False)
    _inflight: int = attrs.field(default=0, init=False)
    _memo: OrderedDict[ObjectId, tuple[Manifest, float]] = attrs.field(
        factory=OrderedDict, init=False
    )
    _queued: int = attrs.field(default=0, init=False)
    _busy: int = attrs.field(default=0, init=False)
    _idle: trio.Event | None = attrs.field(default=None, init=False)
    _opened: trio.Event | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        parsed = parse_url(self.url)
        try:
            mode = Mode(self.mode)
        except ValueError:
            raise ConfigError(
                f"mode must be auto, cluster or standalone: {self.mode!r}"
            ) from None
        if not 4096 <= self.part_size <= MAX_PART_SIZE:
            raise ConfigError("part_size must be between 4 KiB and 512 MiB")
        if self.timeout <= 0 or self.lookup_timeout <= 0 or self.min_bandwidth <= 0:
            raise ConfigError("timeouts and min_bandwidth must be positive")
        if self.ttl is not None and self.ttl <= 0:
            raise ConfigError("ttl must be positive (or None for no expiry)")
        if min(self.read_threads, self.write_threads, self.lookup_threads) < 1:
            raise ConfigError("thread counts must be at least 1")
        if self.max_inflight_bytes <= 0:
            raise ConfigError("max_inflight_bytes must be positive")
        try:
            keys = KeySpace(self.prefix.encode())
        except ValueError as e:
            raise ConfigError(str(e)) from e
        use_tls = parsed.tls if self.tls is None else self.tls
        try:
            context = (
                _tls_context(
                    self.tls_ca_file,
                    self.tls_cert_file,
                    self.tls_key_file,
                    self.tls_verify,
                )
                if use_tls
                else None
            )
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS settings: {e}") from e
        creds = Credentials(
            username=self.username or parsed.username,
            password=self.password if self.password is not None else parsed.password,
            tls=context,
            server_name=self.tls_server_name,
        )
        self._client = RemoteClient(
            [(a.host, a.port) for a in parsed.addresses],
            keys,
            creds,
            mode,
            probe_interval=self.probe_interval,
            probe_timeout=max(self.timeout, self.lookup_timeout),
        )
        self._read_limiter = trio.CapacityLimiter(self.read_threads)
        self._write_limiter = trio.CapacityLimiter(self.write_threads)
        self._lookup_limiter = trio.CapacityLimiter(self.lookup_threads)

    # -- what the storage manager reads without I/O ---------------------------

    def usage(self) -> CopyTierUsage:
        c = self._counters
        return CopyTierUsage(
            capacity_bytes=0,
            used_bytes=0,
            objects=0,
            reads=c.hits,
            read_bytes=c.read_bytes,
            writes=c.writes,
            written_bytes=c.written_bytes,
            read_failures=c.verify_failures + c.io_failures + c.timeouts,
            verify_failures=c.verify_failures,
            queue_depth=self._queued,
        )

    def statistics(self) -> ValkeyStatistics:
        c = self._counters
        client = self._client
        mode = (
            "unknown"
            if not client.known
            else "cluster"
            if client.cluster
            else "standalone"
        )
        return ValkeyStatistics(
            mode=mode,
            nodes=tuple(client.status()),
            lookups=c.lookups,
            lookup_hits=c.lookup_hits,
            hits=c.hits,
            misses=c.misses,
            verify_failures=c.verify_failures,
            io_failures=c.io_failures,
            timeouts=c.timeouts,
            fast_fails=c.fast_fails,
            writes=c.writes,
            written_bytes=c.written_bytes,
            already_held=c.already_held,
            write_failures=c.write_failures,
            dropped_writes=c.dropped_writes,
            inflight_bytes=self._inflight,
            queue_depth=self._queued,
            topology_refreshes=client.refreshes,
            redirects=client.redirects,
        )

    # -- the protocol ----------------------------------------------------------

    async def contains(self, ids: Sequence[ObjectId]) -> list[bool]:
        """Whether the cluster holds a valid manifest for each id: one
        pipelined round trip per node, all nodes at once, within
        `lookup_timeout`. A node marked down answers False at once."""
        async with self._call():
            self._counters.lookups += len(ids)
            out = [False] * len(ids)
            groups = self._group(range(len(ids)), ids)
            deadline = time.monotonic() + self.lookup_timeout

            async def one(node: Node, indexes: list[int]) -> None:
                oids = [ids[i] for i in indexes]
                results: list[Manifest | Outcome]
                if node.down:  # fail fast, without even a thread
                    results = [Outcome.SKIPPED] * len(oids)
                else:
                    results = await self._run(
                        self._lookup_limiter,
                        lambda: self._client.read_manifests(node, oids, deadline),
                        len(indexes),
                    )
                now = time.monotonic()
                for i, r in zip(indexes, results, strict=True):
                    if isinstance(r, Manifest):
                        out[i] = True
                        self._remember(r, now)
                    elif r is not Outcome.MISS:
                        self._counters.failure(r)
                        self._note(r, ids[i], "lookup")

            self._one_thread_per_node(len(groups))
            async with trio.open_nursery() as nursery:
                for node, indexes in groups:
                    nursery.start_soon(one, node, indexes)
            self._counters.lookup_hits += sum(out)
            return out

    async def get_into(self, items: Sequence[tuple[ObjectId, Any]]) -> list[bool]:
        """Fill each buffer with its verified chunk; False (buffer contents
        unspecified) for a miss, a damaged chunk, a failure, or a node that
        is down.

        Up to `read_threads` threads take the chunks from one queue, in
        request order, each the next one whatever its node: every thread
        stays busy to the end (fixed per-node batches left a thread or two
        finishing the largest ones alone), a stalled node holds up only the
        chunk being read from it, and the leading chunks arrive first."""
        views = [_view(buf, oid, writable=True) for oid, buf in items]
        async with self._call():
            out = [False] * len(items)
            ids = [oid for oid, _ in items]
            node_of: dict[int, Node] = {}
            for node, indexes in self._group(range(len(items)), ids):
                if node.down:  # fail fast, without even a thread
                    self._counters.fast_fails += len(indexes)
                    continue
                for i in indexes:
                    node_of[i] = node
            # Manifests recalled here: the memo is the Trio thread's.
            memos = {i: self._recall(ids[i]) for i in node_of}
            queue = collections.deque(sorted(node_of))
            outcomes: dict[int, Outcome] = {}

            def reader() -> None:  # a worker thread
                while True:
                    try:
                        i = queue.popleft()  # atomic: threads share the queue
                    except IndexError:
                        return
                    oid = ids[i]
                    outcomes[i] = self._client.read_chunk(
                        node_of[i], oid, views[i], memos[i], self._deadline(oid.nbytes)
                    )

            async def stop_when_cancelled() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    queue.clear()  # each thread ends after its chunk

            self._queued += len(node_of)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stop_when_cancelled)
                    async with trio.open_nursery() as readers:
                        for _ in range(min(self.read_threads, len(queue))):
                            readers.start_soon(self._run, self._read_limiter, reader, 0)
                    nursery.cancel_scope.cancel()
            finally:
                self._queued -= len(node_of)
            for i, outcome in sorted(outcomes.items()):
                oid = ids[i]
                if outcome is Outcome.HIT:
                    out[i] = True
                    self._counters.hits += 1
                    self._counters.read_bytes += oid.nbytes
                elif outcome is Outcome.MISS:
                    self._counters.misses += 1
                else:
                    self._counters.failure(outcome)
                    self._note(outcome, oid, "read")
            return out

    async def put(self, items: Sequence[tuple[ObjectId, Any]]) -> list[bool]:
        """Store each chunk unless the cluster already holds it (True either
        way). What would take the bytes in flight past `max_inflight_bytes`
        is refused at once (False, counted as dropped): a slow cluster makes
        write-through drop chunks, never wait."""
        views = [_view(buf, oid, writable=False) for oid, buf in items]
        async with self._call():
            out = [False] * len(items)
            admitted = []
            for i, (oid, _) in enumerate(items):
                if self._inflight + oid.nbytes > self.max_inflight_bytes:
                    self._counters.dropped_writes += 1
                    continue
                self._inflight += oid.nbytes
                admitted.append(i)
            ttl_ms = None if self.ttl is None else max(1, round(self.ttl * 1000))

            async def one(i: int) -> None:
                oid = items[i][0]
                view = views[i]
                if self._down(oid):  # fail fast, without even a thread
                    self._inflight -= oid.nbytes
                    self._counters.write_failures += 1
                    self._counters.fast_fails += 1
                    return
                try:
                    outcome = await self._run(
                        self._write_limiter,
                        lambda: self._client.put_chunk(
                            oid,
                            view,
                            self._deadline(oid.nbytes),
                            self.part_size,
                            ttl_ms,
                        ),
                        1,
                    )
                finally:
                    self._inflight -= oid.nbytes
                if outcome is Outcome.WRITTEN:
                    out[i] = True
                    self._counters.writes += 1
                    self._counters.written_bytes += oid.nbytes
                elif outcome is Outcome.HELD:
                    out[i] = True
                    self._counters.already_held += 1
                else:
                    self._counters.write_failures += 1
                    if outcome is Outcome.SKIPPED:
                        self._counters.fast_fails += 1
                    self._note(outcome, oid, "write")

            await self._each(admitted, one)
            return out

    async def delete(self, ids: Sequence[ObjectId]) -> None:
        """Remove each chunk from the cluster (best effort: a node that is
        down keeps its copy, which TTL or eviction removes later)."""
        async with self._call():
            deadline = time.monotonic() + self.timeout
            for oid in ids:
                self._memo.pop(oid, None)

            async def one(node: Node, indexes: list[int]) -> None:
                oids = [ids[i] for i in indexes]
                await self._run(
                    self._lookup_limiter,
                    lambda: self._client.delete_chunks(node, oids, deadline),
                    len(indexes),
                )

            groups = self._group(range(len(ids)), ids)
            self._one_thread_per_node(len(groups))
            async with trio.open_nursery() as nursery:
                for node, indexes in groups:
                    nursery.start_soon(one, node, indexes)

    async def scan(self) -> list[tuple[ObjectId, int]]:
        """Empty: a shared cluster cannot be listed cheaply, and its chunks
        are found by `contains` instead."""
        async with self._call():
            return []

    async def health(self) -> TierHealth:
        """Healthy when the topology is known and no node is marked down;
        the detail names the nodes that are (no I/O beyond the first
        contact)."""
        if self._closed:
            return TierHealth(False, "closed")
        async with self._call():
            problem = self._client.problem()
            return TierHealth(not problem, problem)

    async def aclose(self) -> None:
        """Wait for calls in progress (each ends by its deadline), then stop
        the prober and close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        while self._busy:
            self._idle = trio.Event()
            await self._idle.wait()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._client.close)

    # -- internals ----------------------------------------------------------

    def _down(self, oid: ObjectId) -> bool:
        """Whether `oid`'s node is marked down (or there is no topology)."""
        node = self._client.route(oid)
        return node is None or node.down

    def _remember(self, m: Manifest, now: float) -> None:
        memo = self._memo
        memo[m.oid] = (m, now)
        memo.move_to_end(m.oid)
        while len(memo) > MANIFEST_MEMO_MAX:
            memo.popitem(last=False)

    def _recall(self, oid: ObjectId) -> Manifest | None:
        """The manifest `contains` found for `oid` moments ago, if any
        (taken: one use)."""
        found = self._memo.pop(oid, None)
        if found is None or time.monotonic() - found[1] > MANIFEST_MEMO_S:
            return None
        return found[0]

    def _one_thread_per_node(self, nodes: int) -> None:
        # Every node's batch of one call must start at once: a batch queued
        # behind a stalled node's would start late and miss the call's
        # deadline through no fault of its node.
        self._lookup_limiter.total_tokens = max(
            self._lookup_limiter.total_tokens, nodes
        )

    def _deadline(self, nbytes: int) -> float:
        return time.monotonic() + self.timeout + nbytes / self.min_bandwidth

    def _group(
        self, indexes: Sequence[int] | range, ids: Sequence[ObjectId]
    ) -> list[tuple[Node, list[int]]]:
        """Indexes grouped by node; ids without a node (no topology) are
        fast fails, left False."""
        groups: dict[int, tuple[Node, list[int]]] = {}
        for i in indexes:
            node = self._client.route(ids[i])
            if node is None:
                self._counters.fast_fails += 1
                continue
            groups.setdefault(id(node), (node, []))[1].append(i)
        return list(groups.values())

    async def _run(
        self, limiter: trio.CapacityLimiter, fn: Callable[[], Any], chunks: int
    ) -> Any:
        """Run `fn` in a worker thread; cancellation waits for it (it may
        be writing into a caller's buffer, and it ends by its deadline)."""
        self._queued += chunks
        try:
            return await trio.to_thread.run_sync(fn, limiter=limiter)
        finally:
            self._queued -= chunks

    async def _each(
        self, indexes: Sequence[int] | range, fn: Callable[[int], Awaitable[None]]
    ) -> None:
        async with trio.open_nursery() as nursery:
            for i in indexes:
                nursery.start_soon(fn, i)

    def _call(self) -> _Call:
        if self._closed:
            raise TierError(f"the {self.name} tier is closed")
        return _Call(self)

    async def _open(self) -> None:
        """First contact, once: read the topology within `lookup_timeout`
        (concurrent first callers wait for the same attempt). On failure the
        prober keeps trying and calls fail fast meanwhile."""
        if self._opened is not None:
            await self._opened.wait()
            return
        self._opened = trio.Event()
        try:
            deadline = time.monotonic() + self.lookup_timeout
            with trio.CancelScope(shield=True):
                ok = await trio.to_thread.run_sync(self._client.refresh, deadline)
            if not ok:
                self._warn.warning(
                    "contact", "valkey tier: %s", self._client.problem() or "no contact"
                )
            self._client.start()
        finally:
            self._opened.set()

    def _note(self, outcome: Outcome, oid: ObjectId, what: str) -> None:
        if outcome is Outcome.SKIPPED:
            return  # the node's state change was logged once
        self._warn.warning(
            f"{what}:{outcome.value}",
            "valkey tier: %s of chunk %s: %s",
            what,
            oid.name(),
            outcome.value,
        )


@attrs.define(slots=True)
class _Call:
    """Counts a call in progress (so `aclose` can wait for it) and makes
    the first contact before the call's own I/O."""

    tier: ValkeyTier

    async def __aenter__(self) -> None:
        self.tier._busy += 1
        try:
            await self.tier._open()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._leave()

    def _leave(self) -> None:
        tier = self.tier
        tier._busy -= 1
        if not tier._busy and tier._idle is not None:
            tier._idle.set()


def tier_from_env(url: str, **kwargs: Any) -> ValkeyTier:
    """A `ValkeyTier` whose password, unless given, comes from
    `$LMCD_VALKEY_PASSWORD` (keeps it off command lines and out of `ps`)."""
    if "password" not in kwargs and os.environ.get("LMCD_VALKEY_PASSWORD"):
        kwargs["password"] = os.environ["LMCD_VALKEY_PASSWORD"]
    return ValkeyTier(url, **kwargs)
