"""Retrieves that skip the tokens the engine already holds
(`skip_first_n_tokens`): only later tokens are written, to the byte."""

from __future__ import annotations

import pytest
import torch

from lmcd.shmkv import SharedKVCache
from lmcd.transfer import host
from lmcd.transfer.layouts import written_blocks
from lmcd.wire.types import HostTensorRef


def test_written_blocks() -> None:
    assert written_blocks([7, 8, 9, 10], 4, 0) == [
        (0, 7, 0),
        (1, 8, 0),
        (2, 9, 0),
        (3, 10, 0),
    ]
    assert written_blocks([7, 8, 9, 10], 4, 8) == [(2, 9, 0), (3, 10, 0)]
    assert written_blocks([7, 8, 9, 10], 4, 9) == [(2, 9, 1), (3, 10, 0)]
    assert written_blocks([7, 8, 9, 10], 4, 16) == []


@pytest.mark.parametrize("first", [0, 3, 4, 5, 11, 15, 16])
@pytest.mark.parametrize("blocks", [[1, 2, 3, 4], [4, 2, 7, 6]])
def test_scatter_writes_only_tokens_from_the_first(
    first: int, blocks: list[int]
) -> None:
    block_size, hidden = 4, 2 * 8
    with SharedKVCache.create(
        "mha",
        num_layers=2,
        num_blocks=8,
        block_size=block_size,
        num_heads=2,
        head_size=8,
        dtype="float16",
        name="skip-test",
    ) as cache:
        refs = [
            HostTensorRef(path, offset, cache.shape, cache.dtype)
            for path, offset in cache._spans()
        ]
        kv = host.open_host_kv(refs)
        try:
            tokens = len(blocks) * block_size
            chunk = torch.arange(2 * 2 * tokens * hidden, dtype=torch.float16).add_(1)
            buffer = chunk.view(torch.uint8)
            host.scatter(kv, [(blocks, buffer)], [first])
            view = chunk.view(2, 2, tokens, hidden)
            for layer, tensor in enumerate(cache.layers):
                flat = tensor.reshape(2, 8, block_size, hidden)
                for plane in range(2):
                    for p, block in enumerate(blocks):
                        for row in range(block_size):
                            token = p * block_size + row
                            got = flat[plane, block, row]
                            if token < first:
                                assert not got.any(), (layer, plane, block, row)
                            else:
                                assert torch.equal(got, view[plane, layer, token])
                    untouched = [b for b in range(8) if b not in blocks]
                    assert not flat[plane, untouched].any()
        finally:
            kv.close()
