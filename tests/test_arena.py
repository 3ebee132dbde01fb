"""The arena allocator: alignment, best fit, coalescing, lazy segments."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcd_backends.arena import Arena, align_up
from lmcd_backends.protocol import ALIGNMENT

MiB = 1 << 20


def check_invariants(arena: Arena) -> None:
    live = sorted(arena.live(), key=lambda e: (e.segment, e.offset))
    for a, b in itertools.pairwise(live):
        if a.segment == b.segment:
            assert a.offset + a.size <= b.offset, "live extents overlap"
    for e in live:
        assert e.offset % ALIGNMENT == 0
        assert e.offset + e.size <= arena.segment_size(e.segment)
    assert arena.used == sum(e.size for e in live)
    assert arena.used + arena.free == arena.capacity


def test_align_up() -> None:
    assert align_up(1) == ALIGNMENT
    assert align_up(ALIGNMENT) == ALIGNMENT
    assert align_up(ALIGNMENT + 1) == 2 * ALIGNMENT


def test_segments_open_lazily_and_capacity_is_respected() -> None:
    arena = Arena(capacity=10 * MiB, segment_bytes=4 * MiB)
    assert arena.opened_segments == 0
    first = arena.allocate(3 * MiB)
    assert first is not None
    assert arena.opened_segments == 1
    second = arena.allocate(3 * MiB)
    assert second is not None
    assert second.segment == 1
    third = arena.allocate(2 * MiB)  # the last segment is only 2 MiB
    assert third is not None
    assert third.segment == 2
    assert arena.allocate(2 * MiB) is None
    check_invariants(arena)


def test_free_ranges_coalesce() -> None:
    arena = Arena(capacity=4 * MiB, segment_bytes=4 * MiB)
    extents = [arena.allocate(MiB) for _ in range(4)]
    assert all(e is not None for e in extents)
    assert arena.allocate(MiB) is None
    for e in (extents[1], extents[3], extents[2]):
        assert e is not None
        arena.release(e)
    big = arena.allocate(3 * MiB)
    assert big is not None
    assert big.offset == MiB
    check_invariants(arena)


def test_refuses_what_never_fits_and_double_free() -> None:
    arena = Arena(capacity=8 * MiB, segment_bytes=2 * MiB)
    with pytest.raises(ValueError, match="never fit"):
        arena.allocate(3 * MiB)
    with pytest.raises(ValueError, match="never fit"):
        arena.allocate(0)
    e = arena.allocate(MiB)
    assert e is not None
    arena.release(e)
    with pytest.raises(ValueError, match="not a live extent"):
        arena.release(e)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * MiB)), max_size=80))
def test_random_alloc_free_keeps_invariants(ops: list[tuple[bool, int]]) -> None:
    arena = Arena(capacity=16 * MiB, segment_bytes=4 * MiB)
    live = []
    for alloc, size in ops:
        if alloc or not live:
            e = arena.allocate(size)
            if e is not None:
                assert e.size >= size
                live.append(e)
        else:
            arena.release(live.pop(size % len(live)))
        check_invariants(arena)


def test_without_grow_only_opened_segments_are_used() -> None:
    arena = Arena(capacity=10 * MiB, segment_bytes=4 * MiB)
    assert arena.allocate(MiB, grow=False) is None
    assert arena.opened_segments == 0
    assert arena.next_segment_size() == 4 * MiB
    assert arena.open_segment(4 * MiB) == 0
    assert arena.opened_free == 4 * MiB
    e = arena.allocate(3 * MiB, grow=False)
    assert e is not None
    assert arena.allocate(2 * MiB, grow=False) is None  # room only in segment 1
    assert arena.opened_segments == 1
    assert arena.next_segment_size(planned=4 * MiB) == 2 * MiB  # the short last one
    check_invariants(arena)


def test_open_segment_refuses_what_does_not_fit() -> None:
    arena = Arena(capacity=6 * MiB, segment_bytes=4 * MiB)
    with pytest.raises(ValueError, match="cannot open"):
        arena.open_segment(5 * MiB)  # larger than a segment
    with pytest.raises(ValueError, match="cannot open"):
        arena.open_segment(ALIGNMENT + 1)  # not aligned
    arena.open_segment(4 * MiB)
    with pytest.raises(ValueError, match="cannot open"):
        arena.open_segment(4 * MiB)  # past the capacity
    arena.open_segment(2 * MiB)
    assert (arena.unopened_bytes, arena.next_segment_size()) == (0, 0)
    assert arena.opened_bytes == arena.capacity
