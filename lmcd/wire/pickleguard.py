"""Reading a pickle from a client without letting it run anything or
allocate without bound: one validator, an allowlist per use (sans-IO).

Unpickling bytes from a socket is remote code execution, and even without
a single global a pickle can make the unpickler allocate without bound (one
`LONG_BINPUT` with index 2**32-1 sizes the memo to 4 billion slots). So
every pickle lmcd reads (lmcache 0.3/0.4's tensor-handle wrappers,
`lmcd.wire.unpickle`; lmcache 0.4.6's pickled tensors,
`lmcd.wire.tensorpickle`) goes through `load`, which

1. walks its opcodes with `pickletools.genops` (which builds no objects,
   `check_opcodes`): at most `PickleRules.max_bytes` bytes and `max_ops`
   opcodes, only the use's `opcodes`, memo indices below `max_memo` and
   only ones stored before, containers nested at most `max_nesting` deep
   and one object at STOP (a small model of the unpickler's stack tracks
   each object's depth instead of the object); then
2. unpickles it with `find_class` admitting only the use's globals, each a
   stand-in the caller defines (the real classes are never imported), and
   persistent ids only where the use gives a loader for them.

Every failure, whatever the unpickler raised, is a `ProtocolError`.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Callable, Mapping
from typing import IO, Any

import attrs

from lmcd.errors import ProtocolError

# Opcode groups to build allowlists from.
FRAMING = frozenset({"PROTO", "FRAME", "STOP", "MARK"})
SCALARS = frozenset(
    {
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "SHORT_BINBYTES",
        "BINBYTES",
    }
)
MEMO = frozenset(
    {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET"}
)
TUPLES = frozenset({"EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
DICTS = frozenset({"EMPTY_DICT", "DICT", "SETITEM", "SETITEMS"})
LISTS = frozenset({"EMPTY_LIST", "APPEND", "APPENDS"})

_PUSH_SCALAR = SCALARS | {"BINBYTES8", "GLOBAL"}
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
# Opcodes that add `n` items (None: those since the MARK) to the object
# below them.
_FILL = {
    "SETITEM": 2,
    "SETITEMS": None,
    "APPEND": 1,
    "APPENDS": None,
    "BUILD": 1,
}

MODELLED = frozenset(
    {
        *_PUSH_SCALAR,
        *_PUT,
        *_GET,
        *_TUPLE_N,
        *_FILL,
        "PROTO",
        "FRAME",
        "STOP",
        "MARK",
        "MEMOIZE",
        "STACK_GLOBAL",
        "EMPTY_TUPLE",
        "EMPTY_DICT",
        "EMPTY_LIST",
        "TUPLE",
        "DICT",
        "REDUCE",
        "NEWOBJ",
        "BINPERSID",
    }
)
"""Every opcode an allowlist may name: those the stack model understands.
None of them calls arbitrary code by itself (INST, OBJ, NEWOBJ_EX, EXT*),
mutates sets or carries out-of-band buffers; calls (REDUCE, NEWOBJ) reach
only the stand-ins `find_class` returns."""


@attrs.frozen
class PickleRules:
    """What one use of pickles allows."""

    opcodes: frozenset[str]
    max_bytes: int
    max_memo: int
    max_nesting: int
    max_ops: int = 1024

    def __attrs_post_init__(self) -> None:
        unknown = self.opcodes - MODELLED
        if unknown:
            raise ValueError(f"opcodes the validator cannot follow: {sorted(unknown)}")


def check_opcodes(data: bytes | memoryview | IO[bytes], rules: PickleRules) -> int:
    """Walk one pickle's opcodes without building anything; returns its
    length. Bytes must hold exactly one pickle; a stream is read from its
    position to the STOP.

    Raises `ProtocolError` when the pickle breaks `rules` or is malformed.
    """
    size: int | None = None
    stream: IO[bytes]
    if isinstance(data, bytes | memoryview):
        size = len(data)
        if size > rules.max_bytes:
            raise ProtocolError(f"pickle of {size} bytes, over {rules.max_bytes}")
        stream = io.BytesIO(data)
    else:
        stream = data
    start = stream.tell()
    model = _StackModel(rules)
    ops = pickletools.genops(stream)
    n = 0
    while True:
        try:
            op, arg, pos = next(ops)
        except StopIteration:
            break
        except Exception as e:  # genops raises ValueError and others
            raise ProtocolError(f"malformed pickle: {e}") from e
        n += 1
        if n > rules.max_ops:
            raise ProtocolError(f"pickle of over {rules.max_ops} opcodes")
        if (pos or start) - start > rules.max_bytes:
            raise ProtocolError(f"pickle longer than {rules.max_bytes} bytes")
        model.step(op.name, arg)
    if not model.stopped:
        raise ProtocolError("pickle has no STOP")
    length = stream.tell() - start
    if length > rules.max_bytes:
        raise ProtocolError(f"pickle of {length} bytes, over {rules.max_bytes}")
    if size is not None and length != size:
        # The unpickler stops at STOP; nothing may hide behind it.
        raise ProtocolError(f"pickle has {size - length} bytes after STOP")
    return length


def load(
    data: bytes | memoryview | IO[bytes],
    rules: PickleRules,
    allowed: Mapping[tuple[str, str], Any],
    persistent: Callable[[object], Any] | None = None,
) -> Any:
    """Check one pickle (`check_opcodes`), then unpickle it with only the
    globals in `allowed` (`(module, name)` -> the stand-in to use) and
    persistent ids only through `persistent`. A stream is read from its
    position and left after the pickle.

    Raises `ProtocolError` for anything else, before any object other than
    the stand-ins is built.
    """
    if isinstance(data, bytes | memoryview):
        length = check_opcodes(data, rules)
        stream: IO[bytes] = io.BytesIO(data)
        start = 0
    else:
        stream = data
        start = stream.tell()
        length = check_opcodes(stream, rules)
        stream.seek(start)
    try:
        value = _Unpickler(stream, allowed, persistent).load()
    except ProtocolError:
        raise
    except Exception as e:  # the unpickler raises many kinds; all mean "bad"
        raise ProtocolError(f"cannot unpickle: {e}") from e
    if stream.tell() != start + length:
        raise ProtocolError("pickle read past its opcodes")
    return value


class _Unpickler(pickle.Unpickler):
    def __init__(
        self,
        stream: IO[bytes],
        allowed: Mapping[tuple[str, str], Any],
        persistent: Callable[[object], Any] | None,
    ) -> None:
        super().__init__(stream)
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise ProtocolError(
                f"pickle refers to {module}.{name}, which is not allowed"
            )
        return found

    def persistent_load(self, pid: object) -> Any:
        if self._persistent is None:
            raise ProtocolError("pickle persistent ids are not allowed here")
        return self._persistent(pid)


@attrs.define(slots=True)
class _StackModel:
    """The unpickler's stack and memo, holding each object's nesting depth
    instead of the object."""

    rules: PickleRules
    stack: list[int] = attrs.field(factory=list)
    marks: list[int] = attrs.field(factory=list)
    memo: dict[int, int] = attrs.field(factory=dict)
    stopped: bool = False

    def step(self, name: str, arg: Any) -> None:
        if self.stopped or name not in self.rules.opcodes:
            raise ProtocolError(f"pickle opcode {name} is not allowed")
        if name in _PUSH_SCALAR:
            self.push(0)
        elif name in _PUT:
            self.set_memo(arg)
        elif name == "MEMOIZE":
            self.set_memo(len(self.memo))
        elif name in _GET:
            if arg not in self.memo:
                raise ProtocolError(f"pickle reads memo index {arg}, never stored")
            self.push(self.memo[arg])
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name in ("EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_LIST"):
            self.push(1)
        elif name in ("TUPLE", "DICT"):
            self.push(_nest(self.pop_mark()))
        elif name in _TUPLE_N:
            self.push(_nest(self.pop(_TUPLE_N[name])))
        elif name == "STACK_GLOBAL":
            self.pop(2)
            self.push(0)
        elif name == "BINPERSID":
            self.pop(1)
            self.push(0)
        elif name in ("REDUCE", "NEWOBJ"):
            _, args = self.pop(2)
            self.push(max(args, 1))
        elif name in _FILL:
            n = _FILL[name]
            items = self.pop(n) if n is not None else self.pop_mark()
            (target,) = self.pop(1)
            self.push(max(target, _nest(items)))
        elif name == "STOP":
            if len(self.stack) != 1 or self.marks:
                raise ProtocolError("pickle does not end with one object")
            self.stopped = True
        # PROTO and FRAME only announce what follows.

    def push(self, depth: int) -> None:
        if depth > self.rules.max_nesting:
            raise ProtocolError(f"pickle nests deeper than {self.rules.max_nesting}")
        self.stack.append(depth)

    def pop(self, n: int) -> list[int]:
        stack = self.stack
        if len(stack) - (self.marks[-1] if self.marks else 0) < n:
            raise ProtocolError("pickle stack underflow")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    def pop_mark(self) -> list[int]:
        if not self.marks:
            raise ProtocolError("pickle stack has no mark")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def set_memo(self, index: int) -> None:
        limit = self.rules.max_memo
        if not 0 <= index < limit:
            raise ProtocolError(f"pickle memo index {index} not below {limit}")
        if not self.stack:
            raise ProtocolError("pickle memoizes an empty stack")
        self.memo[index] = self.stack[-1]


def _nest(items: list[int]) -> int:
    return 1 + max(items, default=0)
