"""A restricted unpickler for lmcache's pickled tensor-handle wrappers.

A wrapper pickle is read by `lmcd.wire.pickleguard` under `WRAPPER_RULES`:
at most `MAX_PICKLE_BYTES` bytes, only the opcodes in `ALLOWED_OPCODES`,
memo indices below `MAX_MEMO`, containers nested at most `MAX_NESTING`
deep; then `find_class` admits only the globals of the allowlist and maps
each to a harmless stand-in defined here (lmcache and torch are never
imported): a `WrapperClass` (lmcache 0.3's `CudaIPCWrapper`, 0.4's
wrappers) -> a stand-in that records the attributes lmcache sets;
`torch.Size` -> a function returning a tuple of ints; `torch.<dtype>` ->
the dtype's name.

Every failure, whatever the unpickler raised, is a `ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from lmcd.errors import ProtocolError
from lmcd.wire import pickleguard as pg
from lmcd.wire.descriptors import UnsupportedDescriptor, shm_tensor, view_bytes
from lmcd.wire.types import CudaTensorRef, HostTensorRef, TensorRef

# A real 0.3 wrapper pickles to 330-380 bytes (two 64-byte handles, a shape,
# a device UUID); newer wrappers add a stride tuple and an offset.
MAX_PICKLE_BYTES = 4096
# The 0.3 wrapper memoizes 23 objects.
MAX_MEMO = 256
# The 0.3 wrapper nests 3 deep: wrapper <- state dict <- handle tuple.
MAX_NESTING = 8

TORCH_DTYPES = frozenset(
    {
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "half",
        "float",
        "double",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
    }
)
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "double": "float64"}
_MAX_DIMS = 8
_MAX_DIM = 1 << 48
_MAX_UUID = 128

# What protocols 2-5 emit for the wrappers; nothing that calls arbitrary
# code (INST, OBJ, NEWOBJ_EX, EXT*, PERSID), mutates lists or sets, or
# carries out-of-band buffers.
ALLOWED_OPCODES = (
    pg.FRAMING
    | pg.SCALARS
    | pg.MEMO
    | pg.TUPLES
    | pg.DICTS
    | {"GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD"}
)


WRAPPER_RULES = pg.PickleRules(
    ALLOWED_OPCODES,
    max_bytes=MAX_PICKLE_BYTES,
    max_memo=MAX_MEMO,
    max_nesting=MAX_NESTING,
    max_ops=MAX_PICKLE_BYTES,
)


@attrs.frozen
class WrapperClass:
    """A pickled tensor-handle class that `load_wrapper` may build.

    `fields` are the attributes its pickled state may set; `convert` turns
    them into a `TensorRef` or raises `ProtocolError`.
    """

    module: str
    name: str
    fields: frozenset[str]
    convert: Callable[[dict[str, Any]], TensorRef]


class _DtypeName(str):
    """A torch dtype, by name (what `torch.bfloat16` unpickles to here)."""

    __slots__ = ()


class _WrapperState:
    """Stand-in for a wrapper class: a bag of attributes, checked against the
    `WrapperClass` it stands for. No `__init__`: NEWOBJ calls only `__new__`
    (and refuses arguments), so `state` stays None unless BUILD sets it."""

    wrapper: WrapperClass
    state: dict[str, Any] | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not set(state) <= self.wrapper.fields:
            raise ProtocolError(f"{self.wrapper.name} state has unexpected fields")
        self.state = dict(state)


def _torch_size(dims: object) -> tuple[int, ...]:
    if not isinstance(dims, tuple) or len(dims) > _MAX_DIMS:
        raise ProtocolError("torch.Size takes a short tuple")
    if not all(type(d) is int and 0 <= d < _MAX_DIM for d in dims):
        raise ProtocolError("torch.Size dimensions must be non-negative ints")
    return dims


def allowed_globals(wrappers: Iterable[WrapperClass]) -> dict[tuple[str, str], Any]:
    """The globals a pickle of one of `wrappers` may name, each mapped to
    its stand-in: the wrappers, `torch.Size` and the torch dtypes."""
    allowed: dict[tuple[str, str], Any] = {("torch", "Size"): _torch_size}
    for dtype in TORCH_DTYPES:
        allowed["torch", dtype] = _DtypeName(_DTYPE_ALIASES.get(dtype, dtype))
    for w in wrappers:
        stand_in = type(f"_{w.name}State", (_WrapperState,), {"wrapper": w})
        allowed[w.module, w.name] = stand_in
    return allowed


def load_wrapper(
    data: bytes, allowed: Mapping[tuple[str, str], Any], what: str
) -> TensorRef:
    """Unpickle one wrapper of the classes in `allowed` (from
    `allowed_globals`) into a `TensorRef`. Raises `ProtocolError` for
    anything else, before any object other than the stand-ins is built."""
    obj = pg.load(data, WRAPPER_RULES, allowed)
    if not isinstance(obj, _WrapperState):
        raise ProtocolError(f"pickle does not hold a {what}")
    if obj.state is None:
        raise ProtocolError(f"pickled {obj.wrapper.name} has no state")
    return obj.wrapper.convert(obj.state)


def _scalar(value: object) -> bool:
    return value is None or type(value) in (bool, int, bytes)


def _cuda_ipc_ref(state: dict[str, Any]) -> CudaTensorRef:
    handle = state.get("handle")
    dtype = state.get("dtype")
    shape = state.get("shape")
    device = state.get("device")
    device_uuid = state.get("device_uuid")
    if not isinstance(handle, tuple) or len(handle) != 8:
        raise ProtocolError("CudaIPCWrapper.handle must be the 8-tuple of _share_cuda_")
    if not all(_scalar(v) for v in handle):
        raise ProtocolError("CudaIPCWrapper.handle holds ints, bytes and bools only")
    if not isinstance(dtype, _DtypeName):
        raise ProtocolError("CudaIPCWrapper.dtype must be a torch dtype")
    if not isinstance(shape, tuple) or not shape:
        raise ProtocolError("CudaIPCWrapper.shape must be a torch.Size")
    if device is not None and (type(device) is not int or device < 0):
        raise ProtocolError("CudaIPCWrapper.device must be a device ordinal")
    if device_uuid is not None and (
        not isinstance(device_uuid, str) or len(device_uuid) > _MAX_UUID
    ):
        raise ProtocolError("CudaIPCWrapper.device_uuid must be a short string")
    if (device is None) == (device_uuid is None):
        raise ProtocolError("CudaIPCWrapper needs exactly one of device, device_uuid")
    return CudaTensorRef(
        handle=handle,
        dtype=str(dtype),
        shape=shape,
        device=device,
        device_uuid=device_uuid,
    )


# lmcache 0.3.10-0.3.13. Newer dialects add their classes (0.4's
# CudaIPCWrapper with stride/storage_offset, RawCudaIPCWrapper,
# CpuShmTensorWrapper) as further `WrapperClass` entries of their own table.
CUDA_IPC_WRAPPER_03 = WrapperClass(
    module="lmcache.v1.multiprocess.custom_types",
    name="CudaIPCWrapper",
    fields=frozenset({"handle", "dtype", "shape", "device", "device_uuid"}),
    convert=_cuda_ipc_ref,
)
WRAPPER_MODULE = CUDA_IPC_WRAPPER_03.module
WRAPPER_NAME = CUDA_IPC_WRAPPER_03.name
_ALLOWED_03 = allowed_globals([CUDA_IPC_WRAPPER_03])


def load_cuda_ipc_wrapper(data: bytes) -> TensorRef:
    """Decode a pickled lmcache 0.3 `CudaIPCWrapper` into a `CudaTensorRef`.

    Raises `ProtocolError` for anything that is not exactly such a wrapper,
    before any object other than the stand-ins above is built.
    """
    return load_wrapper(data, _ALLOWED_03, "CudaIPCWrapper")


# -- lmcache 0.4.x ---------------------------------------------------------------
#
# Since 0.3.14 a wrapper records the tensor's view (`shape` a plain tuple,
# `stride`, `storage_offset`) and `device_uuid`; 0.4 adds two subclasses
# that share ext code 1: `RawCudaIPCWrapper` (a driver IPC handle of a
# buffer torch did not allocate: TRT-LLM's) and `CpuShmTensorWrapper` (a CPU
# tensor in a POSIX shared-memory segment, the worker's KV cache on a
# machine without a GPU: lmcd's host path).

_VIEW_FIELDS = frozenset({"handle", "dtype", "shape", "stride", "storage_offset"})


def _view(
    state: dict[str, Any], what: str
) -> tuple[str, tuple[int, ...], tuple[int, ...], int]:
    """The checked (dtype, shape, stride, storage_offset) of a 0.4 wrapper."""
    dtype = state.get("dtype")
    shape = state.get("shape")
    stride = state.get("stride")
    offset = state.get("storage_offset")
    if not isinstance(dtype, _DtypeName):
        raise ProtocolError(f"{what}.dtype must be a torch dtype")
    if type(offset) is not int or not 0 <= offset < _MAX_DIM:
        raise ProtocolError(f"{what}.storage_offset must be a non-negative int")
    return (
        str(dtype),
        _dims(shape, what, "shape"),
        _dims(stride, what, "stride"),
        offset,
    )


def _dims(value: object, what: str, name: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not 0 < len(value) <= _MAX_DIMS:
        raise ProtocolError(f"{what}.{name} must be a tuple of 1..{_MAX_DIMS}")
    if not all(type(d) is int and 0 <= d < _MAX_DIM for d in value):
        raise ProtocolError(f"{what}.{name} must hold non-negative ints")
    return value


def _device_uuid(state: dict[str, Any], what: str) -> str:
    uuid = state.get("device_uuid")
    if not isinstance(uuid, str) or not uuid or len(uuid) > _MAX_UUID:
        raise ProtocolError(f"{what}.device_uuid must be a short string")
    return uuid


def _cuda_ipc_ref_04(state: dict[str, Any]) -> CudaTensorRef:
    what = "CudaIPCWrapper"
    handle = state.get("handle")
    if not isinstance(handle, tuple) or len(handle) != 8:
        raise ProtocolError(f"{what}.handle must be the 8-tuple of _share_cuda_")
    if not all(_scalar(v) for v in handle):
        raise ProtocolError(f"{what}.handle holds ints, bytes and bools only")
    dtype, shape, stride, offset = _view(state, what)
    uuid = _device_uuid(state, what)
    device, storage_bytes = handle[0], handle[2]
    if type(device) is not int or not 0 <= device < 1024:
        raise ProtocolError(f"{what}: CUDA device index {device!r} out of range")
    if type(storage_bytes) is not int:
        raise ProtocolError(f"{what}: storage size must be an int")
    _, end = view_bytes(dtype, shape, stride, offset)
    if end > storage_bytes:
        raise ProtocolError(
            f"{what}: view ends at byte {end}, past its {storage_bytes}-byte storage"
        )
    return CudaTensorRef(
        handle=handle,
        dtype=dtype,
        shape=shape,
        device=None,
        device_uuid=uuid,
        stride=stride,
        storage_offset=offset,
    )


def _raw_cuda_ipc(state: dict[str, Any]) -> TensorRef:
    what = "RawCudaIPCWrapper"
    if not isinstance(state.get("_ipc_handle_reserved"), bytes):
        raise ProtocolError(f"{what}._ipc_handle_reserved must be bytes")
    if type(state.get("_nbytes")) is not int:
        raise ProtocolError(f"{what}._nbytes must be an int")
    _view(state, what)
    _device_uuid(state, what)
    raise UnsupportedDescriptor(
        "cuda_raw",
        "RawCudaIPCWrapper (driver IPC handles of buffers torch did not "
        "allocate, TRT-LLM's) is not supported; lmcd maps torch's CUDA IPC "
        "(CudaIPCWrapper) and CPU shared memory (CpuShmTensorWrapper)",
    )


def _cpu_shm_ref(state: dict[str, Any]) -> HostTensorRef:
    what = "CpuShmTensorWrapper"
    if state.get("handle") is not None:
        raise ProtocolError(f"{what}.handle must be None")
    name = state.get("shm_name")
    nbytes = state.get("nbytes")
    if not isinstance(name, str):
        raise ProtocolError(f"{what}.shm_name must be a string")
    if type(nbytes) is not int or nbytes < 0:
        raise ProtocolError(f"{what}.nbytes must be a non-negative int")
    dtype, shape, stride, offset = _view(state, what)
    if state.get("device_uuid") != "cpu":
        raise ProtocolError(f"{what}.device_uuid must be 'cpu'")
    return shm_tensor(name, nbytes, dtype, shape, stride, offset)


_CUSTOM_TYPES = "lmcache.v1.multiprocess.custom_types"
CUDA_IPC_WRAPPER_04 = WrapperClass(
    module=_CUSTOM_TYPES,
    name="CudaIPCWrapper",
    fields=_VIEW_FIELDS | {"device_uuid"},
    convert=_cuda_ipc_ref_04,
)
RAW_CUDA_IPC_WRAPPER_04 = WrapperClass(
    module=_CUSTOM_TYPES,
    name="RawCudaIPCWrapper",
    fields=_VIEW_FIELDS | {"device_uuid", "_ipc_handle_reserved", "_nbytes"},
    convert=_raw_cuda_ipc,
)
CPU_SHM_TENSOR_WRAPPER_04 = WrapperClass(
    module="lmcache.v1.platform.cpu.shm",
    name="CpuShmTensorWrapper",
    fields=_VIEW_FIELDS | {"device_uuid", "shm_name", "nbytes"},
    convert=_cpu_shm_ref,
)
_ALLOWED_04 = allowed_globals(
    [CUDA_IPC_WRAPPER_04, RAW_CUDA_IPC_WRAPPER_04, CPU_SHM_TENSOR_WRAPPER_04]
)


def load_wrapper_04(data: bytes) -> TensorRef:
    """Decode a pickled lmcache 0.4.x tensor wrapper: a `CudaIPCWrapper`
    into a `CudaTensorRef` (with its view), a `CpuShmTensorWrapper` into a
    `HostTensorRef` on its `/dev/shm` segment.

    Raises `UnsupportedDescriptor` for a well-formed `RawCudaIPCWrapper`
    and `ProtocolError` for anything that is not exactly one of these
    wrappers, before any object other than the stand-ins is built.
    """
    return load_wrapper(data, _ALLOWED_04, "lmcache 0.4 tensor wrapper")
