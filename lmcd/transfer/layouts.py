"""KV-cache layouts and chunk shapes (no torch: shapes, sizes, validation).

vLLM layouts, per layer:

- MHA: `[2, num_blocks, block_size, num_kv_heads, head_size]`
- MLA: `[num_blocks, block_size, latent_dim]`

A stored chunk of `T` tokens is `[K, num_layers, T, hidden]` in the source
dtype, `K` = 2 (keys, values) for MHA and 1 for MLA, `hidden` =
heads * head_size (MHA) or the latent dim (MLA) — the format of lmcache's
`KV_2LTD` / `KV_MLA_FMT`. The block size does not appear in it, so chunks
stored by one instance can be retrieved by another of the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs

from lmcd.errors import RegistrationError, TransferError

DTYPE_SIZES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}


@attrs.frozen
class KVLayout:
    """The shape of one instance's paged KV cache."""

    kind: Literal["mha", "mla"]
    num_layers: int
    num_blocks: int
    block_size: int
    hidden: int
    dtype: str
    num_heads: int = 1

    @property
    def planes(self) -> int:
        """K: 2 for MHA (keys and values), 1 for MLA."""
        return 2 if self.kind == "mha" else 1

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_row(self) -> int:
        """Elements of one block of one plane of one layer."""
        return self.block_size * self.hidden

    @property
    def tag(self) -> str:
        """What must match for a stored chunk to be retrievable into this cache."""
        return f"{self.kind}:{self.dtype}:{self.num_layers}x{self.hidden}"

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int]:
        return (self.planes, self.num_layers, tokens, self.hidden)

    def chunk_bytes(self, tokens: int) -> int:
        return self.planes * self.num_layers * tokens * self.hidden * self.itemsize

    def blocks_per_chunk(self, chunk_size: int) -> int:
        if chunk_size % self.block_size:
            raise RegistrationError(
                f"chunk size {chunk_size} is not a multiple of block size "
                f"{self.block_size}"
            )
        return chunk_size // self.block_size

    def layer_shape(self) -> tuple[int, ...]:
        if self.kind == "mha":
            head_size = self.hidden // self.num_heads
            return (2, self.num_blocks, self.block_size, self.num_heads, head_size)
        return (self.num_blocks, self.block_size, self.hidden)

    @classmethod
    def detect(
        cls, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]
    ) -> KVLayout:
        """The layout of a list of per-layer tensors, which must all agree.

        Raises `RegistrationError` for no layers, mixed shapes or dtypes, an
        unknown dtype, or a shape that is neither MHA nor MLA.
        """
        if not shapes:
            raise RegistrationError("no KV cache layers")
        if any(s != shapes[0] for s in shapes) or any(d != dtypes[0] for d in dtypes):
            raise RegistrationError("KV cache layers differ in shape or dtype")
        shape, dtype = tuple(shapes[0]), dtypes[0]
        if dtype not in DTYPE_SIZES:
            raise RegistrationError(f"unsupported dtype {dtype}")
        if any(d <= 0 for d in shape):
            raise RegistrationError(f"empty KV cache shape {shape}")
        if len(shape) == 5 and shape[0] == 2:
            _, blocks, block_size, heads, head_size = shape
            return cls(
                "mha",
                len(shapes),
                blocks,
                block_size,
                heads * head_size,
                dtype,
                num_heads=heads,
            )
        if len(shape) == 3:
            blocks, block_size, dim = shape
            return cls("mla", len(shapes), blocks, block_size, dim, dtype)
        raise RegistrationError(
            f"KV cache shape {shape} is neither MHA [2, blocks, block_size, heads, "
            "head_size] nor MLA [blocks, block_size, dim]"
        )


def chunk_block_ids(
    block_ids: Sequence[int], n_chunks: int, blocks_per_chunk: int, num_blocks: int
) -> list[Sequence[int]]:
    """Block ids of each chunk: chunk i is `block_ids[i*b:(i+1)*b]`.

    Trailing ids are ignored. Raises `TransferError` when there are too few
    ids or one is out of `0..num_blocks-1`.
    """
    needed = n_chunks * blocks_per_chunk
    if len(block_ids) < needed:
        raise TransferError(
            f"{n_chunks} chunks need {needed} block ids, got {len(block_ids)}"
        )
    used = block_ids[:needed]
    if used and (min(used) < 0 or max(used) >= num_blocks):
        raise TransferError(f"block id out of range 0..{num_blocks - 1}")
    return [
        used[i * blocks_per_chunk : (i + 1) * blocks_per_chunk] for i in range(n_chunks)
    ]


def written_blocks(
    block_ids: Sequence[int], block_size: int, first_token: int
) -> list[tuple[int, int, int]]:
    """The blocks of one chunk that a retrieve writes when the engine
    already holds the chunk's first `first_token` tokens (lmcache's
    `skip_first_n_tokens`): `(position in block_ids, block id, first row)`
    for each block with a token at or after `first_token`; the first row
    is the block's first token to write (0 but for a block cut in two)."""
    out = []
    for position, block in enumerate(block_ids):
        start = position * block_size
        if start + block_size <= first_token:
            continue
        out.append((position, block, max(0, first_token - start)))
    return out
