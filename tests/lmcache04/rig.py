"""The real lmcache 0.4.6 / 0.4.7 vLLM adapters on CPU, wrapped in blocking
calls with timeouts, and the servers they talk to (lmd or lmcache 0.4.7's
own, both on loopback).

Needs lmcache 0.4.6 or 0.4.7 (installed with `--no-deps` plus its small
dependency set: `nox -s tests_lmcache046` / `tests_lmcache047`). The
servers are started as `lmcd.benchmarks.lmcache05` starts them (the 0.4.7
server takes the same flags as 0.5.6's); only the readiness probe speaks
0.4.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import torch

from lmcd.benchmarks.lmcache05 import (
    NO_TELEMETRY,
    REFERENCE,
    KVLayout,
    ServerOptions,
    ServerProcess,
    server_command,
)
from lmcd.errors import LmcdError
from lmcd.spawn import free_port

VERSION = metadata.version("lmcache")
# lmcache 0.4.7 chooses the transfer path by `lmcache.mp.mp_transfer_mode`;
# 0.4.6 by the tensors' device alone (CPU: the pickled non-GPU context).
HANDLE = "handle"  # 0.4.7: CpuShmTensorWrapper, the server copies
DATA = "data"  # the worker copies: 0.4.7 through the server's pool, 0.4.6 pickles

# Chunk 16 (the servers' --chunk-size) over blocks of 8 tokens: each chunk
# spans two blocks, so both sides must gather and scatter across blocks.
LAYOUT = KVLayout(num_layers=2, num_blocks=16, block_size=8, num_heads=2, head_dim=8)


def make_kv(layout: KVLayout, seed: int | None = None) -> dict[str, torch.Tensor]:
    """A CPU KV cache as vLLM's CPU backend lays it out and lmcache 0.4
    reads it on CPU (HND: `[2, blocks, heads, block size, head size]`),
    one tensor per layer: zeros, or random values from `seed`."""
    shape = (
        2,
        layout.num_blocks,
        layout.num_heads,
        layout.block_size,
        layout.head_dim,
    )
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    kv = {}
    for i in range(layout.num_layers):
        if gen is None:
            t = torch.zeros(shape, dtype=layout.dtype)
        else:
            t = torch.randn(shape, generator=gen).to(layout.dtype)
        kv[f"model.layers.{i}.self_attn.attn"] = t
    return kv


CHUNK = 16
TIMEOUT = 10.0

_instance_ids = itertools.count(1_000_000 + os.getpid() * 1000)
_prompts = itertools.count(1)
_requests = itertools.count(1)


def prompt(n_tokens: int) -> list[int]:
    """A prompt no other test uses: its chunk hashes are new to the server."""
    first = next(_prompts)
    return [first * 100_003 % 150_000, *range(7, 7 + n_tokens - 1)]


def rid(name: str) -> str:
    """A request id no other test uses (servers keep a session per id)."""
    return f"{name}-{next(_requests)}"


# -- servers -----------------------------------------------------------------------


def start_server(
    kind: str, options: ServerOptions, log_dir: Path, *, timeout: float = 60.0
) -> ServerProcess:
    """Start lmcd or lmcache's own server (kind "reference") and return once
    it answers an lmcache 0.4 GET_CHUNK_SIZE with `options.chunk_size`.
    Raises `LmcdError` with the server's log otherwise."""
    port = free_port()
    shm_name = f"lmcache_l1_pool_lmcd_t{os.getpid()}_{port}"
    log_path = log_dir / f"{kind}-{port}.log"
    if kind == REFERENCE and VERSION == "0.4.6":
        # 0.4.6's server serves one transfer mode; CPU workers need non_gpu.
        args = server_command(kind, port, options, shm_name)
        cut = args.index("--supported-transfer-mode")
        args[cut : cut + 4] = ["--transfer-mode", "non_gpu"]
    else:
        args = server_command(kind, port, options, shm_name)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NO_TELEMETRY, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(kind, port, proc, log_path, shm_name)
    try:
        wait_ready(server, options, timeout)
    except BaseException:
        server.stop()
        raise
    return server


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
    args = list(server.proc.args)  # type: ignore[arg-type]
    code = server.stop()
    assert code == 0, server.log_tail()
    deadline = time.monotonic() + timeout
    while not down():
        if time.monotonic() > deadline:
            raise TimeoutError("the clients did not notice the server went away")
        time.sleep(0.05)
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NO_TELEMETRY, "PYTHONUNBUFFERED": "1"},
        )
    wait_ready(server, options, timeout)


def wait_ready(server: ServerProcess, options: ServerOptions, timeout: float) -> None:
    """Wait until `server` answers GET_CHUNK_SIZE with the chunk size."""
    wait_listening(server, timeout)
    size = probe_chunk_size(server.url, timeout=10.0)
    if size != options.chunk_size:
        raise LmcdError(f"{server.kind} answered GET_CHUNK_SIZE with {size!r}")


def wait_listening(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise LmcdError(
                f"{server.kind} exited with {server.proc.returncode}; its log:\n"
                f"{server.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise LmcdError(
                    f"{server.kind} is not listening after {timeout} s; its log:\n"
                    f"{server.log_tail()}"
                ) from None
            time.sleep(0.05)


def zmq_context() -> Any:
    import zmq

    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


def probe_chunk_size(url: str, timeout: float) -> Any:
    ctx = zmq_context()
    try:
        client = RawClient.connect(url, ctx)
        try:
            return client.call("GET_CHUNK_SIZE", [], timeout)
        finally:
            client.close()
    finally:
        ctx.term()


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
    start: int = 0,
    end: int | None = None,
    worker_id: int | None = 0,
    world_size: int = 1,
) -> Any:
    """An lmcache 0.4 `IPCCacheEngineKey`."""
    from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey

    return IPCCacheEngineKey(
        model_name=model,
        world_size=world_size,
        worker_id=worker_id,
        token_ids=tuple(tokens),
        start=start,
        end=len(tokens) if end is None else end,
        request_id=request_id,
    )


def single_rank() -> Any:
    """The `ParallelStrategy` of one non-MLA worker (TP 1, PP 1); its
    fields differ between 0.4.6 and 0.4.7."""
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        ParallelStrategy,
    )

    values = {
        "use_mla": False,
        "kv_world_size": 1,
        "kv_worker_id": 0,
        "actual_world_size": 1,
        "actual_worker_id": 0,
        "vllm_world_size": 1,
        "vllm_worker_id": 0,
        "tp_size": 1,
        "pp_size": 1,
    }
    names = [f.name for f in dataclasses.fields(ParallelStrategy)]
    return ParallelStrategy(**{n: values[n] for n in names})


def _extra(timeout: float, heartbeat: float, mode: str | None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "lmcache.mp.mq_timeout": timeout,
        "lmcache.mp.heartbeat_interval": heartbeat,
    }
    if mode is not None and VERSION != "0.4.6":
        extra["lmcache.mp.mp_transfer_mode"] = mode
    return extra


def _event() -> Any:
    from lmcache.v1.platform.cpu.stub_cpu_device import StubEvent

    event = StubEvent(interprocess=True)
    event.record()
    return event


def _wait(future: Any, timeout: float, what: str) -> Any:
    try:
        return future.result(timeout)
    except TimeoutError:
        raise TimeoutError(f"no answer to {what} within {timeout} s") from None


@attrs.define
class Worker:
    """lmcache 0.4's `LMCacheMPWorkerAdapter` with a registered CPU KV cache
    (its instance id made unique: 0.4 uses the pid); store and retrieve
    wait for the server's answer."""

    adapter: Any
    kv: dict[str, torch.Tensor]
    timeout: float

    @classmethod
    def start(
        cls,
        url: str,
        context: Any,
        *,
        model: str,
        layout: KVLayout = LAYOUT,
        mode: str | None = None,
        seed: int | None = None,
        timeout: float = TIMEOUT,
        heartbeat: float = 10.0,
    ) -> Worker:
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPWorkerAdapter,
        )

        adapter = LMCacheMPWorkerAdapter(
            url,
            context,
            model,
            layout.block_size,
            single_rank(),
            extra_config=_extra(timeout, heartbeat, mode),
        )
        adapter.instance_id = next(_instance_ids)
        kv = make_kv(layout, seed)
        try:
            if VERSION == "0.4.6":
                adapter.register_kv_caches(kv)
            else:
                adapter.register_kv_caches(kv, layout.engine_group_infos())
        except BaseException:
            adapter.shutdown()
            raise
        return cls(adapter, kv, timeout)

    def _op(
        self,
        tokens: Sequence[int],
        blocks: Sequence[int],
        start: int,
        end: int | None,
        skip: int = 0,
    ) -> Any:
        from lmcache.integration.vllm.vllm_multi_process_adapter import LoadStoreOp

        return LoadStoreOp(
            token_ids=list(tokens),
            block_ids=list(blocks) if VERSION == "0.4.6" else [list(blocks)],
            start=start,
            end=len(tokens) if end is None else end,
            skip_first_n_tokens=skip,
        )

    def _finish(self, request_id: str, future: Any) -> bool:
        ok = bool(_wait(future, self.timeout, f"request {request_id}"))
        self.adapter.get_finished({request_id})
        return ok

    def store(
        self,
        request_id: str,
        tokens: Sequence[int],
        blocks: Sequence[int],
        *,
        start: int = 0,
        end: int | None = None,
    ) -> bool:
        """Store `[start, end)` of `tokens` from `blocks`, wait; success."""
        op = self._op(tokens, blocks, start, end)
        self.adapter.submit_store_request(request_id, op, _event())
        future = self.adapter.store_futures.get(request_id)
        if future is None:  # degraded: the adapter dropped it
            return False
        return self._finish(request_id, future)

    def retrieve(
        self,
        request_id: str,
        tokens: Sequence[int],
        blocks: Sequence[int],
        *,
        start: int = 0,
        end: int | None = None,
        skip_first_n_tokens: int = 0,
    ) -> bool:
        """Retrieve `[start, end)` of `tokens` into `blocks`, wait; success."""
        op = self._op(tokens, blocks, start, end, skip_first_n_tokens)
        self.adapter.submit_retrieve_request(request_id, op, _event())
        entry = self.adapter.retrieve_futures.get(request_id)
        if entry is None:
            return False
        return self._finish(request_id, entry[0])

    @property
    def healthy(self) -> bool:
        return bool(self.adapter.is_healthy)

    def shutdown(self) -> None:
        heartbeat = getattr(self.adapter, "_heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop()
        self.adapter.shutdown()


_PROBES = itertools.count()


@attrs.define
class Scheduler:
    """lmcache 0.4's `LMCacheMPSchedulerAdapter`; `lookup` polls until the
    server answers."""

    adapter: Any
    timeout: float

    @classmethod
    def start(
        cls,
        url: str,
        context: Any,
        *,
        model: str,
        block_size: int = LAYOUT.block_size,
        timeout: float = TIMEOUT,
        heartbeat: float = 10.0,
    ) -> Scheduler:
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPSchedulerAdapter,
        )

        adapter = LMCacheMPSchedulerAdapter(
            url,
            context,
            model,
            block_size,
            single_rank(),
            extra_config=_extra(timeout, heartbeat, None),
        )
        return cls(adapter, timeout)

    def lookup(self, request_id: str, tokens: Sequence[int]) -> int:
        """Tokens of `tokens`' prefix the server holds (LOOKUP, then
        QUERY_PREFETCH_STATUS, as vLLM's scheduler does); takes read locks."""
        self.adapter.maybe_submit_lookup_request(request_id, list(tokens))
        deadline = time.monotonic() + self.timeout
        while (hit := self.adapter.check_lookup_result(request_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookup {request_id} unfinished")
            time.sleep(0.001)
        if not self.adapter.is_healthy:
            raise TimeoutError(f"the server did not answer lookup {request_id}")
        self.adapter.cleanup_lookup_result(request_id)
        return int(hit)

    def wait_stored(
        self, tokens: Sequence[int], expected: int, timeout: float = 5.0
    ) -> int:
        """Look up until `expected` tokens are found (a server may answer a
        store just before its chunks become visible); leaves no lock."""
        deadline = time.monotonic() + timeout
        while True:
            probe = f"probe-{os.getpid()}-{next(_PROBES)}"
            hit = self.lookup(probe, tokens)
            if hit:
                self.adapter.free_lookup_locks(list(tokens), 0, hit, probe)
            if hit == expected or time.monotonic() > deadline:
                return hit
            time.sleep(0.02)

    def shutdown(self) -> None:
        heartbeat = getattr(self.adapter, "_heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop()
        self.adapter.mq_client.close()


@attrs.define
class Rig:
    """Makes workers, schedulers and raw clients for one model on one
    server, and closes them all in `close`."""

    url: str
    context: Any
    model: str
    opened: list[Any] = attrs.field(factory=list)

    def worker(self, mode: str | None = None, **kwargs: Any) -> Worker:
        w = Worker.start(self.url, self.context, model=self.model, mode=mode, **kwargs)
        self.opened.append(w)
        return w

    def scheduler(self, **kwargs: Any) -> Scheduler:
        s = Scheduler.start(self.url, self.context, model=self.model, **kwargs)
        self.opened.append(s)
        return s

    def raw(self) -> RawClient:
        """A bare client that, like every lmcache adapter and tool, asks
        GET_CHUNK_SIZE first: where lmcd detects among 0.4 releases, a
        client's first message tells 0.4.6 from 0.4.7 (`lmcd.wire.lmcache04`)."""
        c = RawClient.connect(self.url, self.context)
        self.opened.append(c)
        assert c.call("GET_CHUNK_SIZE", []) == CHUNK
        return c

    def close(self) -> None:
        while self.opened:
            thing = self.opened.pop()
            if isinstance(thing, Worker | Scheduler):
                thing.shutdown()
            else:
                thing.close()


def untouched(kv: dict[str, torch.Tensor], written: Sequence[int]) -> bool:
    """Whether every block but `written` still holds zeros, in every layer."""
    others = [b for b in range(LAYOUT.num_blocks) if b not in written]
    return all(int(torch.count_nonzero(t[:, others])) == 0 for t in kv.values())
