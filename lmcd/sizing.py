"""How many chunks a CPU buffer holds, computed by the allocator itself.

docs/operations.md's sizing table is this module's output
(`python -m lmcd.sizing`; `tests/test_docs.py` checks that the two agree):
each figure fills an `Arena` (the allocator of the CPU buffer, without
memory behind it) with chunks of the model's size until it refuses one.
Segments hold whole chunks only, so a buffer holds a little less than its
size divided by the chunk size.
"""

from __future__ import annotations

import sys

import attrs

from lmcd.transfer.layouts import KVLayout
from lmcd_backends.arena import Arena
from lmcd_backends.pinned_cpu import DEFAULT_SEGMENT_BYTES

GiB = 1 << 30
MiB = 1 << 20
CHUNK_SIZE = 256  # tokens, lmcd's default --chunk-size
BUFFERS_GIB = (10, 50, 200)


@attrs.frozen
class Model:
    """A model's KV cache as one rank holds it."""

    name: str
    layout: KVLayout
    per_rank: bool = False

    def chunk_bytes(self, chunk_size: int = CHUNK_SIZE) -> int:
        return self.layout.chunk_bytes(chunk_size)


def _mha(layers: int, kv_heads: int, head_size: int) -> KVLayout:
    return KVLayout("mha", layers, 1, 16, kv_heads * head_size, "bfloat16", kv_heads)


MODELS = (
    Model("Llama-3.1-8B (32 layers, 8 KV heads, 128, bf16)", _mha(32, 8, 128)),
    Model(
        "Llama-3.1-70B, TP=4 (80 layers, 2 KV heads per rank, 128, bf16)",
        _mha(80, 2, 128),
        per_rank=True,
    ),
    Model(
        "DeepSeek-V3 (61 layers, MLA 576, bf16)",
        KVLayout("mla", 61, 1, 16, 576, "bfloat16"),
    ),
)


def chunks_that_fit(
    capacity_bytes: int, chunk_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES
) -> int:
    """How many chunks of `chunk_bytes` the CPU buffer's allocator places
    in a buffer of `capacity_bytes` with segments of `segment_bytes`
    (`--cpu-buffer-size`, `--segment-mb`) before it refuses one."""
    arena = Arena(capacity_bytes, segment_bytes)
    if not arena.fits(chunk_bytes):
        return 0
    n = 0
    while arena.allocate(chunk_bytes) is not None:
        n += 1
    return n


def sizing_table(
    models: tuple[Model, ...] = MODELS,
    buffers_gib: tuple[int, ...] = BUFFERS_GIB,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> str:
    """The Markdown table of docs/operations.md: per model, the bytes of a
    256-token chunk and the chunks (and tokens) each buffer size holds."""
    head = "| model | per chunk |" + "".join(f" {g} GiB holds |" for g in buffers_gib)
    rule = "| --- | --- |" + " --- |" * len(buffers_gib)
    rows = [head, rule]
    for model in models:
        nbytes = model.chunk_bytes()
        cells = [model.name, f"{nbytes / MiB:.1f} MiB"]
        for gib in buffers_gib:
            n = chunks_that_fit(gib * GiB, nbytes, segment_bytes)
            what = "per-rank chunks" if model.per_rank else "chunks"
            cells.append(f"{n:,} {what} = {n * CHUNK_SIZE:,} tokens")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(sizing_table())
