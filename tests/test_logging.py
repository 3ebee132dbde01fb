"""What the daemon logs: one warning line per failed request, naming the
request and the reason (limits by the flag that sets them); a traceback
only for a bug, at error level; rate-limited debug lines per request type;
a start-up summary of a few lines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import trio

from lmcd.client import Client
from lmcd.config import Config
from lmcd.daemon import Daemon
from lmcd.errors import TransferError
from lmcd.reqlog import RequestDebugLog, describe, human_bytes
from lmcd.scheduler import TransferScheduler
from lmcd.shmkv import SharedKVCache
from lmcd.storage import StorageManager
from lmcd.wire.lmcache03 import RequestType
from lmcd.wire.types import CacheKey, Lookup, Noop, Store
from lmcd_backends.pinned_cpu import PinnedCpuTier
from tests.fakes import ArenaTier, FakeClock

EVENT = b"\x5a" * 64
MiB = 1 << 20
BLOCKS = 16  # blocks per 256-token chunk of 16-token blocks
INSTANCE = 7


def keys(n: int, model: str = "m") -> list[dict[str, Any]]:
    return [
        {"model_name": model, "world_size": 1, "worker_id": 0, "chunk_hash": bytes([i])}
        for i in range(n)
    ]


@pytest.fixture
def kv() -> Iterator[SharedKVCache]:
    """An MLA cache whose 256-token chunks are exactly 1 MiB (4 layers x 256
    tokens x 512 x 2 bytes), with room for 16 chunks."""
    cache = SharedKVCache.create(
        "mla", num_layers=4, num_blocks=16 * BLOCKS, block_size=16, dim=512
    )
    yield cache
    cache.close()


def lmcd_records(
    caplog: pytest.LogCaptureFixture, level: int = logging.WARNING
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith(("lmcd", "lmcd_backends")) and r.levelno >= level
    ]


async def with_daemon(
    config: Config,
    body: Callable[[int], Any],
    caplog: pytest.LogCaptureFixture,
    level: int = logging.WARNING,
) -> tuple[Daemon, Any]:
    """Run an in-process daemon; capture what `body(port)` (in a thread)
    makes it log at `level` and above (not what start-up logs)."""
    daemon = Daemon(config)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(daemon.run)
            port = int(endpoint.rsplit(":", 1)[1])
            caplog.clear()
            with caplog.at_level(level):
                result = await trio.to_thread.run_sync(body, port)
            nursery.cancel_scope.cancel()
    return daemon, result


def config(**kw: Any) -> Config:
    return Config(host="127.0.0.1", port=0, **{"cpu_buffer_size": 0.01, **kw})


def store(kv: SharedKVCache, n: int, model: str = "m") -> Callable[[int], Any]:
    def body(port: int) -> Any:
        with Client("127.0.0.1", port) as client:
            client.call(RequestType.REGISTER_KV_CACHE, INSTANCE, kv.register_payload())
            reply = client.call(
                RequestType.STORE,
                keys(n, model),
                INSTANCE,
                list(range(n * BLOCKS)),
                EVENT,
            )
            client.call(RequestType.UNREGISTER_KV_CACHE, INSTANCE)
            return reply

    return body


def the_one_warning(caplog: pytest.LogCaptureFixture) -> str:
    """The single lmcd line at warning level or above; fails on more, on
    an error, or on a traceback."""
    records = lmcd_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.levelno == logging.WARNING
    assert not record.exc_info
    return record.getMessage()


# -- failed requests: one warning naming the request and the reason ------------


async def test_chunk_larger_than_a_segment_names_segment_mb(
    kv: SharedKVCache, caplog: pytest.LogCaptureFixture
) -> None:
    # 1 MiB chunks are not larger than 1 MiB segments: make them 2 MiB.
    with SharedKVCache.create(
        "mla", num_layers=8, num_blocks=4 * BLOCKS, block_size=16, dim=512
    ) as big:
        _, reply = await with_daemon(config(segment_mb=1), store(big, 2), caplog)
    assert reply == [EVENT, False]
    assert the_one_warning(caplog) == (
        f"STORE of 2 chunks from GPU ID {INSTANCE} (model 'm') failed: "
        "a 2 MiB chunk is larger than a segment (--segment-mb 1)"
    )


async def test_chunk_larger_than_the_buffer_names_cpu_buffer_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 16 MiB chunks in a 10 MiB buffer (of 1 GiB segments).
    with SharedKVCache.create(
        "mla", num_layers=64, num_blocks=BLOCKS, block_size=16, dim=512
    ) as big:
        _, reply = await with_daemon(config(), store(big, 1), caplog)
    assert reply == [EVENT, False]
    message = the_one_warning(caplog)
    assert message.startswith(f"STORE of 1 chunk from GPU ID {INSTANCE} (model 'm')")
    assert message.endswith(
        "failed: a 16 MiB chunk is larger than the whole buffer "
        "(--cpu-buffer-size 0.01, 10.2 MiB)"
    )


async def test_full_buffer_is_one_warning_naming_the_store(
    kv: SharedKVCache, caplog: pytest.LogCaptureFixture
) -> None:
    # 10 MiB, committed at start-up: 10 of 12 one-MiB chunks fit.
    cfg = config(segment_mb=1, disable_lazy_alloc=True)
    daemon, reply = await with_daemon(cfg, store(kv, 12), caplog)
    assert reply == [EVENT, False]
    assert daemon.storage.statistics().store_refused_chunks == 2
    assert the_one_warning(caplog) == (
        f"STORE of 12 chunks from GPU ID {INSTANCE} (model 'm'): 2 of 12 chunks "
        "not stored: buffer full (--cpu-buffer-size 0.01 GiB): 0 chunks locked "
        "by lookups, 0 pinned by retrieves, 10 being stored"
    )


async def test_all_or_nothing_store_logs_nothing_itself(
    kv: SharedKVCache, caplog: pytest.LogCaptureFixture
) -> None:
    """An all-or-nothing STORE (0.4+) that finds no room raises, with the
    reason, for the handler's one warning; the storage logs nothing."""
    cfg = config(segment_mb=1, disable_lazy_alloc=True)
    daemon = Daemon(cfg)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(daemon.run)
            port = int(endpoint.rsplit(":", 1)[1])

            def register(port: int) -> None:
                with Client("127.0.0.1", port) as client:
                    client.call(
                        RequestType.REGISTER_KV_CACHE, INSTANCE, kv.register_payload()
                    )

            await trio.to_thread.run_sync(register, port)
            request = Store(
                tuple(CacheKey("m", 1, 0, bytes([i])) for i in range(12)),
                INSTANCE,
                tuple(range(12 * BLOCKS)),
                EVENT,
            )
            caplog.clear()
            with (
                caplog.at_level(logging.DEBUG),
                pytest.raises(TransferError) as raised,
            ):
                daemon.scheduler.admit_store(request, all_or_nothing=True)
            nursery.cancel_scope.cancel()
    assert not lmcd_records(caplog)
    assert str(raised.value) == (
        "no room for 2 of 12 chunks: buffer full (--cpu-buffer-size 0.01 GiB): "
        "0 chunks locked by lookups, 0 pinned by retrieves, 10 being stored"
    )


async def test_bad_shm_registration_is_one_warning(
    kv: SharedKVCache, caplog: pytest.LogCaptureFixture
) -> None:
    def body(port: int) -> Any:
        payload = kv.register_payload()
        data = msgspec.msgpack.decode(payload[0].data)
        data["path"] = "/dev/shm/lmcd-test-no-such-file"
        payload[0] = msgspec.msgpack.Ext(payload[0].code, msgspec.msgpack.encode(data))
        with Client("127.0.0.1", port) as client:
            reply = client.call(RequestType.REGISTER_KV_CACHE, 8, payload)
            return reply, client.stats()["failed_requests"]

    _, (reply, failed) = await with_daemon(config(), body, caplog)
    assert (reply, failed) == (None, 1)
    message = the_one_warning(caplog)
    assert message.startswith("REGISTER_KV_CACHE for GPU ID 8 (4 layers) failed: ")
    assert "lmcd-test-no-such-file" in message


async def test_store_for_an_unknown_instance_is_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def body(port: int) -> Any:
        with Client("127.0.0.1", port) as client:
            return client.call(
                RequestType.STORE, keys(1), 99, list(range(BLOCKS)), EVENT
            )

    _, reply = await with_daemon(config(), body, caplog)
    assert reply == [EVENT, False]
    assert the_one_warning(caplog) == (
        "STORE of 1 chunk from GPU ID 99 (model 'm') failed: "
        "no KV cache registered for GPU ID 99"
    )


async def test_a_bug_is_one_error_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(TransferScheduler, "admit_store", boom)

    def body(port: int) -> Any:
        with Client("127.0.0.1", port) as client:
            return client.call(
                RequestType.STORE, keys(1), 7, list(range(BLOCKS)), EVENT
            )

    _, reply = await with_daemon(config(), body, caplog)
    assert reply == [EVENT, False]
    records = lmcd_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info is not None
    assert records[0].getMessage() == (
        "STORE of 1 chunk from GPU ID 7 (model 'm') crashed "
        "(a bug in lmcd; please report it)"
    )


def test_expired_locks_name_lock_ttl(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    storage = StorageManager(ArenaTier(1 << 20, 1 << 20), clock, lock_ttl=30)
    ks = [CacheKey("m", 1, 0, bytes([i])) for i in range(3)]
    reservation = storage.reserve(ks, 4096, "t")
    storage.commit(reservation)
    assert storage.lookup(ks, lock=True) == 3
    clock.now = 31.0
    with caplog.at_level(logging.WARNING):
        storage.expire_locks()
    assert the_one_warning(caplog) == (
        "Locks on 3 chunks expired after --lock-ttl 30 s: a client looked them "
        "up with a lock and never retrieved them"
    )


def test_too_large_names_the_limit_and_its_flag() -> None:
    tier = PinnedCpuTier(64 * MiB, segment_bytes=16 * MiB, pin=False)
    assert tier.too_large(16 * MiB) is None
    assert tier.too_large(40 * MiB) == (
        "a 40 MiB chunk is larger than a segment (--segment-mb 16)"
    )
    small = PinnedCpuTier(8 * MiB, segment_bytes=1 << 30, pin=False)
    assert small.too_large(9 * MiB) == (
        "a 9 MiB chunk is larger than the whole buffer "
        "(--cpu-buffer-size 0.00781, 8 MiB)"
    )


# -- debug lines ----------------------------------------------------------------


async def test_debug_adds_one_line_per_request_with_size_and_duration(
    kv: SharedKVCache, caplog: pytest.LogCaptureFixture
) -> None:
    def body(port: int) -> Any:
        with Client("127.0.0.1", port) as client:
            client.call(RequestType.REGISTER_KV_CACHE, INSTANCE, kv.register_payload())
            ids = list(range(2 * BLOCKS))
            client.call(RequestType.STORE, keys(2), INSTANCE, ids, EVENT)
            client.call(RequestType.LOOKUP, keys(3), False)
            client.call(RequestType.RETRIEVE, keys(2), INSTANCE, ids, EVENT)
            client.call(RequestType.UNREGISTER_KV_CACHE, INSTANCE)

    await with_daemon(config(), body, caplog, level=logging.DEBUG)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "lmcd.handlers" and r.levelno == logging.DEBUG
    ]
    assert len(lines) == 5, lines
    store_line, lookup_line, retrieve_line = lines[1:4]
    assert store_line.startswith(
        f"STORE of 2 chunks from GPU ID {INSTANCE} (model 'm'): stored in "
    )
    assert store_line.endswith(" ms, 2 MiB")
    assert lookup_line.startswith("LOOKUP of 3 chunks (model 'm'): 2 of 3 found in ")
    assert retrieve_line.startswith(
        f"RETRIEVE of 2 chunks into GPU ID {INSTANCE} (model 'm'): 2 of 2 copied in "
    )
    assert retrieve_line.endswith(" ms, 2 MiB")


def test_debug_lines_are_rate_limited_per_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    debug = RequestDebugLog(logging.getLogger("lmcd.test"), 5, clock)
    lookup = Lookup((CacheKey("m", 1, 0, b"h"),), False)
    with caplog.at_level(logging.DEBUG, logger="lmcd.test"):
        for _ in range(100):
            debug.answered(Noop(), "OK", 0.001)
            debug.answered(lookup, 1, 0.001)
        assert len(caplog.records) == 10  # 5 of each type
        clock.now = 1.0
        debug.answered(Noop(), "OK", 0.001)
    assert caplog.records[-1].getMessage() == (
        "NOOP: OK in 1.00 ms (95 similar lines suppressed)"
    )


def test_request_descriptions_are_bounded() -> None:
    request = Store(
        tuple(CacheKey("x" * 10, 1, 0, bytes([i])) for i in range(200)),
        3,
        tuple(range(3200)),
        EVENT,
    )
    assert describe(request) == "STORE of 200 chunks from GPU ID 3 (model 'xxxxxxxxxx')"
    assert human_bytes(40 * MiB) == "40 MiB"
    assert human_bytes(1536 * MiB) == "1.5 GiB"
    assert human_bytes(100) == "100 B"


# -- start-up ---------------------------------------------------------------------


async def test_startup_is_a_few_lines_whatever_the_segments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 64 segments of 1 MiB, committed at start-up.
    cfg = config(cpu_buffer_size=1 / 16, segment_mb=1, disable_lazy_alloc=True)
    daemon = Daemon(cfg)
    with caplog.at_level(logging.INFO), trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(daemon.run)
            nursery.cancel_scope.cancel()
    started = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.INFO and "stopped" not in r.getMessage()
    ]
    assert len(started) <= 5, started
    text = "\n".join(started)
    names = ", ".join(d.name for d in daemon.handlers.router.dialects)
    assert "lmcache-0.4.6" in names  # --dialect auto
    assert f"listening on {endpoint} for {names} (detected per connection)" in text
    assert "(64 segments)" in text
    assert "CPU buffer: 0.06 GiB of host memory in segments of 1 MiB" in text
