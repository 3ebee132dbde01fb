"""lmcache's token-hash chain: the names of token-addressed chunks.

Since lmcache 0.3.14 a client names a KV chunk by its tokens, not by a hash
of its own: the server cuts the prompt into chunks of `chunk_size` tokens
and names chunk `i` by

    h(i) = blake3(h(i-1) || tokens of chunk i as big-endian uint32)

with `h(-1) = NONE_HASH = blake3(8 zero bytes || 4 zero bytes)` (lmcache's
`TokenHasher` with its default blake3 algorithm; the zeros are the int
prefix 0 and the one-token tuple `(0,)` it seeds the chain with). Only
full chunks are named; a trailing partial chunk has no hash. lmcd must
compute exactly the same names, or chunks stored through lmcache's own
server, or by another lmcd, would never be found.

Pure computation: no trio, zmq or torch.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import attrs
from blake3 import blake3

MAX_TOKEN_ID = (1 << 32) - 1
"""Token ids are packed as uint32 (lmcache's `struct.pack(">I")`)."""

NONE_HASH = blake3(bytes(12)).digest()
"""The hash that precedes the first chunk."""

_TOKEN_BYTES = 4
# array("I") is the C unsigned int: 4 bytes on every platform CPython
# supports, but check rather than assume.
_CODE = "I" if array("I").itemsize == _TOKEN_BYTES else "L"
assert array(_CODE).itemsize == _TOKEN_BYTES
_SWAP = sys.byteorder == "little"


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """`token_ids` as big-endian uint32s, as lmcache hashes them.

    Raises `ValueError` for an id outside 0..2^32-1 (lmcache's server fails
    on those too) or a value that is not an int.
    """
    packed = _uint32s(token_ids)
    if _SWAP:
        packed.byteswap()
    return packed.tobytes()


def check_token_ids(token_ids: Sequence[int]) -> None:
    """Raise `ValueError` unless every id is an int in 0..2^32-1.

    A C loop: several times faster than per-item bounds in a msgspec type.
    """
    _uint32s(token_ids)


def _uint32s(token_ids: Sequence[int]) -> array[int]:
    try:
        return array(_CODE, token_ids)
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be ints in 0..{MAX_TOKEN_ID}: {e}") from e


@attrs.frozen
class TokenHasher:
    """lmcache's chunk hash chain for one chunk size.

    `chunk_hashes` is the whole computation; `chain` and `HashChain` let a
    session continue from the hashes it already has.
    """

    chunk_size: int = attrs.field()

    @chunk_size.validator
    def _check(self, _: object, value: int) -> None:
        if value < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {value})")

    def chunk_hashes(
        self, token_ids: Sequence[int], start: int = 0, end: int | None = None
    ) -> list[bytes]:
        """The hashes of the full chunks of `token_ids[:end]` that start at
        or after token `start` (lmcache's `compute_chunk_hashes`).

        The chain always runs from token 0; `start` only drops the leading
        hashes from the result. Raises `ValueError` for a bad token id.
        """
        limit = len(token_ids) if end is None else max(0, min(len(token_ids), end))
        full = limit - limit % self.chunk_size
        hashes = self.chain(NONE_HASH, pack_tokens(token_ids[:full]))
        first = -(-max(start, 0) // self.chunk_size)  # chunks starting >= start
        return hashes[first:]

    def chain(self, prefix_hash: bytes, packed: bytes | memoryview) -> list[bytes]:
        """Continue the chain after `prefix_hash` over `packed` (tokens as
        `pack_tokens` gives them): one hash per full chunk, in order; a
        trailing partial chunk is ignored."""
        step = self.chunk_size * _TOKEN_BYTES
        view = memoryview(packed)
        out: list[bytes] = []
        append = out.append
        h = prefix_hash
        for offset in range(0, len(view) - step + 1, step):
            hasher = blake3(h)
            hasher.update(view[offset : offset + step])
            h = hasher.digest()
            append(h)
        return out


@attrs.define(slots=True)
class HashChain:
    """The chain of one growing token sequence (one request's session).

    Each call names the chunks of the sequence as `TokenHasher.chunk_hashes`
    would, but hashes only chunks it has not hashed before. Every call still
    checks that the tokens of the chunks it remembers are unchanged (a
    client may send a different prompt under the same request id); from the
    first chunk that differs it hashes again, so a stale name is never
    returned.
    """

    hasher: TokenHasher
    _packed: bytearray = attrs.field(factory=bytearray, init=False)
    _hashes: list[bytes] = attrs.field(factory=list, init=False)

    @property
    def chunks(self) -> int:
        """How many leading chunks are hashed and remembered."""
        return len(self._hashes)

    def hashes(
        self, token_ids: Sequence[int], start: int = 0, end: int | None = None
    ) -> list[bytes]:
        """The hashes of the full chunks of `token_ids[:end]` that start at
        or after token `start`; remembers every chunk hashed on the way.
        Raises `ValueError` for a bad token id."""
        size = self.hasher.chunk_size
        limit = len(token_ids) if end is None else max(0, min(len(token_ids), end))
        full = limit - limit % size
        packed = pack_tokens(token_ids[:full])
        known = self._matching_chunks(packed)
        if known < len(self._hashes):
            del self._hashes[known:]
            del self._packed[known * size * _TOKEN_BYTES :]
        have = len(self._packed)
        if have < len(packed):
            prefix = self._hashes[-1] if self._hashes else NONE_HASH
            self._hashes.extend(self.hasher.chain(prefix, memoryview(packed)[have:]))
            self._packed += memoryview(packed)[have:]
        first = -(-max(start, 0) // size)
        return self._hashes[first : full // size]

    def _matching_chunks(self, packed: bytes) -> int:
        """How many remembered chunks `packed` still starts with."""
        mine = self._packed
        # startswith compares with memcmp; the common case is a match.
        if packed.startswith(mine) or mine.startswith(packed):
            # A shorter sequence that agrees keeps the longer chain too.
            return len(self._hashes)
        step = self.hasher.chunk_size * _TOKEN_BYTES
        chunk = 0
        while (
            mine[chunk * step : (chunk + 1) * step]
            == packed[chunk * step : (chunk + 1) * step]
        ):
            chunk += 1
        return chunk
