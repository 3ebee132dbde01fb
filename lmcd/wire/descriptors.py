"""lmcache 0.5.6's tensor descriptors (MessagePack extension code 1).

lmcache 0.5.6 stopped pickling tensor handles: each KV layer travels as a
MessagePack map tagged by its `type`, with a `version` (1), the tensor's
view (`metadata`: dtype, shape, stride, storage offset, device UUID) and
what locates its memory. Two kinds are served:

- `cuda`: torch's `_share_cuda_()` 8-tuple in `handle`; becomes a
  `CudaTensorRef` with the view's stride and storage offset.
- `cpu_shm`: a POSIX shared-memory segment `shm_name` of `nbytes` bytes;
  becomes a `HostTensorRef` on `/dev/shm/<name>` (the host path then
  applies its own confinement and size checks when it maps the file).

`cuda_raw`, `cuda_vmm`, `musa` and `npu` (and the pickled handles of
lmcache 0.5.5 and older) are refused with `UnsupportedDescriptor`. Nothing
is unpickled and no device or file is touched here.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lmcd.errors import ProtocolError
from lmcd.transfer.layouts import DTYPE_SIZES
from lmcd.wire.types import CudaTensorRef, HostTensorRef, TensorRef

SHM_ROOT = "/dev/shm"
MAX_DESCRIPTOR = 64 * 1024
"""Bytes one descriptor may take (a real one is about 150)."""
MAX_DIMS = 8
MAX_TENSOR_BYTES = 1 << 48
"""No KV layer is 256 TiB; bounds every size computed from a descriptor."""
MAX_HANDLE_BYTES = 256
MAX_DEVICE_INDEX = 1024
MAX_SHM_NAME = 255

_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_Dims = Annotated[tuple[_NonNeg, ...], msgspec.Meta(max_length=MAX_DIMS)]
_Handle = Annotated[bytes, msgspec.Meta(max_length=MAX_HANDLE_BYTES)]
_Short = Annotated[str, msgspec.Meta(max_length=256)]


class DescriptorError(ProtocolError):
    """A descriptor is malformed or describes memory outside its bounds."""


class UnsupportedDescriptor(DescriptorError):
    """A well-formed descriptor of a kind lmcd does not map (`kind`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Metadata(msgspec.Struct, forbid_unknown_fields=True):
    dtype: _Short
    shape: _Dims
    stride: _Dims
    storage_offset: _NonNeg
    device_uuid: _Short


class _Cuda(msgspec.Struct, tag="cuda", tag_field="type", forbid_unknown_fields=True):
    version: Literal[1]
    metadata: _Metadata
    handle: tuple[
        int,
        _Handle | None,
        _NonNeg,
        _NonNeg,
        _Handle | None,
        _NonNeg,
        _Handle | None,
        bool,
    ]


class _CpuShm(
    msgspec.Struct, tag="cpu_shm", tag_field="type", forbid_unknown_fields=True
):
    version: Literal[1]
    metadata: _Metadata
    shm_name: Annotated[str, msgspec.Meta(max_length=MAX_SHM_NAME + 1)]
    nbytes: _NonNeg


# The kinds lmcd refuses: their fields are not even read.
class _CudaRaw(msgspec.Struct, tag="cuda_raw", tag_field="type"):
    pass


class _CudaVmm(msgspec.Struct, tag="cuda_vmm", tag_field="type"):
    pass


class _Musa(msgspec.Struct, tag="musa", tag_field="type"):
    pass


class _Npu(msgspec.Struct, tag="npu", tag_field="type"):
    pass


_Descriptor = _Cuda | _CpuShm | _CudaRaw | _CudaVmm | _Musa | _Npu
_decoder = msgspec.msgpack.Decoder(_Descriptor)

_REFUSED = {
    _CudaRaw: (
        "cuda_raw",
        "cuda_raw tensor descriptors (driver IPC byte ranges) are not supported; "
        "lmcd maps cuda (torch IPC) and cpu_shm descriptors",
    ),
    _CudaVmm: (
        "cuda_vmm",
        "cuda_vmm tensor descriptors (VMM exports) are not supported; "
        "lmcd maps cuda (torch IPC) and cpu_shm descriptors",
    ),
    _Musa: ("musa", "MUSA tensor descriptors are not supported"),
    _Npu: ("npu", "NPU tensor descriptors are not supported"),
}


def decode_descriptor(data: bytes | memoryview) -> TensorRef:
    """The tensor one extension-code-1 payload of lmcache 0.5.6 describes.

    Raises `UnsupportedDescriptor` for a kind lmcd does not map (or a
    pickle, which is never loaded) and `DescriptorError` for a malformed
    descriptor or one whose view does not fit the memory it names.
    """
    if len(data) > MAX_DESCRIPTOR:
        raise DescriptorError(f"tensor descriptor of {len(data)} bytes")
    # Pickle protocol 2+ opens with PROTO (0x80, version); a MessagePack
    # empty map is a lone 0x80.
    if len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5:
        raise UnsupportedDescriptor(
            "pickle",
            "pickled tensor handles (lmcache 0.5.5 and older) are never "
            "unpickled; use an lmcache 0.5.6 client",
        )
    try:
        desc = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as e:
        raise DescriptorError(f"bad tensor descriptor: {e}") from e
    if isinstance(desc, _Cuda):
        return _cuda(desc)
    if isinstance(desc, _CpuShm):
        return _cpu_shm(desc)
    kind, message = _REFUSED[type(desc)]
    raise UnsupportedDescriptor(kind, message)


def _view_bytes(meta: _Metadata) -> tuple[int, int]:
    return view_bytes(meta.dtype, meta.shape, meta.stride, meta.storage_offset)


def view_bytes(
    dtype: str,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    storage_offset: int,
) -> tuple[int, int]:
    """A strided view's itemsize and exclusive byte end within its storage
    (also for lmcache 0.4's pickled wrappers, which carry the same view).
    Raises `DescriptorError` for an unknown dtype, an empty or mismatched
    shape, or a view past `MAX_TENSOR_BYTES`."""
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        raise DescriptorError(f"unknown or unsupported dtype {dtype!r}")
    if not shape:
        raise DescriptorError("a KV tensor needs at least one dimension")
    if len(stride) != len(shape):
        raise DescriptorError(f"{len(stride)} strides for a {len(shape)}-d shape")
    if 0 in shape:
        raise DescriptorError(f"empty KV tensor (shape {list(shape)})")
    last = storage_offset
    for size, step in zip(shape, stride, strict=True):
        last += (size - 1) * step
    end = (last + 1) * itemsize
    # Python ints do not overflow; this keeps later arithmetic sane.
    if end > MAX_TENSOR_BYTES:
        raise DescriptorError(f"tensor view ends at byte {end}")
    return itemsize, end


def _cuda(desc: _Cuda) -> CudaTensorRef:
    meta = desc.metadata
    _, end = _view_bytes(meta)
    device, _, storage_bytes = desc.handle[0], desc.handle[1], desc.handle[2]
    if not 0 <= device < MAX_DEVICE_INDEX:
        raise DescriptorError(f"CUDA device index {device} out of range")
    if end > storage_bytes:
        raise DescriptorError(
            f"tensor view ends at byte {end}, past its {storage_bytes}-byte storage"
        )
    if not meta.device_uuid:
        raise DescriptorError("CUDA descriptor without a device UUID")
    return CudaTensorRef(
        handle=tuple(desc.handle),
        dtype=meta.dtype,
        shape=meta.shape,
        device=None,
        device_uuid=meta.device_uuid,
        stride=meta.stride,
        storage_offset=meta.storage_offset,
    )


def _cpu_shm(desc: _CpuShm) -> HostTensorRef:
    meta = desc.metadata
    return shm_tensor(
        desc.shm_name,
        desc.nbytes,
        meta.dtype,
        meta.shape,
        meta.stride,
        meta.storage_offset,
    )


def shm_tensor(
    shm_name: str,
    nbytes: int,
    dtype: str,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    storage_offset: int,
) -> HostTensorRef:
    """The host tensor of a strided view into the POSIX shared-memory
    segment `shm_name` of `nbytes` bytes (lmcache's `cpu_shm` descriptor of
    0.5.6, its pickled `CpuShmTensorWrapper` of 0.4.7). Raises
    `DescriptorError` for a bad name or a view outside the segment."""
    itemsize, end = view_bytes(dtype, shape, stride, storage_offset)
    if nbytes > MAX_TENSOR_BYTES:
        raise DescriptorError(f"shared-memory segment of {nbytes} bytes")
    if end > nbytes:
        raise DescriptorError(
            f"tensor view ends at byte {end}, past its {nbytes}-byte segment"
        )
    return HostTensorRef(
        path=f"{SHM_ROOT}/{_shm_file(shm_name)}",
        offset=storage_offset * itemsize,
        shape=shape,
        dtype=dtype,
        stride=stride,
    )


def _shm_file(shm_name: str) -> str:
    """The file under /dev/shm of a POSIX shared-memory name ("/name"):
    exactly one path component, as `shm_open` requires."""
    name = shm_name.removeprefix("/")
    if (
        not name
        or len(name) > MAX_SHM_NAME
        or "/" in name
        or "\x00" in name
        or name in (".", "..")
    ):
        raise DescriptorError(f"bad shared-memory name {shm_name!r}")
    return name
