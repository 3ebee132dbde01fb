"""Pickled lists of CPU tensors, read and written without torch and without
running anything the pickle names (lmcache 0.4.6's engine-driven transport).

An lmcache 0.4.6 worker without a GPU sends each stored range as
`pickle.dumps(list_of_chunk_tensors)` (COMMIT_STORE) and reads retrieved
chunks with `pickle.loads` (PREPARE_RETRIEVE). lmcache's server feeds what
it receives to `pickle.loads`: whoever reaches its port runs code. Here a
tensor pickle is read by what amounts to a parser of the one shape torch
gives it:

    [torch._utils._rebuild_tensor_v2(                   (v3: + dtype)
         torch.storage._load_from_bytes(<legacy torch.save of one storage>),
         offset, size, stride, False, collections.OrderedDict()), ...]

- `load_tensors` reads it through `lmcd.wire.pickleguard`, which first
  walks the opcodes (`pickletools.genops`, which builds nothing): the size
  and opcode count are bounded, only data opcodes, calls (REDUCE) and
  global lookups are allowed, memo indices and nesting are bounded. Then an
  unpickler whose `find_class` knows only the names above, each mapped to a
  stand-in defined here (torch is never imported), reads it. The stand-ins
  only check their arguments and slice bytes: `_load_from_bytes` parses the
  legacy `torch.save` container (magic number, protocol 1001, system info,
  one storage by persistent id, its byte count and bytes) with the same two
  checks for each pickle in it, and `_rebuild_tensor_v2/v3` check that the
  view is a C-contiguous tensor inside its storage. The result is a tuple
  of `ChunkData`: dtype, shape and the bytes themselves.
- `dump_tensors` writes chunks in that same form, so that a client's plain
  `pickle.loads` rebuilds them as tensors; it is byte-level output, no
  pickler runs. (float8 chunks go as a byte storage and
  `_rebuild_tensor_v3`: torch 2.13 writes them with an `UntypedStorage`
  that its own loader cannot read back.)

Sans-IO: no trio, zmq or torch.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from lmcd.errors import ProtocolError
from lmcd.transfer.layouts import DTYPE_SIZES
from lmcd.wire import pickleguard as pg
from lmcd.wire.types import ChunkData

MAX_TENSORS = 4096
"""Tensors one pickle may hold (a store of 4096 chunks is a 1M-token range
at chunk size 256)."""
MAX_MEMO = 1 << 16
MAX_NESTING = 8
"""How deep a tensor pickle's containers may nest (torch's: 3)."""
MAX_DIMS = 8
OPS_PER_TENSOR = 64
"""Opcodes one tensor may take in the list (torch writes about 30)."""
MAX_SMALL_PICKLE = 4096
"""Bytes of each bookkeeping pickle inside a storage blob (about 300)."""

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
"""torch's legacy serialization magic number (`torch.serialization`)."""
PROTOCOL_VERSION = 1001

# The storage classes of torch's legacy format and the dtype they hold;
# dtypes without one (float8) are pickled as an UntypedStorage of bytes
# and `_rebuild_tensor_v3`, which names the dtype.
STORAGE_CLASSES = {
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "ShortStorage": "int16",
    "IntStorage": "int32",
    "LongStorage": "int64",
}
_CLASS_OF = {dtype: name for name, dtype in STORAGE_CLASSES.items()}
_UNTYPED = "UntypedStorage"

# Opcodes of a torch tensor pickle (protocols 2-5): values, containers,
# the memo, global lookups and calls (REDUCE: only of the stand-ins below).
# Nothing that builds an arbitrary instance (INST, OBJ, NEWOBJ*, BUILD),
# extension registries, persistent ids or out-of-band buffers.
_DATA_OPS = pg.FRAMING | pg.SCALARS | {"BINBYTES8"} | pg.MEMO | pg.TUPLES | pg.LISTS
OUTER_OPS = _DATA_OPS | {"GLOBAL", "STACK_GLOBAL", "REDUCE"}
"""What the list of tensors may use."""
# The legacy container's small pickles: its system-info dict, the storage
# by persistent id (the only place a persistent id is allowed) and the key
# list. Protocol 2: GLOBAL, never STACK_GLOBAL; no calls at all.
_INNER_OPS = _DATA_OPS | pg.DICTS | {"GLOBAL"}
_STORAGE_OPS = _INNER_OPS | {"BINPERSID"}


def _rules(opcodes: frozenset[str], limit: int, max_ops: int = 1024) -> pg.PickleRules:
    return pg.PickleRules(
        opcodes,
        max_bytes=limit,
        max_memo=MAX_MEMO,
        max_nesting=MAX_NESTING,
        max_ops=max_ops,
    )


_INNER = _rules(_INNER_OPS, MAX_SMALL_PICKLE)
_STORAGE = _rules(_STORAGE_OPS, MAX_SMALL_PICKLE)


# -- stand-ins -------------------------------------------------------------------


class _Dtype(str):
    """A torch dtype, by name (what `torch.bfloat16` unpickles to here)."""

    __slots__ = ()


@attrs.frozen
class _StorageClass:
    dtype: str  # "uint8" for UntypedStorage
    untyped: bool


@attrs.frozen
class _StorageRef:
    key: str
    kind: _StorageClass
    numel: int


@attrs.frozen
class _Storage:
    """A storage's bytes (a view into the pickle's own bytes)."""

    dtype: str
    untyped: bool
    data: memoryview


class _Hooks:
    """An empty `collections.OrderedDict()` (a tensor's backward hooks)."""

    __slots__ = ()


def _ordered_dict(*args: object) -> _Hooks:
    if args:
        raise ProtocolError("tensor backward hooks must be empty")
    return _Hooks()


@attrs.define(slots=True)
class _Limits:
    max_tensors: int
    tensors: int = 0


def _storage_ref(pid: object) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
        raise ProtocolError("storage persistent id is not ('storage', ...)")
    _, kind, key, location, numel, view = pid
    if not isinstance(kind, _StorageClass):
        raise ProtocolError("storage of an unknown class")
    if not isinstance(key, str) or len(key) > 64:
        raise ProtocolError("storage key must be a short string")
    if location != "cpu":
        raise ProtocolError(f"storage on {location!r}, not the CPU")
    if type(numel) is not int or numel < 0:
        raise ProtocolError("storage size must be a non-negative int")
    if view is not None:
        raise ProtocolError("storage views are not allowed")
    return _StorageRef(key, kind, numel)


_STORAGE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch", name): _StorageClass(dtype, untyped=False)
    for name, dtype in STORAGE_CLASSES.items()
} | {("torch.storage", _UNTYPED): _StorageClass("uint8", untyped=True)}


def _load_from_bytes(blob: object) -> _Storage:
    """Parse torch's legacy `torch.save` of one storage (what a storage
    pickles to): five pickles, then the storage's element count (int64) and
    bytes, and nothing after them."""
    if not isinstance(blob, bytes):
        raise ProtocolError("_load_from_bytes takes bytes")
    stream = io.BytesIO(blob)
    if pg.load(stream, _INNER, {}) != MAGIC_NUMBER:
        raise ProtocolError("storage blob without torch's magic number")
    if pg.load(stream, _INNER, {}) != PROTOCOL_VERSION:
        raise ProtocolError("storage blob of another protocol version")
    info = pg.load(stream, _INNER, {})
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise ProtocolError("storage blob not from a little-endian machine")
    ref = pg.load(stream, _STORAGE, _STORAGE_GLOBALS, _storage_ref)
    if not isinstance(ref, _StorageRef):
        raise ProtocolError("storage blob does not hold one storage")
    keys = pg.load(stream, _INNER, {})
    if keys != [ref.key]:
        raise ProtocolError("storage blob lists other storages than the one it holds")
    header = stream.read(8)
    if len(header) != 8 or struct.unpack("<q", header)[0] != ref.numel:
        raise ProtocolError("storage blob's element count does not match")
    itemsize = DTYPE_SIZES[ref.kind.dtype]
    start = stream.tell()
    end = start + ref.numel * itemsize
    if end != len(blob):
        raise ProtocolError(
            f"storage blob holds {len(blob) - start} bytes for {ref.numel * itemsize}"
        )
    return _Storage(ref.kind.dtype, ref.kind.untyped, memoryview(blob)[start:end])


def _rebuild(
    limits: _Limits,
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    dtype: object,
    metadata: object,
) -> ChunkData:
    limits.tensors += 1
    if limits.tensors > limits.max_tensors:
        raise ProtocolError(f"over {limits.max_tensors} tensors")
    if not isinstance(storage, _Storage):
        raise ProtocolError("tensor without a storage")
    if requires_grad is not False or not isinstance(hooks, _Hooks):
        raise ProtocolError("tensor with autograd state")
    if metadata not in (None, {}):
        raise ProtocolError("tensor with metadata")
    if type(offset) is not int or offset < 0:
        raise ProtocolError("tensor offset must be a non-negative int")
    shape = _dims(size, "size")
    strides = _dims(stride, "stride")
    if len(strides) != len(shape):
        raise ProtocolError(f"{len(strides)} strides for {len(shape)} dimensions")
    expected = 1
    for dim, step in zip(reversed(shape), reversed(strides), strict=True):
        # torch ignores the stride of a dimension of size 1 when it calls a
        # tensor contiguous; so does this.
        if dim > 1 and step != expected:
            raise ProtocolError("only C-contiguous tensors are accepted")
        expected *= dim
    itemsize = DTYPE_SIZES[str(dtype)]
    start = offset * itemsize
    end = start + math.prod(shape) * itemsize
    if end > len(storage.data):
        raise ProtocolError("tensor reaches past its storage")
    return ChunkData(str(dtype), shape, storage.data[start:end])


def _dims(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS:
        raise ProtocolError(f"tensor {what} must be a tuple of at most {MAX_DIMS}")
    if not all(type(d) is int and 0 <= d < 1 << 48 for d in value):
        raise ProtocolError(f"tensor {what} must hold non-negative ints")
    return value


def _outer_globals(limits: _Limits) -> dict[tuple[str, str], Any]:
    def v2(
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        hooks: object,
        metadata: object = None,
    ) -> ChunkData:
        if not isinstance(storage, _Storage) or storage.untyped:
            raise ProtocolError("_rebuild_tensor_v2 needs a typed storage")
        dtype = storage.dtype
        return _rebuild(
            limits, storage, offset, size, stride, requires_grad, hooks, dtype, metadata
        )

    def v3(
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        hooks: object,
        dtype: object,
        metadata: object = None,
    ) -> ChunkData:
        if not isinstance(storage, _Storage):
            raise ProtocolError("_rebuild_tensor_v3 needs a storage")
        if not isinstance(dtype, _Dtype):
            raise ProtocolError("_rebuild_tensor_v3 needs a dtype")
        return _rebuild(
            limits, storage, offset, size, stride, requires_grad, hooks, dtype, metadata
        )

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): v2,
        ("torch._utils", "_rebuild_tensor_v3"): v3,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
        ("collections", "OrderedDict"): _ordered_dict,
    }
    for dtype in DTYPE_SIZES:
        allowed["torch", dtype] = _Dtype(dtype)
    return allowed


def load_tensors(
    data: bytes | memoryview, *, max_bytes: int, max_tensors: int = MAX_TENSORS
) -> tuple[ChunkData, ...]:
    """The C-contiguous CPU tensors of a pickled list of them, as
    `ChunkData` (their bytes are views into the copies the unpickler made
    of the pickle's byte strings).

    Raises `ProtocolError` for a pickle over `max_bytes` bytes or over
    `max_tensors` tensors, and for anything but a list of such tensors,
    before any object but the stand-ins of this module is built.
    """
    if len(data) > max_bytes:
        raise ProtocolError(f"pickle of {len(data)} bytes, over {max_bytes}")
    limits = _Limits(max_tensors)
    rules = _rules(OUTER_OPS, max_bytes, OPS_PER_TENSOR * max_tensors + 16)
    value = pg.load(data, rules, _outer_globals(limits))
    if not isinstance(value, list) or not all(isinstance(t, ChunkData) for t in value):
        raise ProtocolError("pickle does not hold a list of tensors")
    if len(value) > max_tensors:  # one tensor may be listed many times
        raise ProtocolError(f"over {max_tensors} tensors")
    return tuple(value)


# -- writing -----------------------------------------------------------------------


def _int_op(value: int) -> bytes:
    if 0 <= value < 1 << 8:
        return b"K" + bytes([value])
    if 0 <= value < 1 << 16:
        return b"M" + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _str_op(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _tuple_op(values: Sequence[int]) -> bytes:
    return b"(" + b"".join(_int_op(v) for v in values) + b"t"


_BLOB_HEAD = (
    pickle.dumps(MAGIC_NUMBER, protocol=2)
    + pickle.dumps(PROTOCOL_VERSION, protocol=2)
    + pickle.dumps(
        {
            "protocol_version": PROTOCOL_VERSION,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        },
        protocol=2,
    )
)


def _blob_parts(chunk: ChunkData, key: str) -> list[bytes | memoryview]:
    """torch's legacy `torch.save` of the chunk's storage, in parts."""
    # A dtype without a storage class of its own (float8) goes as bytes,
    # which `_rebuild_tensor_v3` reinterprets: torch itself writes an
    # UntypedStorage there, which its own loader then cannot read.
    cls = _CLASS_OF.get(chunk.dtype, "ByteStorage")
    storage_class = b"ctorch\n" + cls.encode() + b"\n"
    numel = len(chunk.data) // DTYPE_SIZES[STORAGE_CLASSES[cls]]
    storage = (
        b"\x80\x02("
        + _str_op("storage")
        + storage_class
        + _str_op(key)
        + _str_op("cpu")
        + _int_op(numel)
        + b"NtQ."  # view_metadata None, TUPLE, BINPERSID, STOP
    )
    keys = pickle.dumps([key], protocol=2)
    return [_BLOB_HEAD, storage, keys, struct.pack("<q", numel), chunk.data]


def dump_tensors(chunks: Iterable[ChunkData]) -> bytes:
    """A pickle that `pickle.loads` (with torch installed) turns into the
    list of the chunks as CPU tensors, contiguous, in the form torch itself
    writes. Raises `ValueError` for a chunk whose bytes do not match its
    shape and dtype or that is over 4 GiB."""
    parts: list[bytes | memoryview] = [
        b"\x80\x03](",
    ]  # PROTO 3, list, MARK
    for i, chunk in enumerate(chunks):
        itemsize = DTYPE_SIZES[chunk.dtype]
        if len(chunk.data) != math.prod(chunk.shape) * itemsize:
            raise ValueError(f"chunk {i} has {len(chunk.data)} bytes for its shape")
        blob = _blob_parts(chunk, str(i))
        size = sum(len(p) for p in blob)
        if size >= 1 << 32:
            raise ValueError(f"chunk {i} is over 4 GiB")
        strides = []
        step = 1
        for dim in reversed(chunk.shape):
            strides.append(step)
            step *= dim
        untyped = chunk.dtype not in _CLASS_OF
        rebuild = b"_rebuild_tensor_v3" if untyped else b"_rebuild_tensor_v2"
        parts += [
            b"ctorch._utils\n" + rebuild + b"\n(",
            b"ctorch.storage\n_load_from_bytes\nB" + struct.pack("<I", size),
            *blob,
            b"\x85R",  # TUPLE1, REDUCE: the storage
            _int_op(0),
            _tuple_op(chunk.shape),
            _tuple_op(strides[::-1]),
            b"\x89ccollections\nOrderedDict\n)R",  # False, OrderedDict()
        ]
        if untyped:
            parts.append(b"ctorch\n" + chunk.dtype.encode() + b"\n")
        parts.append(b"tR")  # TUPLE, REDUCE: the tensor
    parts.append(b"e.")  # APPENDS, STOP
    return b"".join(parts)
