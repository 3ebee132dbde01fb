"""The host path: KV caches in `/dev/shm` files, copied on the CPU.

REGISTER_KV_CACHE with extension code 2 names, per layer, a file under
`/dev/shm`, a byte offset, a shape and a dtype. The daemon maps each file
read-write (MAP_SHARED, no copy), so it sees the client's writes and the
client sees its own. Copies run in a worker thread on the plan the scheduler
hands over; they never touch the storage index.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import stat
from collections.abc import Sequence
from typing import Any

import attrs

from lmcd.errors import RegistrationError, TransferError
from lmcd.transfer.layouts import DTYPE_SIZES, KVLayout
from lmcd.wire.types import HostTensorRef

log = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"


def torch_dtype(name: str) -> Any:
    """The torch dtype called `name` (e.g. "bfloat16")."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RegistrationError(f"unknown torch dtype {name!r}")
    return dtype


@attrs.define(slots=True)
class MappedFile:
    """A shared-memory file mapped read-write; the descriptor stays open so
    that each copy can check the file has not shrunk under the map."""

    path: str
    fd: int
    map: mmap.mmap

    def check(self) -> None:
        """Raise `TransferError` if the file is now shorter than the map: a
        copy through the missing pages would kill the process (SIGBUS)."""
        size = os.fstat(self.fd).st_size
        if size < len(self.map):
            raise TransferError(
                f"{self.path} shrank from {len(self.map)} to {size} bytes "
                "after registration"
            )

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a view is still alive somewhere; GC unmaps it
            log.warning("shared-memory map of %s still in use; left to GC", self.path)
        os.close(self.fd)


@attrs.define(slots=True)
class HostKV:
    """An opened host KV cache: one `[K, num_blocks, block_row]` view per layer."""

    layout: KVLayout
    layers: list[Any]
    files: list[MappedFile]

    def check(self) -> None:
        """Raise `TransferError` if a file behind the cache has shrunk."""
        for f in self.files:
            f.check()

    def close(self) -> None:
        """Drop the views, unmap and close the files."""
        self.layers.clear()
        for f in self.files:
            f.close()
        self.files.clear()


def _checked_path(path: str) -> str:
    real = os.path.realpath(path)
    if not real.startswith(SHM_ROOT + "/"):
        raise RegistrationError(f"host KV cache {path!r} is not under {SHM_ROOT}")
    return real


def open_host_kv(refs: Sequence[HostTensorRef]) -> HostKV:
    """Map every layer of a host KV cache. Raises `RegistrationError` for a
    path outside /dev/shm, a file too small for shape and dtype, or layers
    that differ in shape or dtype."""

    layout = KVLayout.detect([r.shape for r in refs], [r.dtype for r in refs])
    files: dict[str, MappedFile] = {}
    kv = HostKV(layout, [], [])
    try:
        for ref in refs:
            real = _checked_path(ref.path)
            if real not in files:
                files[real] = _map(real)
                kv.files.append(files[real])
            typed = _window(files[real].map, ref).view(torch_dtype(ref.dtype))
            kv.layers.append(
                typed.view(layout.planes, layout.num_blocks, layout.block_row)
            )
            del typed
    except BaseException:
        kv.close()
        raise
    return kv


def _window(m: mmap.mmap, ref: HostTensorRef) -> Any:
    """The bytes of `ref` inside its file's map, as a uint8 tensor."""
    import torch

    nbytes = DTYPE_SIZES[ref.dtype]
    for d in ref.shape:
        nbytes *= d
    if ref.offset % DTYPE_SIZES[ref.dtype] or ref.offset + nbytes > len(m):
        raise RegistrationError(
            f"{ref.path}: {nbytes} bytes at offset {ref.offset} do not fit "
            f"a {len(m)}-byte file (or the offset is misaligned)"
        )
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=ref.offset)


def _map(path: str) -> MappedFile:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as e:
        raise RegistrationError(f"cannot open {path}: {e.strerror}") from e
    try:
        region = _map_regular(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return MappedFile(path, fd, region)


def _map_regular(fd: int, path: str) -> mmap.mmap:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        raise RegistrationError(f"{path} is not a non-empty regular file")
    return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _chunk_view(kv: HostKV, buffer: Any, blocks: int) -> Any:
    layout = kv.layout
    nbytes = layout.chunk_bytes(blocks * layout.block_size)
    typed = buffer[:nbytes].view(torch_dtype(layout.dtype))
    return typed.view(layout.planes, layout.num_layers, blocks, layout.block_row)


def gather(kv: HostKV, chunks: Sequence[tuple[Sequence[int], Any]]) -> None:
    """Copy each chunk's blocks out of the KV cache into its buffer.

    `chunks` is `[(block_ids, uint8 buffer)]`; the buffer receives the chunk
    in `[K, layers, tokens, hidden]` order.
    """
    import torch

    kv.check()
    for block_ids, buffer in chunks:
        index = torch.tensor(block_ids, dtype=torch.long)
        dest = _chunk_view(kv, buffer, len(block_ids))
        for layer, src in enumerate(kv.layers):
            for plane in range(kv.layout.planes):
                torch.index_select(src[plane], 0, index, out=dest[plane, layer])


def scatter(kv: HostKV, chunks: Sequence[tuple[Sequence[int], Any]]) -> None:
    """Copy each chunk's buffer into its blocks of the KV cache (reverse of
    `gather`).

    Runs of consecutive block ids are copied with one memmove each: torch's
    `index_copy_` reaches only about 60% of memcpy speed here, while a
    memmove per run (or per block, for scattered ids) stays near it.
    """
    layout = kv.layout
    row = layout.block_row * layout.itemsize
    plane_bytes = layout.num_blocks * row
    kv.check()
    for block_ids, buffer in chunks:
        src = _chunk_view(kv, buffer, len(block_ids))
        src_base = src.data_ptr()
        chunk_plane = layout.num_layers * len(block_ids) * row
        spans = block_runs(block_ids)
        for layer, dest in enumerate(kv.layers):
            dest_base = dest.data_ptr()
            for plane in range(layout.planes):
                s = src_base + plane * chunk_plane + layer * len(block_ids) * row
                d = dest_base + plane * plane_bytes
                for start, count in spans:
                    ctypes.memmove(d + start * row, s, count * row)
                    s += count * row


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """`block_ids` as (first id, count) runs of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
