"""lmcd's token hasher against lmcache's blake3 chain."""

from __future__ import annotations

import importlib.metadata
import random
import struct

import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcd.tokens import (
    MAX_TOKEN_ID,
    NONE_HASH,
    TokenHasher,
    check_token_ids,
    pack_tokens,
)

# LMCACHE-DIALECTS.md §3.4: chunk 16, tokens 100..139.
REFERENCE_NONE = "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"
REFERENCE = [
    "c5977d249eeb44e22fc51188438fb1c1e3189cd1178766ac6f9fa4f7aca7f23c",
    "39b59311f24c163a729b931f65e436a4520d9be82fb0828f3a8535950b6c0f6f",
]


def _naive(
    chunk_size: int, tokens: list[int], start: int, end: int | None
) -> list[bytes]:
    """lmcache's definition, written out plainly."""
    limit = len(tokens) if end is None else min(len(tokens), end)
    full = limit - limit % chunk_size
    h, out = NONE_HASH, []
    for i in range(0, full, chunk_size):
        chunk = tokens[i : i + chunk_size]
        h = blake3(h + struct.pack(f">{len(chunk)}I", *chunk)).digest()
        if i >= start:
            out.append(h)
    return out


def test_reference_vector() -> None:
    assert NONE_HASH.hex() == REFERENCE_NONE
    assert blake3(bytes(8) + bytes(4)).digest() == NONE_HASH
    hashes = TokenHasher(16).chunk_hashes(list(range(100, 140)))
    assert [h.hex() for h in hashes] == REFERENCE
    assert TokenHasher(16).chunk_hashes(tuple(range(100, 140)), start=16) == [
        bytes.fromhex(REFERENCE[1])
    ]
    hasher = TokenHasher(16)
    first = hasher.chain(None, range(100, 116))
    assert [first.hex(), hasher.chain(first, range(116, 132)).hex()] == REFERENCE
    assert [h.hex() for h in hasher.extend(None, range(100, 140))] == REFERENCE


def test_partial_chunks_and_ranges() -> None:
    hasher = TokenHasher(4)
    tokens = list(range(11))
    assert len(hasher.chunk_hashes(tokens)) == 2  # 3 trailing tokens unnamed
    assert hasher.chunk_hashes(tokens, end=7) == hasher.chunk_hashes(tokens)[:1]
    assert hasher.chunk_hashes(tokens, start=1) == hasher.chunk_hashes(tokens)[1:]
    assert hasher.chunk_hashes(tokens, start=4, end=4) == []
    assert hasher.chunk_hashes([]) == []
    with pytest.raises(ValueError, match="chunk_size"):
        TokenHasher(0)


@pytest.mark.parametrize("bad", [[-1], [MAX_TOKEN_ID + 1], [1, "2"], [1.5]])
def test_bad_token_ids(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        pack_tokens(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids"):
        TokenHasher(1).chunk_hashes(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids"):
        check_token_ids(bad)  # type: ignore[arg-type]
    check_token_ids([0, MAX_TOKEN_ID])


def test_pack_is_big_endian_uint32() -> None:
    assert pack_tokens([1, MAX_TOKEN_ID]) == b"\x00\x00\x00\x01\xff\xff\xff\xff"


_tokens = st.lists(st.integers(0, MAX_TOKEN_ID), max_size=80)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 9),
    _tokens,
    st.integers(-3, 90),
    st.none() | st.integers(-3, 90),
)
def test_chunk_hashes_match_the_definition(
    chunk_size: int, tokens: list[int], start: int, end: int | None
) -> None:
    got = TokenHasher(chunk_size).chunk_hashes(tokens, start, end)
    assert got == _naive(chunk_size, tokens, max(start, 0), end)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), _tokens, st.integers(0, 80))
def test_extend_continues_a_chain_from_a_known_prefix(
    chunk_size: int, tokens: list[int], cut: int
) -> None:
    """What a session does: hash a prefix once, later continue from its
    last hash; the names are those of hashing from scratch."""
    hasher = TokenHasher(chunk_size)
    cut -= cut % chunk_size
    known = hasher.extend(None, tokens[:cut])
    prefix = known[-1] if known else None
    rest = hasher.extend(prefix, tokens[len(known) * chunk_size :])
    assert known + rest == hasher.chunk_hashes(tokens)
    one_by_one: list[bytes] = []
    for i in range(0, len(tokens) - chunk_size + 1, chunk_size):
        one_by_one.append(
            hasher.chain(
                one_by_one[-1] if one_by_one else None, tokens[i : i + chunk_size]
            )
        )
    assert one_by_one == known + rest


def test_same_names_as_lmcache() -> None:
    """Against lmcache's own TokenHasher (only where lmcache 0.5 imports)."""
    try:
        version = importlib.metadata.version("lmcache")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lmcache is not installed")
    if not version.startswith("0.5."):
        pytest.skip(f"lmcache {version} is not a 0.5 release")
    module = pytest.importorskip("lmcache.v1.multiprocess.token_hasher")
    rng = random.Random(5)
    for chunk_size in (1, 16, 256):
        theirs = module.TokenHasher(chunk_size=chunk_size, hash_algorithm="blake3")
        ours = TokenHasher(chunk_size)
        assert theirs.none_hash == NONE_HASH
        for _ in range(20):
            tokens = [rng.randrange(0, 1 << 32) for _ in range(rng.randrange(0, 3000))]
            end = rng.choice([None, rng.randrange(0, 3100)])
            start = rng.randrange(0, 3000) // chunk_size * chunk_size
            assert ours.chunk_hashes(tokens, start, end) == theirs.compute_chunk_hashes(
                tokens, start=start, end=end
            )
