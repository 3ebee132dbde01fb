"""The daemon's memory: tier failures answered, not fatal; only memory that
was obtained is reported; start-up refuses what the machine cannot back."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import trio

from lmcd.client import Client
from lmcd.config import Config
from lmcd.daemon import Daemon
from lmcd.errors import ConfigError
from lmcd.shmkv import SharedKVCache
from lmcd.wire.lmcache03 import RequestType
from lmcd_backends.pinned_cpu import PinnedCpuTier, available_memory
from tests.conftest import Server, start_server

GiB = 1 << 30
EVENT = b"\x5a" * 64
CHUNK_BLOCKS = 256 // 16


def keys(n: int, model: str) -> list[dict[str, Any]]:
    return [
        {"model_name": model, "world_size": 1, "worker_id": 0, "chunk_hash": bytes([i])}
        for i in range(n)
    ]


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def too_much() -> float:
    available = available_memory()
    assert available is not None
    return round(available[0] * 2 / GiB, 1)


async def with_daemon(config: Config, body: Callable[[int], Any]) -> Any:
    """Run an in-process daemon; call `body(port)` in a thread; stop."""
    daemon = Daemon(config)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(daemon.run)
            port = int(endpoint.rsplit(":", 1)[1])
            result = await trio.to_thread.run_sync(body, port)
            nursery.cancel_scope.cancel()
    return result


def store_twice(port: int, fail_first: list[bool]) -> dict[str, Any]:
    """Register a host KV cache; STORE two chunks (which fail while
    `fail_first[0]`), then the same STORE again."""
    out: dict[str, Any] = {}
    with (
        Client("127.0.0.1", port) as client,
        SharedKVCache.create(
            "mla", num_layers=1, num_blocks=64, block_size=16, dim=16, dtype="float16"
        ) as kv,
    ):
        client.call(RequestType.REGISTER_KV_CACHE, 7, kv.register_payload())
        ks = keys(2, "tier-failure")
        ids = list(range(2 * CHUNK_BLOCKS))
        out["first"] = client.call(RequestType.STORE, ks, 7, ids, EVENT)
        out["stats"] = client.stats()
        fail_first[0] = False
        out["second"] = client.call(RequestType.STORE, ks, 7, ids, EVENT)
        out["lookup"] = client.call(RequestType.LOOKUP, ks, False)
        client.call(RequestType.UNREGISTER_KV_CACHE, 7)
    return out


async def test_memory_error_mid_store_is_an_answered_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_allocate = PinnedCpuTier.allocate
    failing = [True]
    calls = [0]

    def allocate(self: PinnedCpuTier, nbytes: int) -> Any:
        calls[0] += 1
        if failing[0] and calls[0] == 2:  # the STORE's second chunk
            raise MemoryError("the OS refused a segment")
        return real_allocate(self, nbytes)

    monkeypatch.setattr(PinnedCpuTier, "allocate", allocate)
    config = Config(host="127.0.0.1", port=0, cpu_buffer_size=0.01)
    with caplog.at_level(logging.WARNING):
        out = await with_daemon(config, lambda port: store_twice(port, failing))
    assert out["first"] == [EVENT, False]
    stats = out["stats"]
    assert (stats["reserved_chunks"], stats["chunks"]) == (0, 0)
    assert stats["used_bytes"] == 0
    assert stats["failed_requests"] == 1
    assert out["second"] == [EVENT, True]  # the keys were not left blocked
    assert out["lookup"] == [True, True]
    failures = [r for r in caplog.records if "memory tier failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.WARNING
    assert all(not r.exc_info for r in caplog.records)


async def test_segments_the_os_refuses_are_not_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def prepare(self: PinnedCpuTier, size: int, **kw: Any) -> Any:
        raise MemoryError(f"cannot allocate a {size}-byte segment: ENOMEM")

    monkeypatch.setattr(PinnedCpuTier, "prepare", prepare)

    def body(port: int) -> dict[str, Any]:
        with (
            Client("127.0.0.1", port) as client,
            SharedKVCache.create(
                "mla", num_layers=1, num_blocks=64, block_size=16, dim=16
            ) as kv,
        ):
            client.call(RequestType.REGISTER_KV_CACHE, 8, kv.register_payload())
            ids = list(range(CHUNK_BLOCKS))
            reply = client.call(RequestType.STORE, keys(1, "x"), 8, ids, EVENT)
            return {"reply": reply, "stats": client.stats()}

    config = Config(host="127.0.0.1", port=0, cpu_buffer_size=0.01)
    with caplog.at_level(logging.WARNING):
        out = await with_daemon(config, body)
    assert out["reply"] == [EVENT, False]  # refused, honestly
    stats = out["stats"]
    assert (stats["allocated_bytes"], stats["segments"], stats["used_bytes"]) == (
        0,
        0,
        0,
    )
    assert stats["buffer_prepare_failures"] >= 1
    assert stats["reserved_chunks"] == 0
    grow = [r for r in caplog.records if "Cannot grow the CPU buffer" in r.getMessage()]
    assert len(grow) == 1  # retried only after a back-off
    assert all(not r.exc_info for r in caplog.records)


async def test_disable_lazy_alloc_that_cannot_commit_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def prepare(self: PinnedCpuTier, size: int, **kw: Any) -> Any:
        raise MemoryError(f"cannot allocate a {size}-byte segment: ENOMEM")

    monkeypatch.setattr(PinnedCpuTier, "prepare", prepare)
    daemon = Daemon(
        Config(host="127.0.0.1", port=0, cpu_buffer_size=0.01, disable_lazy_alloc=True)
    )
    with trio.fail_after(30), pytest.raises(ConfigError) as caught:
        await daemon.run()
    message = str(caught.value)
    assert "--disable-lazy-alloc" in message
    assert "ENOMEM" in message
    assert "\n" not in message


def test_disable_lazy_alloc_commits_the_whole_buffer(
    server_factory: list[Server],
) -> None:
    s = start_server(
        "--cpu-buffer-size", "0.25", "--segment-mb", "64", "--disable-lazy-alloc"
    )
    server_factory.append(s)
    assert "Allocated and committed 0.25 GiB of host memory" in s.log()
    assert vm_rss(s.proc.pid) >= GiB // 4
    with Client("127.0.0.1", s.port) as client:
        stats = client.stats()
    assert stats["allocated_bytes"] == stats["capacity_bytes"] == GiB // 4


def test_a_buffer_larger_than_the_machine_is_refused() -> None:
    command = [sys.executable, "-m", "lmcd", "serve", "--host", "127.0.0.1"]
    result = subprocess.run(
        [*command, "--port", "0", "--cpu-buffer-size", str(too_much())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--cpu-buffer-size" in lines[0]
    assert "--allow-overcommit" in lines[0]
    assert "available" in lines[0]


def test_allow_overcommit_starts_with_a_warning(server_factory: list[Server]) -> None:
    size = too_much()
    s = start_server(
        "--cpu-buffer-size",
        str(size),
        "--allow-overcommit",
        "--segment-mb",
        "64",
        "--prepare-ahead-mb",
        "0",
    )
    server_factory.append(s)
    assert "starting anyway (--allow-overcommit)" in s.log()
    with Client("127.0.0.1", s.port) as client:
        stats = client.stats()
    # Lazy: only the lead (two segments) is obtained, not the buffer.
    assert stats["capacity_bytes"] == int(size * GiB) // 4096 * 4096
    assert 0 < stats["allocated_bytes"] <= 128 << 20


async def test_a_slow_segment_never_stalls_the_control_plane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Segments that take a second each to obtain (a loaded machine, pinning)
    are prepared in worker threads: NOOPs and STOREs are answered meanwhile."""
    import time

    real_prepare = PinnedCpuTier.prepare
    prepared: list[int] = []

    def prepare(self: PinnedCpuTier, size: int, **kw: Any) -> Any:
        if prepared:  # the first segment comes at once: start-up waits for it
            time.sleep(1.0)
        prepared.append(size)
        return real_prepare(self, size, **kw)

    monkeypatch.setattr(PinnedCpuTier, "prepare", prepare)

    def body(port: int) -> dict[str, Any]:
        slowest = 0.0
        with (
            Client("127.0.0.1", port) as client,
            SharedKVCache.create(
                "mla", num_layers=1, num_blocks=64, block_size=16, dim=512
            ) as kv,  # 256 KiB chunks
        ):
            client.call(RequestType.REGISTER_KV_CACHE, 9, kv.register_payload())
            ids = list(range(4 * CHUNK_BLOCKS))
            t0 = time.monotonic()
            # 6 MiB: more than the first 4 MiB segment holds.
            for r in range(6):
                ks = [
                    {**k, "chunk_hash": bytes([r, i])}
                    for i, k in enumerate(keys(4, "slow"))
                ]
                client.call(RequestType.STORE, ks, 9, ids, EVENT)
            store_seconds = time.monotonic() - t0
            for _ in range(20):
                t = time.monotonic()
                client.call(RequestType.NOOP)
                slowest = max(slowest, time.monotonic() - t)
            stats = client.stats()
        return {"store_s": store_seconds, "noop_s": slowest, "stats": stats}

    config = Config(host="127.0.0.1", port=0, cpu_buffer_size=16 / 1024, segment_mb=4)
    out = await with_daemon(config, body)
    assert out["store_s"] < 0.9  # six STOREs did not wait for a segment
    assert out["noop_s"] < 0.5
    assert out["stats"]["preparing_bytes"] > 0  # still preparing meanwhile
