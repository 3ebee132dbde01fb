"""The shared pickle validator (`lmcd.wire.pickleguard`); the wrapper and
tensor pickles' own defences are tested with their readers
(tests/test_wire.py, tests/test_lmcache04_wire.py)."""

from __future__ import annotations

import io
import pickle

import pytest

from lmcd.errors import ProtocolError
from lmcd.wire import pickleguard as pg
from lmcd.wire.tensorpickle import load_tensors

RULES = pg.PickleRules(
    pg.FRAMING | pg.SCALARS | pg.MEMO | pg.TUPLES | pg.LISTS,
    max_bytes=4096,
    max_memo=16,
    max_nesting=4,
    max_ops=64,
)


def test_a_plain_value_loads() -> None:
    data = pickle.dumps([1, (2, b"x"), None], protocol=4)
    assert pg.load(data, RULES, {}) == [1, (2, b"x"), None]


def test_the_opcode_count_is_bounded() -> None:
    data = pickle.dumps([None] * 100, protocol=4)
    with pytest.raises(ProtocolError, match="over 64 opcodes"):
        pg.load(data, RULES, {})
    # The tensor reader's bound: 64 opcodes a tensor.
    with pytest.raises(ProtocolError, match="opcodes"):
        load_tensors(data, max_bytes=1 << 20, max_tensors=1)


def test_an_allowlist_names_only_opcodes_the_validator_follows() -> None:
    with pytest.raises(ValueError, match="INST"):
        pg.PickleRules(frozenset({"INST"}), max_bytes=1, max_memo=1, max_nesting=1)


def test_nothing_may_follow_the_pickle_in_bytes_but_may_in_a_stream() -> None:
    one = pickle.dumps((1, 2), protocol=4)
    with pytest.raises(ProtocolError, match="after STOP"):
        pg.load(one + b"N.", RULES, {})
    stream = io.BytesIO(one + one)
    assert pg.load(stream, RULES, {}) == (1, 2)
    assert stream.tell() == len(one)
    assert pg.load(stream, RULES, {}) == (1, 2)


def test_globals_and_persistent_ids_only_as_allowed() -> None:
    data = pickle.dumps(ValueError, protocol=4)
    rules = pg.PickleRules(
        RULES.opcodes | {"STACK_GLOBAL"}, max_bytes=4096, max_memo=16, max_nesting=4
    )
    with pytest.raises(ProtocolError, match=r"builtins\.ValueError"):
        pg.load(data, rules, {})
    assert pg.load(data, rules, {("builtins", "ValueError"): "stand-in"}) == "stand-in"
