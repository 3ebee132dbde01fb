"""The pinned-CPU tier: `--cpu-buffer-size` GB of host memory, grown lazily.

Memory comes in segments of `segment_bytes` (1 GiB by default), allocated
the first time the arena places an extent in them: pinned (page-locked, so
the GPU copy engine can DMA into it) when CUDA is present, plain otherwise.
Pinning is expensive, so it happens once per segment, never per chunk.
Plain segments are anonymous maps advised to use huge pages; their pages are
faulted in by the first copies into them (in worker threads), not here, so
that opening a segment never blocks the Trio thread.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from typing import Any

import attrs

from lmcd_backends.arena import Arena, arena_statistics
from lmcd_backends.protocol import Extent, TierStatistics

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 1 << 30


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@attrs.define(slots=True)
class PinnedCpuTier:
    """Host-memory tier; implements `lmcd_backends.protocol.StorageTier`.

    `pin` None means "pin when CUDA is available".
    """

    capacity_bytes: int
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    pin: bool | None = None
    _arena: Arena = attrs.field(init=False)
    _memory: list[Any] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self._arena = Arena(self.capacity_bytes, self.segment_bytes)
        if self.pin is None:
            self.pin = _cuda_available()

    @property
    def capacity(self) -> int:
        return self._arena.capacity

    @property
    def pinned(self) -> bool:
        return bool(self.pin)

    def fits(self, nbytes: int) -> bool:
        return self._arena.fits(nbytes)

    def preallocate(self) -> None:
        """Allocate (and pin) the whole capacity now instead of as it fills
        (`--disable-lazy-alloc`). Raises `MemoryError` if it cannot."""
        self._arena.open_all()
        while len(self._memory) < self._arena.opened_segments:
            self._open_segment(len(self._memory))

    def allocate(self, nbytes: int) -> Extent | None:
        extent = self._arena.allocate(nbytes)
        if extent is not None and extent.segment == len(self._memory):
            try:
                self._open_segment(extent.segment)
            except BaseException:
                self._arena.release(extent)
                raise
        return extent

    def _open_segment(self, index: int) -> None:
        import torch

        size = self._arena.segment_size(index)
        try:
            if self.pin:
                memory = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            else:
                memory = _anonymous(size)
        except (RuntimeError, OSError) as e:
            raise MemoryError(f"cannot allocate a {size}-byte segment: {e}") from e
        self._memory.append(memory)
        log.info(
            "Allocated %s segment %d: %.2f GiB",
            "pinned" if self.pin else "host",
            index,
            size / (1 << 30),
        )

    def free(self, extent: Extent) -> None:
        self._arena.release(extent)

    def buffer(self, extent: Extent) -> Any:
        return self._memory[extent.segment][extent.offset : extent.offset + extent.size]

    def statistics(self) -> TierStatistics:
        return arena_statistics(self._arena)


def _anonymous(size: int) -> Any:
    """`size` bytes of anonymous memory, huge-page advised, not yet touched."""
    import torch

    region = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Advisory: without transparent huge pages this is a no-op.
        with contextlib.suppress(OSError):
            region.madvise(mmap.MADV_HUGEPAGE)
    # The tensor keeps `region` alive through the buffer protocol.
    return torch.frombuffer(region, dtype=torch.uint8)
