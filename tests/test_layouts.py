"""KV layouts, block plans and the host copy kernels (no sockets)."""

from __future__ import annotations

import random

import pytest
import torch

from lmcd.errors import RegistrationError, TransferError
from lmcd.transfer import host
from lmcd.transfer.layouts import KVLayout, chunk_block_ids
from lmcd_backends.pinned_cpu import PinnedCpuTier


def test_detect_mha_and_mla() -> None:
    mha = KVLayout.detect([(2, 100, 16, 8, 128)] * 32, ["bfloat16"] * 32)
    assert (mha.kind, mha.num_layers, mha.hidden, mha.planes) == ("mha", 32, 1024, 2)
    assert mha.chunk_bytes(256) == 2 * 32 * 256 * 1024 * 2
    assert mha.layer_shape() == (2, 100, 16, 8, 128)
    mla = KVLayout.detect([(100, 64, 576)] * 61, ["bfloat16"] * 61)
    assert (mla.kind, mla.planes, mla.hidden) == ("mla", 1, 576)
    assert mla.chunk_shape(256) == (1, 61, 256, 576)
    assert mha.tag != mla.tag


@pytest.mark.parametrize(
    ("shapes", "dtypes", "error"),
    [
        ([], [], "no KV cache layers"),
        ([(2, 4, 16, 1, 8), (2, 5, 16, 1, 8)], ["float16"] * 2, "differ"),
        ([(2, 4, 16, 1, 8)] * 2, ["float16", "bfloat16"], "differ"),
        ([(3, 4, 16, 1, 8)], ["float16"], "neither MHA"),
        ([(4, 16)], ["float16"], "neither MHA"),
        ([(4, 0, 8)], ["float16"], "empty"),
        ([(4, 16, 8)], ["complex64"], "unsupported dtype"),
    ],
)
def test_detect_refuses(
    shapes: list[tuple[int, ...]], dtypes: list[str], error: str
) -> None:
    with pytest.raises(RegistrationError, match=error):
        KVLayout.detect(shapes, dtypes)


def test_chunk_size_must_be_a_multiple_of_block_size() -> None:
    layout = KVLayout.detect([(4, 16, 8)], ["float16"])
    assert layout.blocks_per_chunk(256) == 16
    with pytest.raises(RegistrationError, match="multiple"):
        layout.blocks_per_chunk(100)


def test_chunk_block_ids() -> None:
    ids = list(range(40))
    assert chunk_block_ids(ids, 2, 16, 64) == [ids[:16], ids[16:32]]  # extra ignored
    with pytest.raises(TransferError, match="need 48 block ids"):
        chunk_block_ids(ids, 3, 16, 64)
    with pytest.raises(TransferError, match="out of range"):
        chunk_block_ids([*range(15), 64], 1, 16, 64)


def test_block_runs() -> None:
    assert host.block_runs([3, 4, 5, 9, 1, 2]) == [(3, 3), (9, 1), (1, 2)]
    assert host.block_runs([]) == []


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_gather_then_scatter_round_trips_scattered_blocks(kind: str) -> None:
    from lmcd.shmkv import SharedKVCache
    from lmcd.wire.types import HostTensorRef

    with SharedKVCache.create(
        kind,
        num_layers=3,
        num_blocks=40,
        block_size=4,
        num_heads=2,
        head_size=8,
        dim=24,
        dtype="float16",
    ) as kv:
        for layer in kv.layers:
            layer.view(torch.int16).random_()
        refs = [
            HostTensorRef(kv.path, i * kv.layers[0].numel() * 2, kv.shape, "float16")
            for i in range(3)
        ]
        opened = host.open_host_kv(refs)
        tier = PinnedCpuTier(1 << 20, pin=False)
        rng = random.Random(3)
        ids = rng.sample(range(40), 16)
        src, dst = ids[:8], ids[8:]
        nbytes = opened.layout.chunk_bytes(4 * 4)
        chunks = []
        for c in range(2):
            extent = tier.allocate(nbytes)
            assert extent is not None
            chunks.append((src[c * 4 : (c + 1) * 4], tier.buffer(extent)))
        expected = [layer.clone() for layer in kv.layers]
        host.gather(opened, chunks)
        back = [(dst[c * 4 : (c + 1) * 4], buf) for c, (_, buf) in enumerate(chunks)]
        host.scatter(opened, back)
        for b16, a16 in zip(expected, kv.layers, strict=True):
            # Compare bits: random int16 patterns include NaNs.
            before, after = b16.view(torch.int16), a16.view(torch.int16)
            if kind == "mha":
                assert torch.equal(before[:, src], after[:, dst])
            else:
                assert torch.equal(before[src], after[dst])
        opened.close()
