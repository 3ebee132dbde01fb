"""lmcache's token-hash chain (dialects 0.4 and later name chunks by it).

Since lmcache 0.3.14 a client names a KV chunk by its tokens, not by a hash
of its own: the server cuts the prompt into chunks of `chunk_size` tokens
and names chunk `i` by

    h(i) = blake3(h(i-1) || tokens of chunk i as big-endian uint32)

with `h(-1) = NONE_HASH = blake3(int64be(0) || uint32be(0))` (lmcache 0.5.6
`v1/multiprocess/token_hasher.py` with its default blake3: the zeros are
the int prefix 0 and the one-token tuple `(0,)` it seeds the chain with).
Only full chunks are named. Sharing keys with other lmcache-speaking
servers needs exactly this chain.

Pure computation: no trio, zmq or torch.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import attrs
from blake3 import blake3

MAX_TOKEN_ID = (1 << 32) - 1
"""Token ids are packed as uint32 (lmcache's `struct.pack(">I")`)."""

NONE_HASH = blake3(struct.pack(">qI", 0, 0)).digest()
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


@attrs.define(slots=True)
class TokenHasher:
    """The chain for one chunk size.

    `chain` hashes one chunk; `extend` continues a chain over many chunks
    at once (a session that already knows a prefix hash); `chunk_hashes` is
    the whole computation, lmcache's `compute_chunk_hashes`.
    """

    chunk_size: int = attrs.field()

    @chunk_size.validator
    def _check(self, _: object, value: int) -> None:
        if value < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {value})")

    def chain(self, prefix: bytes | None, tokens: Sequence[int]) -> bytes:
        """The hash of one chunk of `tokens` after the chunk hashed `prefix`
        (None: the first chunk). Raises `struct.error` for a token id
        outside 0..2**32-1."""
        h = blake3(NONE_HASH if prefix is None else prefix)
        h.update(struct.pack(f">{len(tokens)}I", *tokens))
        return h.digest()

    def extend(self, prefix: bytes | None, tokens: Sequence[int]) -> list[bytes]:
        """The hashes of the full chunks of `tokens`, in order, continuing
        the chain after the chunk hashed `prefix` (None: from the prompt's
        start); a trailing partial chunk is ignored. Packs all tokens in one
        C call, so it is much faster than `chain` per chunk. Raises
        `ValueError` for a bad token id."""
        full = len(tokens) - len(tokens) % self.chunk_size
        return self.extend_packed(prefix, pack_tokens(tokens[:full]))

    def extend_packed(self, prefix: bytes | None, packed: bytes) -> list[bytes]:
        """`extend` over tokens already packed by `pack_tokens`."""
        step = self.chunk_size * _TOKEN_BYTES
        view = memoryview(packed)
        out: list[bytes] = []
        append = out.append
        h = NONE_HASH if prefix is None else prefix
        for offset in range(0, len(view) - step + 1, step):
            hasher = blake3(h)
            hasher.update(view[offset : offset + step])
            h = hasher.digest()
            append(h)
        return out

    def chunk_hashes(
        self, token_ids: Sequence[int], start: int = 0, end: int | None = None
    ) -> list[bytes]:
        """The hashes of the full chunks of `token_ids[:end]` whose first
        token is at or after `start` (the chain always runs from token 0).
        Raises `ValueError` for a bad token id."""
        stop = len(token_ids) if end is None else max(0, min(len(token_ids), end))
        hashes = self.extend(None, token_ids[:stop])
        first = -(-max(start, 0) // self.chunk_size)  # chunks starting >= start
        return hashes[first:]
