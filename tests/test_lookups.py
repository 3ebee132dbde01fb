"""Sessions (token hashing per request) and lookup jobs."""

from __future__ import annotations

import pytest

from lmcd.errors import ProtocolError
from lmcd.lookups import LookupJobs, Sessions
from lmcd.tokens import TokenHasher
from lmcd.wire.types import TokenKey, TokenSpan


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingHasher(TokenHasher):
    calls: int = 0

    def extend(self, prefix: bytes | None, tokens: object) -> list[bytes]:
        hashes = super().extend(prefix, tokens)  # type: ignore[arg-type]
        type(self).calls += len(hashes)
        return hashes


def span(
    tokens: list[int], start: int = 0, end: int | None = None, **kw: object
) -> TokenSpan:
    fields: dict[str, object] = {
        "model_name": "m",
        "world_size": 2,
        "worker_id": 1,
        "token_ids": tuple(tokens),
        "start": start,
        "end": len(tokens) if end is None else end,
        "request_id": "r",
    }
    fields.update(kw)
    return TokenSpan(**fields)  # type: ignore[arg-type]


def test_reference_vector() -> None:
    # LMCACHE-DIALECTS.md §3.4: chunk 16, tokens 100..139.
    hashes = TokenHasher(16).chunk_hashes(list(range(100, 140)))
    assert [h.hex()[:8] for h in hashes] == ["c5977d24", "39b59311"]


def test_session_hashes_each_chunk_once() -> None:
    CountingHasher.calls = 0
    sessions = Sessions(CountingHasher(4), Clock())
    tokens = list(range(10))
    first = sessions.chunk_hashes(span(tokens))
    assert len(first) == 2  # the partial chunk is not hashed
    assert CountingHasher.calls == 2
    longer = sessions.chunk_hashes(span([*tokens, 10, 11, 12, 13]))
    assert longer[:2] == first
    assert CountingHasher.calls == 3
    assert longer == TokenHasher(4).chunk_hashes([*tokens, 10, 11, 12, 13])


def test_a_changed_prompt_under_the_same_id_is_hashed_again() -> None:
    sessions = Sessions(TokenHasher(4), Clock())
    sessions.chunk_hashes(span(list(range(8))))
    other = [9, *range(1, 8)]
    assert sessions.chunk_hashes(span(other)) == TokenHasher(4).chunk_hashes(other)


def test_keys_cover_start_to_end_with_rank_and_salt() -> None:
    sessions = Sessions(TokenHasher(4), Clock())
    tokens = list(range(16))
    keys = sessions.keys(span(tokens, start=4, end=12, salt="s"))
    hashes = TokenHasher(4).chunk_hashes(tokens)
    assert keys == [TokenKey("m", 2, 1, h, "s") for h in hashes[1:3]]


def test_sessions_expire_and_end() -> None:
    clock = Clock()
    sessions = Sessions(TokenHasher(4), clock, ttl=10)
    sessions.chunk_hashes(span(list(range(8)), request_id="a"))
    clock.now = 5
    sessions.get("b")
    clock.now = 12
    sessions.expire()
    assert len(sessions) == 1
    assert sessions.end("b") is not None
    assert sessions.end("b") is None
    assert sessions.statistics().cached_tokens == 0


def test_sessions_are_bounded_by_tokens() -> None:
    sessions = Sessions(TokenHasher(4), Clock(), max_tokens=16)
    for i in range(5):
        sessions.chunk_hashes(span(list(range(8)), request_id=str(i)))
    assert sessions.statistics().cached_tokens <= 16
    assert len(sessions) == 2


def test_token_ids_out_of_range_are_a_protocol_error() -> None:
    sessions = Sessions(TokenHasher(4), Clock())
    with pytest.raises(ProtocolError):
        sessions.chunk_hashes(span([1, 2, 3, 2**32]))
    assert sessions.statistics().cached_tokens == 0


def test_lookup_results_are_collected_exactly_once() -> None:
    jobs = LookupJobs(Clock())
    job = jobs.start("r")
    assert jobs.collect("r") is None  # still running
    job.hits = 3
    assert jobs.collect("r") == 3
    assert jobs.collect("r") == 0
    assert jobs.collect("unknown") == 0
    assert jobs.statistics().unknown_queries == 2


def test_uncollected_jobs_expire() -> None:
    clock = Clock()
    jobs = LookupJobs(clock, ttl=5)
    jobs.start("a").hits = 1
    clock.now = 6
    jobs.start("b")
    assert jobs.get("a") is None
    assert jobs.statistics().dropped == 1
