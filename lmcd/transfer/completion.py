"""Completions: what an issued copy hands the scheduler to await.

Every copy path (host threads, CUDA streams, a test's fake) returns a
`Completion` once its copy is issued. The scheduler then runs one code path
for all of them: await `wait()`, commit (STORE) or unpin (RETRIEVE) when it
returns, abort or unpin without releasing locks when it raises or is
cancelled, and only then count the copy as ended, which is what UNREGISTER
waits for.

`detached` says who waits for the copy before using the data: False (host)
means the reply goes out only after `wait()`; True (CUDA) means the reply
carries an event the client waits on itself, so the reply goes out at once
and the scheduler settles the copy in the background.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
import trio

from lmcd.errors import TransferError

# How often an unfinished CUDA event is polled (seconds, doubling to the max).
POLL_MIN = 0.0002
POLL_MAX = 0.005


class Completion(Protocol):
    """An issued copy."""

    @property
    def reply_handle(self) -> bytes | None:
        """The IPC handle of an event the client waits on before it uses
        the data, or None when no device work is pending (the host path:
        each dialect decides what its clients get then)."""
        ...

    @property
    def detached(self) -> bool:
        """Whether the reply may go out before `wait()` returns."""
        ...

    async def wait(self) -> None:
        """Return once the copy has finished; raise `TransferError` if it
        failed. Cancellation leaves the copy's outcome unknown (the
        scheduler then treats it as failed)."""
        ...

    def release(self) -> None:
        """Drop what was kept alive for the copy (called once, at the end)."""
        ...


@attrs.frozen
class Finished:
    """A copy that had finished when it was issued (the host path: the
    worker thread's result); no device event to hand out."""

    reply_handle: bytes | None = None
    detached: bool = False

    async def wait(self) -> None:
        await trio.lowlevel.checkpoint()

    def release(self) -> None:
        pass


class PolledEvent(Protocol):
    """What `EventCompletion` needs of an event (`torch.cuda.Event`)."""

    def query(self) -> bool: ...


@attrs.define(slots=True, eq=False)
class EventCompletion:
    """A copy that finishes when `event` completes (the CUDA path). `wait`
    polls the event without blocking Trio; `keep` holds the tensors the
    copy uses until it has finished."""

    event: PolledEvent
    reply_handle: bytes
    keep: list[Any] = attrs.field(factory=list)
    detached: bool = True

    async def wait(self) -> None:
        delay = POLL_MIN
        while True:
            try:
                done = self.event.query()
            except Exception as e:  # a CUDA error, reported by the event
                raise TransferError(f"copy failed on the device: {e}") from e
            if done:
                return
            await trio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    def release(self) -> None:
        self.keep.clear()
