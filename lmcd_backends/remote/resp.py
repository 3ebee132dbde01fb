"""A blocking RESP2 connection with an absolute deadline per operation.

Just what the Valkey tier needs, measured faster per byte than the client
libraries under Trio (docs/valkey.md): commands are scatter-sent straight
from the caller's memory, and a bulk reply of known length is received
straight into the caller's buffer (`read_bulk_crc32c`), so a chunk crosses
user space once, checksummed on the way. Used from worker threads only;
one connection serves one thread at a time. No trio, no torch.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Sequence

import attrs
from crc32c import crc32c as _crc32c

Buffer = bytes | bytearray | memoryview

# Replies of up to this size are buffered; larger bulk payloads are
# received into the caller's memory directly.
_READ_CHUNK = 64 * 1024
# Small pieces of a command are joined before sending; larger ones are
# sent from where they lie.
_JOIN_BELOW = 16 * 1024
# A large bulk payload is received in pieces of at least this much (the
# socket's low-water mark, SO_RCVLOWAT, on plain TCP): on loopback a
# receive otherwise returns about 128 KiB (34 per 4 MiB chunk, 4 with the
# mark), each with its poll, its Python and its wake-up.
_RECEIVE_AT_LEAST = 1 << 20
_SO_RCVLOWAT: int | None = getattr(socket, "SO_RCVLOWAT", None)


class ConnectionFailed(Exception):
    """The connection broke, timed out or spoke garbage; it is unusable."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@attrs.frozen
class ErrorReply:
    """An error reply (`-ERR ...`, `-MOVED ...`): a result, not an exception,
    so that one failed command of a pipeline does not hide the others."""

    message: str

    @property
    def kind(self) -> str:
        """The first word (`MOVED`, `ASK`, `CLUSTERDOWN`, `OOM`, `ERR`...)."""
        return self.message.split(" ", 1)[0]


@attrs.frozen
class WrongSize:
    """A bulk reply of another length than expected (its bytes skipped)."""

    nbytes: int


Reply = None | int | str | bytes | ErrorReply | list["Reply"]

# A generic reply bigger than this is a protocol violation for our use (the
# large values are read with `read_bulk_crc32c`).
MAX_REPLY_BYTES = 16 << 20
MAX_REPLY_ITEMS = 1 << 20


def encode_command(args: Sequence[Buffer | str | int]) -> list[Buffer]:
    """The RESP array for `args` as a list of buffers: small pieces joined,
    large arguments (payloads) passed through without a copy."""
    out: list[Buffer] = []
    head = bytearray(b"*%d\r\n" % len(args))
    for arg in args:
        data: Buffer
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = str(arg).encode()
        else:
            data = arg
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        head += b"$%d\r\n" % n
        if n < _JOIN_BELOW:
            head += data
            head += b"\r\n"
        else:
            out.append(bytes(head))
            out.append(data)
            head = bytearray(b"\r\n")
    out.append(bytes(head))
    return out


@attrs.define(eq=False)
class Connection:
    """One blocking connection to `host:port` (TLS when `tls` is a context).

    Every method that does I/O takes `deadline`, a `time.monotonic()` value:
    it raises `ConnectionFailed(timeout=True)` once the deadline passes, and
    `ConnectionFailed` for a broken connection or a protocol violation. After
    either the connection must be closed.
    """

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_name: str | None = None
    _sock: socket.socket | None = attrs.field(default=None, init=False)
    _buf: bytearray = attrs.field(factory=lambda: bytearray(_READ_CHUNK), init=False)
    _view: memoryview = attrs.field(init=False)
    _start: int = attrs.field(default=0, init=False)
    _end: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._view = memoryview(self._buf)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, deadline: float) -> None:
        remaining = _remaining(deadline)
        try:
            sock = socket.create_connection((self.host, self.port), timeout=remaining)
        except TimeoutError as e:
            raise ConnectionFailed(f"connect timed out: {e}", timeout=True) from e
        except OSError as e:
            raise ConnectionFailed(f"connect failed: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock.settimeout(_remaining(deadline))
                sock = self.tls.wrap_socket(
                    sock, server_hostname=self.server_name or self.host
                )
        except TimeoutError as e:
            sock.close()
            raise ConnectionFailed(f"TLS handshake timed out: {e}", timeout=True) from e
        except (OSError, ssl.SSLError, ConnectionFailed) as e:
            sock.close()
            if isinstance(e, ConnectionFailed):
                raise
            raise ConnectionFailed(f"TLS handshake failed: {e}") from e
        self._sock = sock
        self._start = self._end = 0

    def stale(self) -> bool:
        """Whether an idle connection is unusable: closed by the server, or
        holding bytes nobody asked for (checked without blocking)."""
        if self._sock is None or self._start != self._end:
            return True
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- sending ----------------------------------------------------------------

    def send(self, buffers: Sequence[Buffer], deadline: float) -> None:
        """Send `buffers` in order (scatter I/O on plain TCP)."""
        sock = self._require()
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        try:
            if isinstance(sock, ssl.SSLSocket):
                for v in views:
                    sent = 0
                    while sent < len(v):
                        sock.settimeout(_remaining(deadline))
                        sent += sock.send(v[sent:])
                return
            while views:
                sock.settimeout(_remaining(deadline))
                n = sock.sendmsg(views[:512])
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
        except TimeoutError as e:
            raise ConnectionFailed("send timed out", timeout=True) from e
        except OSError as e:
            raise ConnectionFailed(f"send failed: {e}") from e

    def call(self, args: Sequence[Buffer | str | int], deadline: float) -> Reply:
        """Send one command and read its reply."""
        self.send(encode_command(args), deadline)
        return self.read_reply(deadline)

    # -- receiving ----------------------------------------------------------------

    def read_reply(self, deadline: float) -> Reply:
        """Read one reply of any type (bulk strings are copied into `bytes`)."""
        line = self._read_line(deadline)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return ErrorReply(rest.decode("utf-8", "replace"))
        if kind == b":":
            return self._int(rest)
        if kind == b"$":
            n = self._int(rest)
            if n < 0:
                return None
            if n > MAX_REPLY_BYTES:
                raise ConnectionFailed(f"reply of {n} bytes is too large")
            out = bytearray(n)
            self._read_exact(memoryview(out), deadline)
            self._expect_crlf(deadline)
            return bytes(out)
        if kind == b"*":
            n = self._int(rest)
            if n < 0:
                return None
            if n > MAX_REPLY_ITEMS:
                raise ConnectionFailed(f"reply of {n} items is too large")
            return [self.read_reply(deadline) for _ in range(n)]
        raise ConnectionFailed(f"unexpected reply type {line[:20]!r}")

    def read_bulk_crc32c(
        self, view: memoryview, deadline: float
    ) -> tuple[int | ErrorReply | WrongSize | None, int]:
        """Read a bulk reply expected to be `len(view)` bytes into `view`,
        and the CRC32C of those bytes, taken piece by piece as they arrive
        (still in the CPU's cache: no second pass over the buffer).

        Returns (`len(view)`, its CRC32C) when it filled `view`, else what
        came instead and 0: None for a missing key, an `ErrorReply`, or
        `WrongSize` for a bulk of another length (its bytes are skipped;
        the connection stays usable)."""
        line = self._read_line(deadline)
        kind = line[:1]
        if kind != b"$":
            if kind == b"-":
                return ErrorReply(line[1:].decode("utf-8", "replace")), 0
            raise ConnectionFailed(f"unexpected reply type {line[:20]!r}")
        n = self._int(line[1:])
        if n < 0:
            return None, 0
        if n != len(view):
            self._skip(n + 2, deadline)
            return WrongSize(n), 0
        crc = self._read_exact(view, deadline, checksum=True)
        self._expect_crlf(deadline)
        return n, crc

    # -- internals ----------------------------------------------------------------

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionFailed("not connected")
        return self._sock

    @staticmethod
    def _int(raw: bytes) -> int:
        try:
            return int(raw)
        except ValueError:
            raise ConnectionFailed(f"bad integer {raw[:20]!r}") from None

    def _fill(self, deadline: float) -> None:
        """Receive more into the read buffer (compacting it first)."""
        sock = self._require()
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:
                raise ConnectionFailed("reply line too long")
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        try:
            sock.settimeout(_remaining(deadline))
            n = sock.recv_into(self._view[self._end :])
        except TimeoutError as e:
            raise ConnectionFailed("receive timed out", timeout=True) from e
        except OSError as e:
            raise ConnectionFailed(f"receive failed: {e}") from e
        if n == 0:
            raise ConnectionFailed("connection closed by the server")
        self._end += n

    def _read_line(self, deadline: float) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._start, self._end)
            if i >= 0:
                line = bytes(self._buf[self._start : i])
                self._start = i + 2
                return line
            self._fill(deadline)

    def _read_exact(
        self, view: memoryview, deadline: float, checksum: bool = False
    ) -> int:
        """Fill `view`; returns the CRC32C of its bytes with `checksum`
        (else 0)."""
        crc = 0
        got = min(len(view), self._end - self._start)
        if got:
            view[:got] = self._view[self._start : self._start + got]
            self._start += got
            if checksum:
                crc = _crc32c(view[:got], crc)
        if got == len(view):
            return crc
        sock = self._require()
        # Wake for no less than a large piece (TLS: the mark would count
        # encrypted bytes, so not there).
        lowat = 1
        mark = None if isinstance(sock, ssl.SSLSocket) else _SO_RCVLOWAT
        try:
            while got < len(view):
                want = min(len(view) - got, _RECEIVE_AT_LEAST)
                if mark is not None and want != lowat:
                    sock.setsockopt(socket.SOL_SOCKET, mark, want)
                    lowat = want
                sock.settimeout(_remaining(deadline))
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionFailed("connection closed by the server")
                if checksum:
                    crc = _crc32c(view[got : got + n], crc)
                got += n
            if mark is not None and lowat != 1:
                sock.setsockopt(socket.SOL_SOCKET, mark, 1)
        except TimeoutError as e:
            raise ConnectionFailed("receive timed out", timeout=True) from e
        except OSError as e:
            raise ConnectionFailed(f"receive failed: {e}") from e
        return crc

    def _expect_crlf(self, deadline: float) -> None:
        while self._end - self._start < 2:
            self._fill(deadline)
        if self._buf[self._start : self._start + 2] != b"\r\n":
            raise ConnectionFailed("bulk reply not terminated by CRLF")
        self._start += 2

    def _skip(self, n: int, deadline: float) -> None:
        while n:
            if self._start == self._end:
                self._fill(deadline)
            step = min(n, self._end - self._start)
            self._start += step
            n -= step


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ConnectionFailed("deadline passed", timeout=True)
    return left
