"""The blocking side of the Valkey tier: topology, node health, chunk I/O.

Everything here runs in worker threads (and one prober thread); the Trio
side (`tier.py`) only dispatches and counts. A node that fails an operation
(connection refused, reset, or silent past the deadline) is marked down:
operations routed to it then fail at once, without I/O, until the prober
reconnects to it (or a topology refresh moves its slots elsewhere). So a
dead or stalled node costs one deadline per call that first meets it, and
nothing after that.
"""

from __future__ import annotations

import enum
import logging
import os
import ssl
import threading
import time
from collections.abc import Sequence

import attrs

from lmcd_backends.protocol import ObjectId
from lmcd_backends.remote.layout import (
    SLOTS,
    WRITE_ID_BYTES,
    KeySpace,
    Manifest,
    ManifestError,
    crc32c,
    decode_manifest,
    encode_manifest,
    part_count,
)
from lmcd_backends.remote.resp import Buffer, Connection, ConnectionFailed, ErrorReply

log = logging.getLogger("lmcd.remote")

# Idle connections kept per node (one per worker thread is enough).
MAX_IDLE = 16
# Superseded or orphaned parts (of a lost race, or under a TTL) outlive
# their manifest by this much, so that a reader that just read the manifest
# still finds them.
PART_GRACE_MS = 60_000


class Outcome(enum.Enum):
    """What one chunk operation came to."""

    HIT = "hit"  # get: the buffer holds the verified chunk
    MISS = "miss"  # get/contains: no manifest
    BROKEN = "broken"  # a manifest, but a part missing, damaged or of another size
    BAD_MANIFEST = "bad_manifest"  # a manifest that does not decode or match
    WRITTEN = "written"  # put: stored by this call
    HELD = "held"  # put: already stored (by anyone), not rewritten
    FAILED = "failed"  # an error reply or a broken connection
    TIMEOUT = "timeout"  # the deadline passed
    SKIPPED = "skipped"  # the node is marked down (or no topology yet): no I/O
    MOVED = "moved"  # the slot moved (internal: the operation is retried once)


class Mode(enum.Enum):
    AUTO = "auto"
    CLUSTER = "cluster"
    STANDALONE = "standalone"


@attrs.frozen
class Credentials:
    """How to open a connection: auth and TLS."""

    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    server_name: str | None = None  # TLS name to verify, if not the host


@attrs.define(eq=False)
class Node:
    """One server: its idle connections and whether it is marked down."""

    host: str
    port: int
    idle: list[Connection] = attrs.field(factory=list)
    down: bool = False
    down_since: float = 0.0
    reason: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class NodeStatus:
    address: str
    up: bool
    reason: str
    down_for_s: float


@attrs.define(eq=False)
class RemoteClient:
    """A thread-safe client of one Valkey cluster (or standalone server)
    for the chunk layout of `layout.py`.

    `seeds` are the addresses from the URL; the first reachable one tells
    the topology (`CLUSTER SLOTS`), or, in standalone mode, is the server.
    Chunk operations take an absolute `deadline` (`time.monotonic()`).
    """

    seeds: list[tuple[str, int]]
    keys: KeySpace
    credentials: Credentials = attrs.field(factory=Credentials)
    mode: Mode = Mode.AUTO
    probe_interval: float = 0.25
    probe_timeout: float = 1.0
    max_probe_interval: float = 2.0
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _nodes: dict[tuple[str, int], Node] = attrs.field(factory=dict, init=False)
    _slots: list[Node] | None = attrs.field(default=None, init=False)
    _members: list[Node] = attrs.field(factory=list, init=False)  # of _slots
    _cluster: bool = attrs.field(default=False, init=False)
    _topology_error: str = attrs.field(default="not connected yet", init=False)
    _stale: bool = attrs.field(default=False, init=False)
    _wake: threading.Event = attrs.field(factory=threading.Event, init=False)
    _closed: threading.Event = attrs.field(factory=threading.Event, init=False)
    _prober: threading.Thread | None = attrs.field(default=None, init=False)
    refreshes: int = attrs.field(default=0, init=False)
    redirects: int = attrs.field(default=0, init=False)

    # -- state read by the Trio thread (no I/O) ---------------------------------

    @property
    def known(self) -> bool:
        """Whether a topology is known (the first contact succeeded)."""
        return self._slots is not None

    @property
    def cluster(self) -> bool:
        return self._cluster

    def route(self, oid: ObjectId) -> Node | None:
        """The node that holds `oid`'s slot, or None without a topology."""
        slots = self._slots
        if slots is None:
            return None
        return slots[self.keys.slot(oid)] if self._cluster else slots[0]

    def status(self) -> list[NodeStatus]:
        now = time.monotonic()
        with self._lock:
            nodes = self._serving()
            return [
                NodeStatus(
                    n.address, not n.down, n.reason, now - n.down_since if n.down else 0
                )
                for n in nodes
            ]

    def problem(self) -> str:
        """Why the tier is not fully serving, or "" when it is."""
        if self._slots is None:
            return f"no contact with {self._seed_text()}: {self._topology_error}"
        everyone = self.status()
        down = [s for s in everyone if not s.up]
        if down:
            total = len(everyone)
            names = ", ".join(f"{s.address} ({s.reason})" for s in down)
            return f"{len(down)} of {total} nodes down: {names}"
        return ""

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the prober thread (idempotent). It makes the first contact
        and then brings nodes marked down back."""
        with self._lock:
            if self._prober is not None or self._closed.is_set():
                return
            self._prober = threading.Thread(
                target=self._probe_loop, name="lmcd-valkey-prober", daemon=True
            )
            self._prober.start()

    def close(self) -> None:
        """Stop the prober and close every connection. Does not wait for a
        probe in progress (at most `probe_timeout`): the prober touches only
        its own connections, and closes them when it sees the tier closed."""
        self._closed.set()
        self._wake.set()
        prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(0.05)
        with self._lock:
            for node in self._nodes.values():
                for conn in node.idle:
                    conn.close()
                node.idle.clear()

    # -- connections ----------------------------------------------------------------

    def _node(self, host: str, port: int) -> Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[(host, port)] = Node(host, port)
        return node

    def _serving(self) -> list[Node]:
        return list(self._members)

    def _set_slots(self, slots: list[Node], cluster: bool) -> None:
        """Install a slot map (under `_lock`)."""
        seen: dict[int, Node] = {}
        for n in slots:
            seen.setdefault(id(n), n)
        self._members = list(seen.values())
        self._cluster = cluster
        self._slots = slots

    def acquire(self, node: Node, deadline: float) -> Connection:
        """An open, authenticated connection to `node`: an idle one that the
        server has not closed meanwhile (a restart, its `timeout`), or a new
        one."""
        while True:
            with self._lock:
                if not node.idle:
                    break
                conn = node.idle.pop()
            if not conn.stale():
                return conn
            conn.close()
        creds = self.credentials
        conn = Connection(node.host, node.port, creds.tls, creds.server_name)
        conn.connect(deadline)
        try:
            self._handshake(conn, deadline)
        except ConnectionFailed:
            conn.close()
            raise
        return conn

    def _handshake(self, conn: Connection, deadline: float) -> None:
        creds = self.credentials
        if creds.password is None:
            return
        auth: list[Buffer | str | int] = ["AUTH"]
        if creds.username:
            auth.append(creds.username)
        auth.append(creds.password)
        reply = conn.call(auth, deadline)
        if reply != "OK":
            raise ConnectionFailed(f"authentication failed: {reply!r}")

    def release(self, node: Node, conn: Connection) -> None:
        with self._lock:
            if not node.down and len(node.idle) < MAX_IDLE and not self.closed:
                node.idle.append(conn)
                return
        conn.close()

    def failed(
        self, node: Node, conn: Connection | None, error: ConnectionFailed
    ) -> None:
        """Close `conn` and mark `node` down: later operations skip it until
        the prober reconnects."""
        if conn is not None:
            conn.close()
        with self._lock:
            was_down = node.down
            if not was_down:
                node.down = True
                node.down_since = time.monotonic()
            node.reason = "timed out" if error.timeout else str(error)
            idle, node.idle = node.idle, []
        for c in idle:
            c.close()
        self._wake.set()
        if not was_down:
            log.warning("valkey node %s marked down: %s", node.address, error)

    def _mark_up(self, node: Node) -> None:
        with self._lock:
            was_down, node.down, node.reason = node.down, False, ""
        if was_down:
            log.warning("valkey node %s is back", node.address)

    # -- topology ----------------------------------------------------------------

    def _seed_text(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.seeds)

    def refresh(self, deadline: float) -> bool:
        """Read the topology from any reachable node (up nodes first, then
        the seeds). Returns whether it succeeded."""
        with self._lock:
            candidates = [(n.host, n.port) for n in self._serving() if not n.down]
        candidates += [s for s in self.seeds if s not in candidates]
        error = "no address"
        for host, port in candidates:
            if time.monotonic() >= deadline:
                break
            try:
                self._load_topology(host, port, deadline)
                return True
            except ConnectionFailed as e:
                error = f"{host}:{port}: {e}"
        self._topology_error = error
        return False

    def _load_topology(self, host: str, port: int, deadline: float) -> None:
        probe = Node(host, port)
        conn = self.acquire(probe, deadline)
        try:
            if self.mode is Mode.STANDALONE:
                reply: object = ErrorReply("ERR cluster support disabled (stated)")
            else:
                reply = conn.call(["CLUSTER", "SLOTS"], deadline)
        finally:
            conn.close()
        if isinstance(reply, ErrorReply):
            if "disabled" not in reply.message or self.mode is Mode.CLUSTER:
                raise ConnectionFailed(f"CLUSTER SLOTS: {reply.message}")
            with self._lock:
                self._set_slots([self._node(host, port)], cluster=False)
            self.refreshes += 1
            return
        table = self._parse_slots(reply, host)
        with self._lock:
            self._set_slots(table, cluster=True)
        self.refreshes += 1

    def _parse_slots(self, reply: object, host: str) -> list[Node]:
        if not isinstance(reply, list) or not reply:
            raise ConnectionFailed("CLUSTER SLOTS: no slots served")
        table: list[Node | None] = [None] * SLOTS
        with self._lock:
            for entry in reply:
                try:
                    first, last, master = entry[0], entry[1], entry[2]
                    ip = master[0].decode() if master[0] else host
                    port = int(master[1])
                except (TypeError, IndexError, ValueError, AttributeError):
                    raise ConnectionFailed("CLUSTER SLOTS: malformed reply") from None
                if ip in ("", "?"):
                    ip = host
                node = self._node(ip, port)
                for s in range(max(0, first), min(SLOTS - 1, last) + 1):
                    table[s] = node
            # Slots that no master serves (a failed master's, with full
            # coverage off) go to a placeholder that is always down.
            missing = [i for i, n in enumerate(table) if n is None]
            if missing:
                hole = self._node("?", 0)
                hole.down, hole.reason = True, "slots not served by any node"
                hole.down_since = hole.down_since or time.monotonic()
                for i in missing:
                    table[i] = hole
        return [n for n in table if n is not None]

    # -- prober ----------------------------------------------------------------

    def _probe_loop(self) -> None:
        interval = self.probe_interval
        while not self._closed.is_set():
            try:
                healthy = self._probe_round()
            except Exception:  # the prober must never die
                log.exception("valkey prober round failed")
                healthy = False
            if self._closed.is_set():
                return
            if healthy:
                interval = self.probe_interval
                self._wake.wait()  # until a failure wakes it (or close)
            else:
                self._wake.wait(interval)
                interval = min(interval * 2, self.max_probe_interval)
            self._wake.clear()

    def _probe_round(self) -> bool:
        deadline = time.monotonic() + self.probe_timeout
        if self._stale and self._slots is not None:
            self._stale = False
            self.refresh(deadline)
        if self._slots is None:
            if not self.refresh(deadline):
                return False
            return not self.problem()
        down = [n for n in self._serving() if n.down]
        if not down:
            return True
        if self._cluster:
            self.refresh(deadline)  # a failover may have moved the slots
        for node in self._serving():
            if not node.down or node.host == "?":
                continue
            try:
                self._ping(node)
            except ConnectionFailed as e:
                with self._lock:
                    node.reason = "timed out" if e.timeout else str(e)
        if self._cluster and any(not n.down for n in self._serving()):
            self.refresh(time.monotonic() + self.probe_timeout)
        return not any(n.down for n in self._serving())

    def _ping(self, node: Node) -> None:
        """Reconnect to a node marked down; mark it up if it answers PING."""
        deadline = time.monotonic() + self.probe_timeout
        conn = self.acquire(node, deadline)
        try:
            reply = conn.call(["PING"], deadline)
        except ConnectionFailed:
            conn.close()
            raise
        if reply != "PONG":
            conn.close()
            raise ConnectionFailed(f"PING answered {reply!r}")
        self._mark_up(node)
        self.release(node, conn)

    # -- chunk operations (worker threads) ----------------------------------------

    def read_manifests(
        self, node: Node, oids: Sequence[ObjectId], deadline: float
    ) -> list[Manifest | Outcome]:
        """The manifests of `oids` (all routed to `node`) in one pipelined
        round trip: a `Manifest`, or `MISS`, `BAD_MANIFEST`, `FAILED`,
        `TIMEOUT`, `SKIPPED` per id."""
        if node.down:
            return [Outcome.SKIPPED] * len(oids)
        if time.monotonic() >= deadline:  # started too late: not the node's fault
            return [Outcome.TIMEOUT] * len(oids)
        conn: Connection | None = None
        try:
            conn = self.acquire(node, deadline)
            out: list[Buffer] = []
            for oid in oids:
                out += _command("GET", self.keys.manifest(oid))
            conn.send(out, deadline)
            replies = [conn.read_reply(deadline) for _ in oids]
        except ConnectionFailed as e:
            self.failed(node, conn, e)
            return [Outcome.TIMEOUT if e.timeout else Outcome.FAILED] * len(oids)
        self.release(node, conn)
        results: list[Manifest | Outcome] = []
        for oid, reply in zip(oids, replies, strict=True):
            m = self._manifest_of(oid, reply)
            # A moved slot: the prober reloads the map for the next call.
            results.append(Outcome.FAILED if m is Outcome.MOVED else m)
        return results

    def _manifest_of(self, oid: ObjectId, reply: object) -> Manifest | Outcome:
        if reply is None:
            return Outcome.MISS
        if isinstance(reply, ErrorReply):
            self._redirected(reply)
            return Outcome.MOVED if reply.kind == "MOVED" else Outcome.FAILED
        if not isinstance(reply, bytes):
            return Outcome.BAD_MANIFEST
        try:
            return decode_manifest(reply, oid)
        except ManifestError:
            return Outcome.BAD_MANIFEST

    def _redirected(self, reply: ErrorReply) -> None:
        if reply.kind in ("MOVED", "ASK"):
            # Slots moved (resharding, failover): the prober reloads the map.
            self.redirects += 1
            self._stale = True
            self._wake.set()

    def get_chunk(self, oid: ObjectId, view: memoryview, deadline: float) -> Outcome:
        """Fill `view` (`oid.nbytes`) with the verified chunk, from a fresh
        manifest. A slot that moved (`MOVED`) reloads the slot map and is
        tried once more."""
        outcome = self._get_once(oid, view, deadline)
        if outcome is Outcome.MOVED and self.refresh(deadline):
            outcome = self._get_once(oid, view, deadline)
        return Outcome.FAILED if outcome is Outcome.MOVED else outcome

    def _get_once(self, oid: ObjectId, view: memoryview, deadline: float) -> Outcome:
        node = self.route(oid)
        if node is None or node.down:
            return Outcome.SKIPPED
        conn: Connection | None = None
        try:
            conn = self.acquire(node, deadline)
            reply = conn.call(["GET", self.keys.manifest(oid)], deadline)
            m = self._manifest_of(oid, reply)
            if not isinstance(m, Manifest):
                self.release(node, conn)
                if m is Outcome.BAD_MANIFEST:
                    self._forget_broken(oid, reply, deadline)
                return m
            outcome = self._read_parts(conn, m, view, deadline)
            self.release(node, conn)
        except ConnectionFailed as e:
            self.failed(node, conn, e)
            return Outcome.TIMEOUT if e.timeout else Outcome.FAILED
        if outcome is Outcome.BROKEN:
            self._forget_broken(oid, reply, deadline)
        return outcome

    def read_chunk(
        self,
        node: Node,
        oid: ObjectId,
        view: memoryview,
        manifest: Manifest | None,
        deadline: float,
    ) -> Outcome:
        """Fill `view` with the verified chunk `oid` of `node`: its parts
        asked at once on one connection, each part's CRC32C taken as it
        arrives.

        A manifest given (read by `read_manifests` moments ago) saves a
        round trip; if its parts no longer verify (the chunk was rewritten
        or removed since), the chunk is read again from a fresh manifest
        (`get_chunk`, as is one given none): a stale manifest costs time,
        never a wrong answer."""
        if node.down:
            return Outcome.SKIPPED
        if time.monotonic() >= deadline:
            return Outcome.TIMEOUT
        if manifest is None:
            return self.get_chunk(oid, view, deadline)
        conn: Connection | None = None
        try:
            conn = self.acquire(node, deadline)
            outcome = self._read_parts(conn, manifest, view, deadline)
            self.release(node, conn)
        except ConnectionFailed as e:
            self.failed(node, conn, e)
            return Outcome.TIMEOUT if e.timeout else Outcome.FAILED
        if outcome is Outcome.BROKEN:
            return self.get_chunk(oid, view, deadline)
        return outcome

    def _read_parts(
        self, conn: Connection, m: Manifest, view: memoryview, deadline: float
    ) -> Outcome:
        """Ask for `m`'s parts (one pipelined send) and read them into
        `view`: HIT when every part is there, of its length and checksum,
        else BROKEN (every reply is read all the same: the connection stays
        in step)."""
        out: list[Buffer] = []
        for key in self.keys.parts(m):
            out += _command("GET", key)
        conn.send(out, deadline)
        ok = True
        for p in range(m.parts):
            start, length = m.part_range(p)
            # The checksum is taken as the bytes arrive (still in cache).
            got, crc = conn.read_bulk_crc32c(view[start : start + length], deadline)
            if got != length or crc != m.crcs[p]:
                ok = False
                if isinstance(got, ErrorReply):
                    self._redirected(got)
        return Outcome.HIT if ok else Outcome.BROKEN

    def _forget_broken(self, oid: ObjectId, manifest: object, deadline: float) -> None:
        """Delete a manifest whose parts are gone or damaged, if it is still
        the same one (WATCH/MULTI), so that the next put rewrites the chunk.
        Best effort: a failure leaves it to TTL or eviction."""
        node = self.route(oid)
        if node is None or node.down or not isinstance(manifest, bytes):
            return
        key = self.keys.manifest(oid)
        conn: Connection | None = None
        try:
            conn = self.acquire(node, deadline)
            conn.call(["WATCH", key], deadline)
            if conn.call(["GET", key], deadline) != manifest:
                conn.call(["UNWATCH"], deadline)
            else:
                conn.send(
                    _command("MULTI") + _command("DEL", key) + _command("EXEC"),
                    deadline,
                )
                for _ in range(3):
                    conn.read_reply(deadline)
            self.release(node, conn)
        except ConnectionFailed as e:
            self.failed(node, conn, e)

    def put_chunk(
        self, oid: ObjectId, view: memoryview, deadline: float, part_size: int,
        ttl_ms: int | None,
    ) -> Outcome:  # fmt: skip
        """Store `view` as `oid` unless a valid manifest is already there:
        parts under a fresh write id first, then the manifest if still
        absent (`SET NX`). A reader sees the whole chunk or nothing. A slot
        that moved reloads the slot map and is tried once more."""
        outcome = self._put_once(oid, view, deadline, part_size, ttl_ms)
        if outcome is Outcome.MOVED and self.refresh(deadline):
            outcome = self._put_once(oid, view, deadline, part_size, ttl_ms)
        return Outcome.FAILED if outcome is Outcome.MOVED else outcome

    def _put_once(
        self, oid: ObjectId, view: memoryview, deadline: float, part_size: int,
        ttl_ms: int | None,
    ) -> Outcome:  # fmt: skip
        node = self.route(oid)
        if node is None or node.down:
            return Outcome.SKIPPED
        mkey = self.keys.manifest(oid)
        conn: Connection | None = None
        try:
            conn = self.acquire(node, deadline)
            existing = self._manifest_of(oid, conn.call(["GET", mkey], deadline))
            if isinstance(existing, Manifest):
                self.release(node, conn)
                return Outcome.HELD
            if existing in (Outcome.FAILED, Outcome.MOVED):
                self.release(node, conn)
                return existing
            if existing is Outcome.BAD_MANIFEST:
                conn.call(["DEL", mkey], deadline)
            write_id = os.urandom(WRITE_ID_BYTES)
            parts = part_count(oid.nbytes, part_size)
            crcs = []
            out: list[Buffer] = []
            part_ttl: list[Buffer | str | int] = []
            if ttl_ms is not None:
                part_ttl = ["PX", ttl_ms + PART_GRACE_MS]
            for i in range(parts):
                start = i * part_size
                piece = view[start : start + part_size]
                crcs.append(crc32c(piece))
                out += _command(
                    "SET", self.keys.part(oid, write_id, i), piece, *part_ttl
                )
            conn.send(out, deadline)
            replies = [conn.read_reply(deadline) for _ in range(parts)]
            manifest = Manifest(oid, part_size, write_id, tuple(crcs))
            part_keys = self.keys.parts(manifest)
            if any(r != "OK" for r in replies):
                bad = next(r for r in replies if r != "OK")
                if isinstance(bad, ErrorReply):
                    self._redirected(bad)
                self._drop_parts(conn, part_keys, deadline)
                self.release(node, conn)
                log.debug("valkey put of %s failed: %s", oid.name(), bad)
                return Outcome.FAILED
            args: list[Buffer | str | int] = [
                "SET",
                mkey,
                encode_manifest(manifest),
                "NX",
            ]
            if ttl_ms is not None:
                args += ["PX", ttl_ms]
            reply = conn.call(args, deadline)
            if reply == "OK":
                self.release(node, conn)
                return Outcome.WRITTEN
            self._drop_parts(conn, part_keys, deadline)
            self.release(node, conn)
            if reply is None:  # another writer's manifest landed first
                return Outcome.HELD
            if isinstance(reply, ErrorReply):
                self._redirected(reply)
            return Outcome.FAILED
        except ConnectionFailed as e:
            self.failed(node, conn, e)
            return Outcome.TIMEOUT if e.timeout else Outcome.FAILED

    def _drop_parts(self, conn: Connection, keys: list[bytes], deadline: float) -> None:
        # Expire rather than delete: a racing reader may be reading them.
        out: list[Buffer] = []
        for key in keys:
            out += _command("PEXPIRE", key, PART_GRACE_MS)
        conn.send(out, deadline)
        for _ in keys:
            conn.read_reply(deadline)

    def delete_chunks(
        self, node: Node, oids: Sequence[ObjectId], deadline: float
    ) -> bool:
        """Remove the manifests (and their parts) of `oids`, all on `node`."""
        manifests = self.read_manifests(node, oids, deadline)
        if node.down:
            return False
        keys: list[list[bytes]] = []
        for oid, m in zip(oids, manifests, strict=True):
            if isinstance(m, Manifest):
                keys.append([self.keys.manifest(oid), *self.keys.parts(m)])
            elif m is Outcome.BAD_MANIFEST:
                keys.append([self.keys.manifest(oid)])
        if not keys:
            return True
        conn: Connection | None = None
        try:
            conn = self.acquire(node, deadline)
            out: list[Buffer] = []
            for group in keys:
                out += _command("UNLINK", *group)
            conn.send(out, deadline)
            replies = [conn.read_reply(deadline) for _ in keys]
            self.release(node, conn)
        except ConnectionFailed as e:
            self.failed(node, conn, e)
            return False
        return not any(isinstance(r, ErrorReply) for r in replies)


def _command(*args: Buffer | str | int) -> list[Buffer]:
    from lmcd_backends.remote.resp import encode_command

    return encode_command(args)
