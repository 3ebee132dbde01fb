"""Every simple operation through lmcache 0.5.6's bare request client (one
frame per parameter, the frozen legacy operation ids): the reply the
reference server gives, with its exact type."""

from __future__ import annotations

from typing import Any

import pytest

from lmcd.benchmarks.lmcache05 import LMCD, server_key
from tests.lmcache05.helpers import CHUNK, TIMEOUT, prompt, rid

UNKNOWN_INSTANCE = 4242424242


def records() -> list[Any]:
    from lmcache.v1.multiprocess.custom_types import BlockAllocationRecord

    return [BlockAllocationRecord(rid("x"), [3, 4], list(range(16)))]


SIMPLE = [
    ("get_chunk_size", (), CHUNK),
    ("noop", (), "OK"),
    ("ping", (None,), True),
    ("clear", (False,), None),
    ("end_session", ("never-seen",), None),
    ("query_prefetch_status", ("never-seen",), 0),
    ("wait_prefetch_status", ("never-seen", 0.1), 0),
    ("unregister_kv_cache", (UNKNOWN_INSTANCE,), None),
    ("unregister_kv_cache_engine_driven_context", (UNKNOWN_INSTANCE,), None),
]


@pytest.mark.parametrize(
    ("op", "args", "expected"),
    SIMPLE,
    ids=[f"{op}{args}" for op, args, _ in SIMPLE],
)
def test_simple_operation(
    rig: Any, op: str, args: tuple[Any, ...], expected: Any
) -> None:
    reply = getattr(rig.raw(), op)(*args).result(TIMEOUT)
    assert reply == expected
    assert type(reply) is type(expected)


def test_ping_of_an_unknown_instance(rig: Any, server: Any) -> None:
    """lmcache's server answers True to any ping. lmcd answers the first
    ping of an instance it holds no registration for False, then True: the
    edge on which lmcache 0.5's heartbeat registers again (after a daemon
    restart; tests/lmcache05/test_restart.py)."""
    raw = rig.raw()
    first = raw.ping(UNKNOWN_INSTANCE).result(TIMEOUT)
    assert first is (server.kind != LMCD)
    assert raw.ping(UNKNOWN_INSTANCE).result(TIMEOUT) is True


def test_get_experimental(rig: Any) -> None:
    """A list of capability names (a worker waits for it at start-up)."""
    reply = rig.raw().get_experimental().result(TIMEOUT)
    assert isinstance(reply, list)
    assert all(isinstance(name, str) for name in reply)


def test_report_block_allocation(rig: Any) -> None:
    reply = rig.raw().report_block_allocation(1, rig.model, records())
    assert reply.result(TIMEOUT) is None


def test_store_and_retrieve_of_an_unknown_instance_fail(rig: Any) -> None:
    raw = rig.raw()
    key = server_key(rig.model, prompt(CHUNK), rid("x"))
    stored = raw.store(key, UNKNOWN_INSTANCE, [[1, 2]], b"stub")
    assert tuple(stored.result(TIMEOUT)) == (b"", False)
    got = raw.retrieve(key, UNKNOWN_INSTANCE, [[1, 2]], b"stub", 0)
    assert tuple(got.result(TIMEOUT)) == (b"", False)


def test_lookup_of_an_unregistered_model_finds_nothing(rig: Any) -> None:
    raw = rig.raw()
    load = rid("load")
    key = server_key(rig.model, prompt(2 * CHUNK), load, worker_id=None)
    assert raw.lookup(key, 1).result(TIMEOUT) is None
    assert raw.query_prefetch_status(load).result(TIMEOUT) == 0
