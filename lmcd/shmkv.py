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
import errno
import itertools
import math
import mmap
import os
from typing import Any, Literal

import attrs
import msgspec

from lmcd.errors import RegistrationError
from lmcd.transfer.host import SHM_ROOT, shm_file_name, torch_dtype
from lmcd.transfer.layouts import DTYPE_SIZES
from lmcd.wire.lmcache03 import EXT_HOST_TENSOR

_counter = itertools.count()


def _create(path: str, nbytes: int) -> mmap.mmap:
    """A new, fully backed file of `nbytes`, mapped; removed on failure."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _back(fd, path, nbytes)
        return mmap.mmap(fd, nbytes)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def _back(fd: int, path: str, nbytes: int) -> None:
    """Allocate every byte of the file (not a sparse `ftruncate`)."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise RegistrationError(
                f"cannot allocate {nbytes} bytes for {path}: {e.strerror} "
                f"(is {os.path.dirname(path)} full?)"
            ) from e
        raise RegistrationError(f"cannot allocate {path}: {e.strerror}") from e


@attrs.define(eq=False)
class SharedKVCache:
    """A paged KV cache, one tensor per layer, in one shared-memory file."""

    paths: list[str]
    shape: tuple[int, ...]
    dtype: str
    layers: list[Any]
    _maps: list[mmap.mmap]

    @property
    def path(self) -> str:
        """The (first) file."""
        return self.paths[0]

    @path.setter
    def path(self, value: str) -> None:
        self.paths[0] = value

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
        shm_dir: str = SHM_ROOT,
        file_per_layer: bool = False,
    ) -> SharedKVCache:
        """Create the file(s) and tensors (zero-filled). `num_heads`/
        `head_size` are for MHA, `dim` for MLA; `name` must be letters,
        digits, ".", "_" or "-" (lmcd registers only `lmcd-*` names).

        All layers share one file, unless `file_per_layer` (the layout of
        lmcache 0.5's `cpu_shm` tensors, one segment per layer): lmcd can
        copy into several files at once, while writes into one file are
        serialized by the kernel.

        Every page is allocated here (`posix_fallocate`), never left sparse:
        a sparse page that a full tmpfs cannot back later would fail a copy
        (and kill any process that touches it through a map). Raises
        `RegistrationError` for a `name` lmcd would refuse and when the tmpfs
        has no room.
        """
        import torch

        if kind == "mha":
            shape: tuple[int, ...] = (2, num_blocks, block_size, num_heads, head_size)
        else:
            shape = (num_blocks, block_size, dim)
        layer_bytes = math.prod(shape) * DTYPE_SIZES[dtype]
        sizes = (
            [layer_bytes] * num_layers if file_per_layer else [layer_bytes * num_layers]
        )
        kv = cls([], shape, dtype, [], [])
        try:
            for size in sizes:
                path = f"{shm_dir}/lmcd-{name}-{os.getpid()}-{next(_counter)}"
                shm_file_name(path, shm_dir)  # a name lmcd will accept, or raise
                kv._maps.append(_create(path, size))
                kv.paths.append(path)
        except BaseException:
            kv.close()
            raise
        for m in kv._maps:
            flat = torch.frombuffer(m, dtype=torch.uint8)
            kv.layers += [
                flat[i * layer_bytes : (i + 1) * layer_bytes]
                .view(torch_dtype(dtype))
                .view(shape)
                for i in range(len(m) // layer_bytes)
            ]
        return kv

    def _spans(self) -> list[tuple[str, int]]:
        layer_bytes = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        if len(self.paths) > 1:
            return [(p, 0) for p in self.paths]
        return [(self.path, i * layer_bytes) for i in range(len(self.layers))]

    def register_payload(self) -> list[msgspec.msgpack.Ext]:
        """The `kv_caches` payload of REGISTER_KV_CACHE for this cache."""
        return [
            msgspec.msgpack.Ext(
                EXT_HOST_TENSOR,
                msgspec.msgpack.encode(
                    {
                        "path": path,
                        "offset": offset,
                        "shape": list(self.shape),
                        "dtype": self.dtype,
                    }
                ),
            )
            for path, offset in self._spans()
        ]

    def close(self) -> None:
        """Drop the tensors, unmap and delete the files."""
        self.layers.clear()
        for m in self._maps:
            # A caller may still hold a view; the GC unmaps it then.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> SharedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
