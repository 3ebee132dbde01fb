"""The real lmcache 0.4.6 / 0.4.7 vLLM adapters on CPU, wrapped in blocking
calls with timeouts, and the servers they talk to (lmcd or lmcache 0.4's
own, both on loopback).

Needs lmcache 0.4.6 or 0.4.7 (installed with `--no-deps` plus its small
dependency set: `nox -s tests_lmcache046` / `tests_lmcache047`). Servers,
adapter wrappers and the `Rig` are the ones `tests/lmcache05` uses
(`lmcd.benchmarks.lmcache05`, `tests/adapter_rig.py`); what 0.4 takes
differently is spelt out here: the 0.4.6 reference's transfer-mode flag,
the readiness probe (0.4's GET_CHUNK_SIZE), the adapters' call shapes per
release (`Worker` and `Scheduler` below) and the bare client.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, cast

import attrs

from lmcd.benchmarks import lmcache05 as rig05
from lmcd.benchmarks.lmcache05 import (
    REFERENCE,
    KVLayout,
    ServerOptions,
    ServerProcess,
    launch,
    server_command,
    single_rank,
    wait_ready,
    zmq_context,
)
from tests import adapter_rig
from tests.adapter_rig import CHUNK, prompt, rid, untouched

__all__ = [
    "CHUNK",
    "DATA",
    "HANDLE",
    "HEARTBEAT",
    "LAYOUT",
    "TIMEOUT",
    "VERSION",
    "RawClient",
    "Rig",
    "Scheduler",
    "Worker",
    "key",
    "prompt",
    "rid",
    "start_server",
    "stop_and_restart",
    "untouched",
    "zmq_context",
]

VERSION = metadata.version("lmcache")
# lmcache 0.4.7 chooses the transfer path by `lmcache.mp.mp_transfer_mode`;
# 0.4.6 by the tensors' device alone (CPU: the pickled non-GPU context).
HANDLE = "handle"  # 0.4.7: CpuShmTensorWrapper, the server copies
DATA = "data"  # the worker copies: 0.4.7 through the server's pool, 0.4.6 pickles

# HND: lmcache 0.4 reads a vLLM CPU cache so; chunk 16 over blocks of 8.
LAYOUT = KVLayout(
    num_layers=2, num_blocks=16, block_size=8, num_heads=2, head_dim=8, order="HND"
)
TIMEOUT = 10.0
HEARTBEAT = 10.0


# -- servers -----------------------------------------------------------------------


def command_04(
    kind: str, port: int, options: ServerOptions, shm_name: str
) -> list[str]:
    """`server_command` (0.4.7's server takes 0.5.6's flags), except that
    0.4.6's serves one transfer mode, and CPU workers need non_gpu."""
    args = server_command(kind, port, options, shm_name)
    if kind == REFERENCE and VERSION == "0.4.6":
        cut = args.index("--supported-transfer-mode")
        args[cut : cut + 4] = ["--transfer-mode", "non_gpu"]
    return args


def probe_chunk_size(url: str, timeout: float) -> Any:
    """An lmcache 0.4 GET_CHUNK_SIZE to `url`; `TimeoutError` without an answer."""
    ctx = zmq_context()
    try:
        client = RawClient.connect(url, ctx)
        try:
            return client.call("GET_CHUNK_SIZE", [], timeout)
        finally:
            client.close()
    finally:
        ctx.term()


def start_server(
    kind: str, options: ServerOptions, log_dir: Path, *, timeout: float = 60.0
) -> ServerProcess:
    """Start lmcd or lmcache's own server (kind "reference") and return once
    it answers an lmcache 0.4 GET_CHUNK_SIZE with `options.chunk_size`.
    Raises `LmcdError` with the server's log otherwise."""
    return rig05.start_server(
        kind,
        options,
        log_dir,
        start_timeout=timeout,
        command=command_04,
        probe=probe_chunk_size,
    )


def stop_and_restart(
    server: ServerProcess,
    options: ServerOptions,
    *,
    down: Callable[[], bool],
    timeout: float = 30.0,
) -> None:
    """Stop `server`, wait (up to `timeout` s) until `down()` says its
    clients noticed, then start it again on the same port with the same
    command line (`server.proc` is the new process)."""
    args = list(cast(list[str], server.proc.args))  # a server_command line
    code = server.stop()
    assert code == 0, server.log_tail()
    deadline = time.monotonic() + timeout
    while not down():
        if time.monotonic() > deadline:
            raise TimeoutError("the clients did not notice the server went away")
        time.sleep(0.05)
    server.proc = launch(args, server.log_path, append=True)
    wait_ready(server, options, probe_chunk_size, start_timeout=timeout)


# -- the real client -----------------------------------------------------------------


@attrs.define
class RawClient:
    """lmcache's bare `MessageQueueClient` (one frame per payload)."""

    mq: Any

    @classmethod
    def connect(cls, url: str, context: Any) -> RawClient:
        from lmcache.v1.multiprocess.mq import MessageQueueClient

        return cls(MessageQueueClient(url, context))

    def submit(self, name: str, payloads: list[Any]) -> Any:
        from lmcache.v1.multiprocess.protocol import RequestType, get_response_class

        rtype = RequestType[name]
        return self.mq.submit_request(rtype, payloads, get_response_class(rtype))

    def call(self, name: str, payloads: list[Any], timeout: float = TIMEOUT) -> Any:
        return self.submit(name, payloads).result(timeout)

    def close(self) -> None:
        self.mq.close()


def key(
    model: str,
    tokens: Sequence[int],
    request_id: str,
    *,
    world_size: int = 1,
    **where: Any,
) -> Any:
    """An lmcache 0.4 `IPCCacheEngineKey`; `where`: `start`, `end`,
    `worker_id` as `key_fields` takes them."""
    from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey

    fields = rig05.key_fields(model, tokens, request_id, **where)
    return IPCCacheEngineKey(world_size=world_size, **fields)


def _stop_heartbeat(adapter: Any) -> None:
    # 0.4's adapters leave their heartbeat thread running on shutdown.
    heartbeat = getattr(adapter, "_heartbeat", None)
    if heartbeat is not None:
        heartbeat.stop()


# Instance ids no two workers share: 0.4's default is the pid, the same for
# every worker of a test process.
_instance_ids = itertools.count(1_000_000 + os.getpid() * 1000)


@attrs.define
class Worker(rig05.Worker):
    """lmcache 0.4's `LMCacheMPWorkerAdapter`, as 0.4.6 and 0.4.7 take it."""

    @classmethod
    def _config(
        cls, timeout: float, heartbeat: float | None, mode: str | None
    ) -> dict[str, Any]:
        # 0.4.6 has no transfer-mode setting (the device decides).
        mode = None if VERSION == "0.4.6" else mode
        return rig05.adapter_config(timeout, heartbeat, mode)

    @classmethod
    def _adapter(
        cls, url: str, context: Any, model: str, layout: KVLayout, config: Any
    ) -> Any:
        adapter = super()._adapter(url, context, model, layout, config)
        adapter.instance_id = next(_instance_ids)
        return adapter

    @classmethod
    def _register(cls, adapter: Any, kv: Any, layout: KVLayout) -> None:
        # 0.4.6: the caches alone; 0.4.7 adds the attention groups; neither
        # takes 0.5.6's layout hints (they read a CPU cache as HND).
        if VERSION == "0.4.6":
            adapter.register_kv_caches(kv)
        else:
            adapter.register_kv_caches(kv, layout.engine_group_infos())

    @classmethod
    def _block_ids(cls, blocks: Sequence[int]) -> list[Any]:
        # 0.4.6: one flat list; 0.4.7: one list per KV cache group.
        return list(blocks) if VERSION == "0.4.6" else [list(blocks)]

    def _event(self) -> Any:
        # 0.4's adapters have no `create_recorded_event`; on CPU they take
        # the stub device's interprocess event.
        from lmcache.v1.platform.cpu.stub_cpu_device import StubEvent

        event = StubEvent(interprocess=True)
        event.record()
        return event

    def shutdown(self) -> None:
        _stop_heartbeat(self.adapter)
        self.adapter.shutdown()


@attrs.define
class Scheduler(rig05.Scheduler):
    """lmcache 0.4's `LMCacheMPSchedulerAdapter`: one server URL, its own
    `mq_client` (not recorded: `settle` has nothing to wait for), no
    `shutdown` of its own."""

    @classmethod
    def _adapter(
        cls, url: str, context: Any, model: str, block_size: int, config: Any
    ) -> tuple[Any, None]:
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPSchedulerAdapter,
        )

        adapter = LMCacheMPSchedulerAdapter(
            url, context, model, block_size, single_rank(), extra_config=config
        )
        return adapter, None

    def shutdown(self) -> None:
        _stop_heartbeat(self.adapter)
        self.adapter.mq_client.close()


@attrs.define
class Rig(adapter_rig.Rig):
    """lmcache 0.4's adapters (the adapter's default transfer mode unless
    told otherwise, heartbeats every `HEARTBEAT` s) and its bare client."""

    layout: KVLayout = LAYOUT
    worker_class: ClassVar[type[rig05.Worker]] = Worker
    scheduler_class: ClassVar[type[rig05.Scheduler]] = Scheduler
    timeout: ClassVar[float] = TIMEOUT
    heartbeat: ClassVar[float | None] = HEARTBEAT

    def _raw_client(self) -> RawClient:
        """A bare client that, like every lmcache adapter and tool, asks
        GET_CHUNK_SIZE first: where lmcd detects among 0.4 releases, a
        client's first message tells 0.4.6 from 0.4.7 (`lmcd.wire.lmcache04`)."""
        c = RawClient.connect(self.url, self.context)
        try:
            assert c.call("GET_CHUNK_SIZE", []) == CHUNK
        except BaseException:
            c.close()
            raise
        return c
