"""Test doubles: a tier with bookkeeping but no memory, a settable clock, and a
dialect whose requests a test hands over."""

from __future__ import annotations

import attrs

from lmcd.wire.dialect import Message
from lmcd.wire.types import Request
from lmcd_backends.arena import Arena, arena_statistics
from lmcd_backends.protocol import Extent, TierStatistics


@attrs.define
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@attrs.define
class ArenaTier:
    """A `StorageTier` over an `Arena` with no memory behind it."""

    capacity_bytes: int
    segment_bytes: int
    arena: Arena = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.arena = Arena(self.capacity_bytes, self.segment_bytes)

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    def fits(self, nbytes: int) -> bool:
        return self.arena.fits(nbytes)

    def too_large(self, nbytes: int) -> str | None:
        if self.arena.fits(nbytes):
            return None
        return f"a {nbytes}-byte chunk is larger than a segment"

    def allocate(self, nbytes: int) -> Extent | None:
        return self.arena.allocate(nbytes)

    def free(self, extent: Extent) -> None:
        self.arena.release(extent)

    def buffer(self, extent: Extent) -> object:
        raise NotImplementedError("ArenaTier has no memory")

    def statistics(self) -> TierStatistics:
        return arena_statistics(self.arena)


@attrs.define
class ScriptedDialect:
    """A dialect whose requests the test hands over by uid (`requests`):
    a result is recorded in `results` and answered `[uid, b"ok"]`; a
    failure is answered `[uid, b"failed"]` and records nothing."""

    name: str = "scripted"
    requests: dict[bytes, Request] = attrs.field(factory=dict)
    results: dict[bytes, object] = attrs.field(factory=dict)

    def plausible(self, message: Message) -> bool:
        return True

    def decode(self, message: Message) -> Request:
        return self.requests[message.uid]

    def encode(self, message: Message, request: Request, result: object) -> list[bytes]:
        self.results[message.uid] = result
        return [message.uid, b"ok"]

    def failure(self, message: Message, request: Request | None) -> list[bytes] | None:
        return [message.uid, b"failed"]
