"""A small synchronous client of lmcd's protocol (for `inspect` and `bench`).

vLLM talks to lmcd through lmcache's own client; this one exists so that
lmcd's tools need neither lmcache nor a GPU. It speaks the same frames:
`[uid, type, payload...]` out, `[uid, type, value?]` back.
"""

from __future__ import annotations

import errno
import itertools
import socket
import time
from typing import Any

import msgspec
import zmq

from lmcd.errors import LmcdError
from lmcd.wire.lmcache03 import RequestType

# While waiting longer than this for a reply, check this often that the
# daemon still listens.
LIVENESS_S = 1.0


class Unreachable(LmcdError):
    """No answer from the daemon within the timeout."""


class Client:
    """A DEALER socket with blocking calls and a per-call timeout."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5555) -> None:
        self.host, self.port = host, port
        self.url = f"tcp://{host}:{port}"
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.url)
        self._uids = itertools.count()
        self._encoder = msgspec.msgpack.Encoder()

    def check_listening(self, timeout: float = 2.0) -> None:
        """Raise `Unreachable` at once when nothing listens at the address
        (a ZeroMQ socket would retry silently until the call's timeout)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                pass
        except ConnectionRefusedError:
            raise Unreachable(
                f"connection refused at {self.url}: is lmcd serving there?"
            ) from None
        except TimeoutError:
            raise Unreachable(
                f"no answer from {self.url} within {timeout:g} s"
            ) from None
        except OSError as e:
            reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
            raise Unreachable(f"cannot reach {self.url}: {reason}") from None

    def send(self, rtype: RequestType, *payloads: Any) -> int:
        """Send a request without waiting; returns its uid."""
        uid = next(self._uids)
        self._sock.send_multipart(
            [self._encoder.encode(uid), self._encoder.encode(int(rtype))]
            + [self._encoder.encode(p) for p in payloads]
        )
        return uid

    def receive(self, timeout: float) -> tuple[int, Any]:
        """The next reply as `(uid, value)`; raises `Unreachable` on timeout,
        or within about `LIVENESS_S` seconds once nothing listens at the
        address any more (a daemon that died while a long request ran)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self._sock.poll(int(max(0.0, min(left, LIVENESS_S)) * 1000)):
                break
            if left <= LIVENESS_S:
                raise Unreachable(
                    f"no answer from lmcd at {self.url} within {timeout:g} s"
                )
            try:
                self.check_listening(LIVENESS_S)
            except Unreachable as e:
                raise Unreachable(f"lmcd stopped answering: {e}") from None
        frames = self._sock.recv_multipart()
        uid = msgspec.msgpack.decode(frames[0])
        value = msgspec.msgpack.decode(frames[2]) if len(frames) > 2 else None
        return uid, value

    def call(self, rtype: RequestType, *payloads: Any, timeout: float = 10.0) -> Any:
        """Send one request and wait for its reply."""
        uid = self.send(rtype, *payloads)
        while True:
            got, value = self.receive(timeout)
            if got == uid:
                return value

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        value = self.call(RequestType.STATS, timeout=timeout)
        if not isinstance(value, dict):
            raise LmcdError(f"{self.url} answered STATS with {type(value).__name__}")
        return value

    def drop(self, model: str | None = None, timeout: float = 10.0) -> int:
        """DROP (lmcd's extension): drop every chunk not in use, or only
        `model`'s; returns how many were dropped."""
        value = self.call(RequestType.DROP, model, timeout=timeout)
        if not isinstance(value, int) or value < 0:
            raise LmcdError(f"{self.url} refused DROP")
        return value

    def reset_stats(self, timeout: float = 10.0) -> None:
        """RESET_STATS (lmcd's extension): zero the daemon's counters."""
        if self.call(RequestType.RESET_STATS, timeout=timeout) is not True:
            raise LmcdError(f"{self.url} refused RESET_STATS")

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
