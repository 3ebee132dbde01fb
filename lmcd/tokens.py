"""lmcache's token-hash chain (dialects 0.4 and later name chunks by it).

Chunk `i` of a prompt is named by `blake3(h(i-1) || tokens_i as big-endian
uint32)`, `h(-1)` being NONE_HASH = `blake3(int64be(0) || uint32be(0))`
(lmcache 0.5.6 `v1/multiprocess/token_hasher.py`). Sharing keys with other
lmcache-speaking servers needs exactly this chain.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs
from blake3 import blake3

NONE_HASH = blake3(struct.pack(">qI", 0, 0)).digest()


@attrs.define(slots=True)
class TokenHasher:
    """The chain for one chunk size."""

    chunk_size: int

    def chain(self, prefix: bytes | None, tokens: Sequence[int]) -> bytes:
        """The hash of one chunk of `tokens` after the chunk hashed `prefix`
        (None: the first chunk). Raises `struct.error` for a token id
        outside 0..2**32-1."""
        h = blake3(NONE_HASH if prefix is None else prefix)
        h.update(struct.pack(f">{len(tokens)}I", *tokens))
        return h.digest()

    def chunk_hashes(
        self, token_ids: Sequence[int], start: int = 0, end: int | None = None
    ) -> list[bytes]:
        """The hashes of the full chunks of `token_ids[:end]` whose first
        token is at or after `start`."""
        size = self.chunk_size
        stop = len(token_ids) if end is None else min(len(token_ids), end)
        stop -= stop % size
        out: list[bytes] = []
        prefix: bytes | None = None
        for i in range(0, stop, size):
            prefix = self.chain(prefix, token_ids[i : i + size])
            if i >= start:
                out.append(prefix)
        return out
