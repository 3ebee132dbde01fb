"""Client side of the host path: KV caches in `/dev/shm`, ready to register.

CPU-only clients (tests, `lmcd bench`, a CPU vLLM) create a paged KV cache in
a shared-memory file and register it with lmcd's extension code 2 (see
PROTOCOL.md); lmcd maps the same file and copies blocks in and out of it.

    kv = SharedKVCache.create("mha", num_layers=4, num_blocks=64, block_size=16,
                              num_heads=8, head_size=128, dtype="bfloat16")
    client.submit_request(RequestType.REGISTER_KV_CACHE,
                          [instance_id, kv.register_payload()], None)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
from typing import Any, Literal

import attrs
import msgspec

from lmcd.transfer.host import SHM_ROOT, torch_dtype
from lmcd.transfer.layouts import DTYPE_SIZES
from lmcd.wire.lmcache03 import EXT_HOST_TENSOR

_counter = itertools.count()


@attrs.define(eq=False)
class SharedKVCache:
    """A paged KV cache, one tensor per layer, in one shared-memory file."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    layers: list[Any]
    _map: mmap.mmap | None

    @classmethod
    def create(
        cls,
        kind: Literal["mha", "mla"],
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int = 8,
        head_size: int = 128,
        dim: int = 576,
        dtype: str = "bfloat16",
        name: str = "kv",
    ) -> SharedKVCache:
        """Create the file and tensors (zero-filled). `num_heads`/`head_size`
        are for MHA, `dim` for MLA."""
        import torch

        if kind == "mha":
            shape: tuple[int, ...] = (2, num_blocks, block_size, num_heads, head_size)
        else:
            shape = (num_blocks, block_size, dim)
        layer_bytes = math.prod(shape) * DTYPE_SIZES[dtype]
        path = f"{SHM_ROOT}/lmcd-{name}-{os.getpid()}-{next(_counter)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, layer_bytes * num_layers)
            m = mmap.mmap(fd, layer_bytes * num_layers)
        finally:
            os.close(fd)
        flat = torch.frombuffer(m, dtype=torch.uint8)
        layers = [
            flat[i * layer_bytes : (i + 1) * layer_bytes]
            .view(torch_dtype(dtype))
            .view(shape)
            for i in range(num_layers)
        ]
        return cls(path, shape, dtype, layers, m)

    def register_payload(self) -> list[msgspec.msgpack.Ext]:
        """The `kv_caches` payload of REGISTER_KV_CACHE for this cache."""
        layer_bytes = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        return [
            msgspec.msgpack.Ext(
                EXT_HOST_TENSOR,
                msgspec.msgpack.encode(
                    {
                        "path": self.path,
                        "offset": i * layer_bytes,
                        "shape": list(self.shape),
                        "dtype": self.dtype,
                    }
                ),
            )
            for i in range(len(self.layers))
        ]

    def close(self) -> None:
        """Drop the tensors, unmap and delete the file."""
        self.layers.clear()
        if self._map is not None:
            # A caller may still hold a view; the GC unmaps it then.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> SharedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
