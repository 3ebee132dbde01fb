"""A restricted unpickler for lmcache's pickled `CudaIPCWrapper`.

Unpickling bytes from a socket is remote code execution. `find_class` admits
exactly three kinds of global and maps each to a harmless stand-in defined
here (lmcache and torch are never imported):

- `lmcache.v1.multiprocess.custom_types.CudaIPCWrapper` -> `_WrapperState`,
  which only records the attributes that lmcache sets;
- `torch.Size` -> a function that returns a tuple of ints;
- `torch.<dtype>` for the dtypes below -> the dtype's name.

Any other global is refused before an object is built.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from lmcd.errors import ProtocolError
from lmcd.wire.types import CudaTensorRef

WRAPPER_MODULE = "lmcache.v1.multiprocess.custom_types"
WRAPPER_NAME = "CudaIPCWrapper"

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
_WRAPPER_FIELDS = frozenset({"handle", "dtype", "shape", "device", "device_uuid"})
_MAX_DIMS = 8


class _DtypeName(str):
    """A torch dtype, by name (what `torch.bfloat16` unpickles to here)."""

    __slots__ = ()


class _WrapperState:
    """Stand-in for lmcache's CudaIPCWrapper: a bag of validated attributes."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not set(state) <= _WRAPPER_FIELDS:
            raise ProtocolError("CudaIPCWrapper state has unexpected fields")
        self.state = dict(state)


def _torch_size(dims: object) -> tuple[int, ...]:
    if not isinstance(dims, tuple) or len(dims) > _MAX_DIMS:
        raise ProtocolError("torch.Size takes a short tuple")
    if not all(type(d) is int and d >= 0 for d in dims):
        raise ProtocolError("torch.Size dimensions must be non-negative ints")
    return dims


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == WRAPPER_MODULE and name == WRAPPER_NAME:
            return _WrapperState
        if module == "torch" and name == "Size":
            return _torch_size
        if module == "torch" and name in TORCH_DTYPES:
            return _DtypeName(_DTYPE_ALIASES.get(name, name))
        raise ProtocolError(f"pickle refers to {module}.{name}, which is not allowed")

    def persistent_load(self, pid: object) -> Any:
        raise ProtocolError("pickle persistent ids are not allowed")


def load_cuda_ipc_wrapper(data: bytes) -> CudaTensorRef:
    """Decode a pickled `CudaIPCWrapper` into a `CudaTensorRef`.

    Raises `ProtocolError` for anything that is not exactly such a wrapper,
    before any object other than the stand-ins above is built.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as e:  # pickle raises many kinds; all mean "bad payload"
        raise ProtocolError(f"cannot unpickle CudaIPCWrapper: {e}") from e
    if not isinstance(obj, _WrapperState):
        raise ProtocolError("pickle does not hold a CudaIPCWrapper")
    return _to_ref(obj.state)


def _to_ref(state: dict[str, Any]) -> CudaTensorRef:
    handle = state.get("handle")
    dtype = state.get("dtype")
    shape = state.get("shape")
    device = state.get("device")
    device_uuid = state.get("device_uuid")
    if not isinstance(handle, tuple) or len(handle) != 8:
        raise ProtocolError("CudaIPCWrapper.handle must be the 8-tuple of _share_cuda_")
    if not isinstance(dtype, _DtypeName):
        raise ProtocolError("CudaIPCWrapper.dtype must be a torch dtype")
    if not isinstance(shape, tuple) or not shape:
        raise ProtocolError("CudaIPCWrapper.shape must be a torch.Size")
    if device is not None and (type(device) is not int or device < 0):
        raise ProtocolError("CudaIPCWrapper.device must be a device ordinal")
    if device_uuid is not None and not isinstance(device_uuid, str):
        raise ProtocolError("CudaIPCWrapper.device_uuid must be a string")
    if (device is None) == (device_uuid is None):
        raise ProtocolError("CudaIPCWrapper needs exactly one of device, device_uuid")
    return CudaTensorRef(
        handle=handle,
        dtype=str(dtype),
        shape=shape,
        device=device,
        device_uuid=device_uuid,
    )
