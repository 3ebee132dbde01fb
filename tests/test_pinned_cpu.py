"""The pinned-CPU tier's memory: committed before use, prepared ahead in
worker threads, refusals logged and retried, never reported as obtained."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio

from lmcd_backends import pinned_cpu
from lmcd_backends.pinned_cpu import (
    PREPARE_NICENESS,
    PinnedCpuTier,
    SegmentPreparer,
    available_memory,
    in_background_thread,
    preallocate,
)

MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("how", ["populate", "write", "old kernel"])
def test_prepare_commits_every_page(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "old kernel":  # before 5.14: pages are written instead
        monkeypatch.setattr(pinned_cpu, "_MADV_POPULATE_WRITE", 0x7FFF)
    tier = PinnedCpuTier(64 * MiB, segment_bytes=64 * MiB, pin=False)
    tier.prepare(MiB)  # imports torch, which would count in the RSS otherwise
    before = rss()
    memory = tier.prepare(64 * MiB, populate=how != "write")
    assert memory.numel() == 64 * MiB
    assert rss() - before >= 60 * MiB
    del memory


def test_allocate_ahead_never_prepares_on_the_calling_thread() -> None:
    tier = PinnedCpuTier(4 * MiB, segment_bytes=MiB, pin=False, grow_inline=False)
    asked: list[int] = []
    tier.on_demand = lambda: asked.append(1)
    assert tier.allocate(MiB) is None
    assert (tier.prepared_bytes, tier.outruns, len(asked)) == (0, 1, 1)
    assert tier.statistics().materialized_bytes == 0


async def eventually(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll `condition` (worker threads are involved: wall-clock bound)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await trio.sleep(0.005)


async def test_preparer_keeps_the_lead_ahead_of_the_fill() -> None:
    tier = PinnedCpuTier(
        8 * MiB, segment_bytes=MiB, pin=False, grow_inline=False, lead_bytes=2 * MiB
    )
    preparer = SegmentPreparer(tier, workers=2)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(preparer.run)
            assert tier.prepared_bytes >= MiB  # started: the first segment is ready
            await eventually(lambda: tier.prepared_bytes == 2 * MiB)
            for _ in range(10):
                await trio.sleep(0.01)
            assert (tier.prepared_bytes, tier.preparing_bytes) == (2 * MiB, 0)
            extents = [tier.allocate(MiB // 2) for _ in range(3)]
            assert all(e is not None for e in extents)
            # 1.5 MiB used: the preparer restores 2 MiB of free, prepared room.
            await eventually(lambda: tier.prepared_bytes == 4 * MiB)
            assert tier.outruns == 0
            nursery.cancel_scope.cancel()
    assert tier.on_demand is None


async def settle(condition: Callable[[], bool]) -> None:
    """Let the tasks run until `condition` holds, without moving a mock
    clock (worker threads are involved: bounded by the wall clock)."""
    deadline = time.monotonic() + 20
    await trio.testing.wait_all_tasks_blocked()
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        # Let the worker thread run; a mock clock's sleeps would never end.
        await trio.to_thread.run_sync(time.sleep, 0.001)
        await trio.testing.wait_all_tasks_blocked()


async def test_a_refused_segment_is_logged_once_and_retried_with_backoff(
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_prepare = PinnedCpuTier.prepare
    attempts: list[float] = []
    token = trio.lowlevel.current_trio_token()

    def prepare(self: PinnedCpuTier, size: int, **kw: Any) -> object:
        attempts.append(trio.from_thread.run_sync(trio.current_time, trio_token=token))
        if len(attempts) <= 2:
            raise MemoryError("cannot allocate a segment: ENOMEM")
        return real_prepare(self, size, **kw)

    monkeypatch.setattr(PinnedCpuTier, "prepare", prepare)
    tier = PinnedCpuTier(
        2 * MiB, segment_bytes=MiB, pin=False, grow_inline=False, lead_bytes=MiB
    )
    preparer = SegmentPreparer(tier, workers=1, retry_min=1.0, retry_max=60.0)
    with caplog.at_level(logging.WARNING, logger="lmcd_backends.pinned_cpu"):
        async with trio.open_nursery() as nursery:
            await nursery.start(preparer.run)  # started despite the refusal
            assert (tier.prepared_bytes, tier.prepare_failures) == (0, 1)
            mock_clock.jump(0.9)
            await settle(lambda: True)
            assert len(attempts) == 1  # not retried at once
            mock_clock.jump(0.1)
            await settle(lambda: tier.prepare_failures == 2)
            assert attempts == [0.0, 1.0]
            mock_clock.jump(1.9)  # the back-off doubled: 2 s
            await settle(lambda: True)
            assert len(attempts) == 2
            mock_clock.jump(0.1)
            await settle(lambda: tier.prepared_bytes == 2 * MiB)
            assert attempts == [0.0, 1.0, 3.0, 3.0]
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if "Cannot grow" in r.message]
    assert len(warnings) == 2  # one line per refusal
    assert all(not r.exc_info for r in warnings)
    assert tier.statistics().materialized_bytes == 2 * MiB


async def test_preallocate_commits_the_whole_capacity() -> None:
    tier = PinnedCpuTier(5 * MiB, segment_bytes=2 * MiB, pin=False)
    with trio.fail_after(30):
        await preallocate(tier, workers=2)
    stats = tier.statistics()
    assert (stats.materialized_bytes, stats.segments) == (5 * MiB, 3)
    e = tier.allocate(MiB)
    assert e is not None
    tier.buffer(e).fill_(1)


async def test_preallocate_fails_as_a_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    real_prepare = PinnedCpuTier.prepare
    calls: list[int] = []

    def prepare(self: PinnedCpuTier, size: int, **kw: Any) -> object:
        calls.append(size)
        if len(calls) == 2:
            raise MemoryError("cannot allocate a segment: ENOMEM")
        return real_prepare(self, size, **kw)

    monkeypatch.setattr(PinnedCpuTier, "prepare", prepare)
    tier = PinnedCpuTier(6 * MiB, segment_bytes=2 * MiB, pin=False)
    with trio.fail_after(30), pytest.raises(MemoryError, match="ENOMEM"):
        await preallocate(tier, workers=1)
    assert tier.preparing_bytes == 0
    assert tier.statistics().materialized_bytes < 6 * MiB


def test_available_memory_is_read() -> None:
    found = available_memory()
    assert found is not None
    nbytes, source = found
    assert nbytes > 0
    assert source in {
        "MemAvailable",
        "cgroup memory.max",
        "cgroup memory.limit_in_bytes",
    }


async def test_segments_are_prepared_at_a_lower_priority() -> None:
    seen: list[tuple[str, int]] = []

    def where() -> None:
        tid = threading.get_native_id()
        seen.append((threading.current_thread().name, os.getpriority(0, tid)))

    await in_background_thread(where)
    name, nice = seen[0]
    assert name == "lmcd-prepare"
    assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + PREPARE_NICENESS)
    with pytest.raises(MemoryError, match="refused"):
        await in_background_thread(_refuse)


def _refuse() -> None:
    raise MemoryError("refused")
