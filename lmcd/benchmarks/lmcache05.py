"""lmcd next to lmcache's own 0.5.6 server, both driven by lmcache 0.5.6's
real vLLM adapters on CPU.

    python -m lmcd.benchmarks.lmcache05 --server reference|lmcd|both

Needs `lmcache==0.5.6` (installed with `--no-deps`) and its small dependency
set; `nox -s tests_lmcache05` installs both. Nothing needs a GPU: workers
register CPU KV tensors, either lmcache-driven (`cpu_shm` descriptors: the
server copies between the worker's shared-memory KV cache and its own
buffer) or engine-driven (the worker copies through the server's
shared-memory pool).

The same module is the rig of `tests/lmcache05` and, through
`tests/lmcache04/rig.py`, of `tests/lmcache04`: `start_server` starts either
server on a loopback port (the readiness probe and the command line are
parameters, so that lmcache 0.4's rig reuses them), `KVLayout` builds CPU KV
caches shaped as vLLM's, and `Worker` / `Scheduler` wrap the real adapters
in blocking calls with timeouts. They are written for 0.5.6; what lmcache
0.4's adapters take differently sits in named hooks (`Worker._register`,
`Worker._block_ids`, `Worker._event`, `adapter_config`,
`Scheduler._adapter`, ...) that `tests/lmcache04/rig.py` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch

from lmcd.bench import LatencyResult
from lmcd.errors import LmcdError
from lmcd.spawn import free_port, serve_command

REFERENCE = "reference"
LMCD = "lmcd"
SERVER_KINDS = (REFERENCE, LMCD)

# lmcache >= 0.5 reports usage to stats.lmcache.ai unless told not to; the
# URL points at the discard port of loopback in case a switch is missed.
NO_TELEMETRY = {
    "LMCACHE_TRACK_USAGE": "false",
    "DO_NOT_TRACK": "1",
    "LMCACHE_USAGE_TRACK_URL": "http://127.0.0.1:9",
}

# The transfer modes of lmcache's worker adapter (`lmcache.mp.mp_transfer_mode`).
LMCACHE_DRIVEN = "lmcache_driven"
ENGINE_DRIVEN = "engine_driven"


# -- servers -------------------------------------------------------------------


@attrs.frozen
class ServerOptions:
    """What both servers are started with (each spells the flags its way)."""

    chunk_size: int = 16
    buffer_gb: float = 0.25
    # Seconds a lookup's read lock lives (--l1-read-ttl-seconds, --lock-ttl);
    # None keeps each server's default (300 s for both).
    lock_ttl: int | None = None
    # Flags appended as they are, for one kind of server only.
    reference_flags: tuple[str, ...] = ()
    lmcd_flags: tuple[str, ...] = ()


def server_command(
    kind: str, port: int, options: ServerOptions, shm_name: str
) -> list[str]:
    """The command line that serves lmcache 0.5 clients on loopback `port`.

    `shm_name` names the reference server's shared-memory pool (the
    engine-driven SHM path); lmcd manages its own.
    """
    if kind == REFERENCE:
        args = [
            sys.executable,
            "-m",
            "lmcache.v1.multiprocess.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--chunk-size",
            str(options.chunk_size),
            "--l1-size-gb",
            str(options.buffer_gb),
            "--eviction-policy",
            "LRU",
            # The default (lmcache_driven) registers no engine-driven
            # handlers, and CPU workers default to engine-driven.
            "--supported-transfer-mode",
            "auto",
            "--shm-name",
            shm_name,
            # Its metrics endpoint would bind 0.0.0.0:9090, shared by every
            # run on the machine; it also makes the reference a bit faster.
            "--disable-observability",
        ]
        if options.lock_ttl is not None:
            args += ["--l1-read-ttl-seconds", str(options.lock_ttl)]
        return [*args, *options.reference_flags]
    if kind == LMCD:
        args = serve_command(
            port,
            "--chunk-size",
            str(options.chunk_size),
            "--cpu-buffer-size",
            str(options.buffer_gb),
        )
        if options.lock_ttl is not None:
            args += ["--lock-ttl", str(options.lock_ttl)]
        return [*args, *options.lmcd_flags]
    raise ValueError(f"unknown server kind {kind!r} (one of {SERVER_KINDS})")


@attrs.define
class ServerProcess:
    """A running server: its process, port and log file."""

    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    shm_name: str

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 6000) -> str:
        """The end of what the server has logged."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (both shut down cleanly on it, even where SIGINT is
        ignored), SIGKILL after `timeout` s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        # The reference unlinks its pool on a clean exit, not when killed.
        Path("/dev/shm", self.shm_name).unlink(missing_ok=True)
        return code


def launch(
    args: list[str], log_path: Path, *, append: bool = False
) -> subprocess.Popen[bytes]:
    """Run a server's command line with telemetry off, its output to
    `log_path` (appended to with `append`); returns the `Popen`."""
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NO_TELEMETRY, "PYTHONUNBUFFERED": "1"},
        )


# Asks a server URL for its chunk size within a timeout (s); raises
# `TimeoutError` without an answer.
Probe = Callable[[str, float], Any]
Command = Callable[[str, int, ServerOptions, str], list[str]]


def start_server(
    kind: str,
    options: ServerOptions,
    log_dir: Path,
    *,
    answer_timeout: float = 20.0,
    start_timeout: float = 60.0,
    command: Command | None = None,
    probe: Probe | None = None,
) -> ServerProcess:
    """Start a server and return once it answers `probe` (default: lmcache
    0.5's `get_chunk_size`) with `options.chunk_size`. `command` builds its
    command line (default: `server_command`).

    Raises `LmcdError` (with the server's log) if it exits, does not listen
    within `start_timeout` s, or does not answer within `answer_timeout` s
    of listening; the process is stopped then.
    """
    port = free_port()
    shm_name = f"lmcache_l1_pool_lmcd_t{os.getpid()}_{port}"
    log_path = log_dir / f"{kind}-{port}.log"
    args = (command or server_command)(kind, port, options, shm_name)
    proc = launch(args, log_path)
    server = ServerProcess(kind, port, proc, log_path, shm_name)
    try:
        wait_ready(server, options, probe, start_timeout, answer_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(
    server: ServerProcess,
    options: ServerOptions,
    probe: Probe | None = None,
    start_timeout: float = 60.0,
    answer_timeout: float = 20.0,
) -> None:
    """Wait until `server` listens (up to `start_timeout` s), then until it
    answers `probe` (default: `probe_chunk_size`) with the chunk size (up
    to `answer_timeout` s); `LmcdError` with its log otherwise."""
    wait_listening(server, start_timeout)
    try:
        chunk_size = (probe or probe_chunk_size)(server.url, answer_timeout)
    except TimeoutError:
        raise LmcdError(
            f"{server.kind} does not answer get_chunk_size within "
            f"{answer_timeout} s; its log:\n{server.log_tail()}"
        ) from None
    if type(chunk_size) is not int or chunk_size != options.chunk_size:
        raise LmcdError(
            f"{server.kind} answered get_chunk_size with {chunk_size!r}, not "
            f"{options.chunk_size}; its log:\n{server.log_tail()}"
        )


def wait_listening(server: ServerProcess, timeout: float) -> None:
    """Wait until `server` accepts connections; `LmcdError` with its log if
    it exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        code = server.proc.poll()
        if code is not None:
            raise LmcdError(
                f"{server.kind} exited with status {code}; "
                f"its log:\n{server.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise LmcdError(
                    f"{server.kind} is not listening after {timeout} s; "
                    f"its log:\n{server.log_tail()}"
                ) from None
            time.sleep(0.05)


@contextmanager
def running_server(
    kind: str, options: ServerOptions, log_dir: Path, **kwargs: Any
) -> Iterator[ServerProcess]:
    """`start_server`, stopped on exit."""
    server = start_server(kind, options, log_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# -- the real lmcache 0.5.6 client -------------------------------------------------


def zmq_context() -> Any:
    """A ZMQ context whose sockets never linger: closing a client whose
    server went away must not hang `term()`."""
    import zmq

    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


def request_client(url: str, context: Any) -> Any:
    """lmcache 0.5.6's own RPC client (`RequestClient`), as its adapters make it."""
    from lmcache.v1.multiprocess.transport.factory import RequestClientFactory

    return RequestClientFactory.create(url, context=context)


def probe_chunk_size(url: str, timeout: float) -> Any:
    """Ask `url` for its chunk size; returns the decoded reply (an int from
    a server that speaks lmcache 0.5), raises `TimeoutError` without one."""
    ctx = zmq_context()
    try:
        client = request_client(url, ctx)
        try:
            return client.get_chunk_size().result(timeout)
        finally:
            client.close()
    finally:
        ctx.term()


def key_fields(
    model: str,
    tokens: Sequence[int],
    request_id: str,
    *,
    start: int = 0,
    end: int | None = None,
    worker_id: int | None = 0,
) -> dict[str, Any]:
    """The fields every lmcache release's request key has (0.5.6's
    `IPCCacheServerKey`, 0.4's `IPCCacheEngineKey`); `end` None: the
    prompt's end, `worker_id` None: the scheduler's form."""
    return {
        "model_name": model,
        "worker_id": worker_id,
        "token_ids": tuple(tokens),
        "start": start,
        "end": len(tokens) if end is None else end,
        "request_id": request_id,
    }


def server_key(model: str, tokens: Sequence[int], request_id: str, **where: Any) -> Any:
    """An lmcache 0.5.6 key (`IPCCacheServerKey`), as a single-rank,
    non-MLA adapter builds it; `where`: `start`, `end`, `worker_id` as
    `key_fields` takes them (`worker_id=None`: the scheduler's form)."""
    from lmcache.v1.multiprocess.custom_types import IPCCacheServerKey

    return IPCCacheServerKey(
        num_kv_readers=1,
        world_size=1,
        cache_salt="",
        request_configs=None,
        **key_fields(model, tokens, request_id, **where),
    )


def single_rank() -> Any:
    """The `ParallelStrategy` of one non-MLA worker (TP 1, PP 1, one server).

    Its fields differ per release (0.5.6: `mla_only` and `n_servers`; 0.4.7:
    the kv/actual world sizes; 0.4.6: `use_mla`); each named here gets the
    value of a single rank, the others keep their defaults (0.5.6's
    decode-context-parallel size: 1), and a required field named here for
    no release fails in the constructor."""
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        ParallelStrategy,
    )

    values = {
        "mla_only": False,
        "use_mla": False,
        "n_servers": 1,
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
    return ParallelStrategy(**{n: values[n] for n in names if n in values})


def adapter_config(
    timeout: float, heartbeat: float | None, mode: str | None
) -> dict[str, Any]:
    """An adapter's `extra_config`: `timeout` as its mq_timeout, `heartbeat`
    as its heartbeat interval and `mode` as its transfer mode (None: lmcache's
    default for either)."""
    config: dict[str, Any] = {"lmcache.mp.mq_timeout": timeout}
    if heartbeat is not None:
        config["lmcache.mp.heartbeat_interval"] = heartbeat
    if mode is not None:
        config["lmcache.mp.mp_transfer_mode"] = mode
    return config


@attrs.frozen
class KVLayout:
    """A worker's CPU KV cache as vLLM lays it out: one tensor per layer,
    `[2, num_blocks, block_size, num_heads, head_dim]` (`order` "NHD", as
    lmcache 0.5.6 is told) or `[2, num_blocks, num_heads, block_size,
    head_dim]` ("HND", as lmcache 0.4 reads a CPU cache). Block 0 is vLLM's
    null block."""

    num_layers: int = 2
    num_blocks: int = 16
    block_size: int = 8
    num_heads: int = 2
    head_dim: int = 8
    dtype: torch.dtype = torch.bfloat16
    order: str = attrs.field(
        default="NHD", validator=attrs.validators.in_(("NHD", "HND"))
    )

    def make(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The per-layer tensors: zeros, or random values from `seed`."""
        if self.order == "NHD":
            inner = (self.block_size, self.num_heads)
        else:
            inner = (self.num_heads, self.block_size)
        shape = (2, self.num_blocks, *inner, self.head_dim)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        kv = {}
        for i in range(self.num_layers):
            if gen is None:
                t = torch.zeros(shape, dtype=self.dtype)
            else:
                t = torch.randn(shape, generator=gen).to(self.dtype)
            kv[f"model.layers.{i}.self_attn.attn"] = t
        return kv

    def engine_group_infos(self) -> list[Any]:
        """One attention group holding every layer (a standard model)."""
        from lmcache.v1.multiprocess.group_view import EngineGroupInfo

        return [
            EngineGroupInfo(
                engine_group_id=0,
                layer_indices=tuple(range(self.num_layers)),
                tokens_per_block=self.block_size,
            )
        ]

    def token_bytes(self) -> int:
        """KV bytes of one token over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_heads * self.head_dim * itemsize


def blocks_equal(
    a: dict[str, torch.Tensor],
    a_blocks: Sequence[int],
    b: dict[str, torch.Tensor],
    b_blocks: Sequence[int],
) -> bool:
    """Whether blocks `a_blocks` of cache `a` hold the same bytes as
    `b_blocks` of cache `b`, in every layer."""
    return all(
        torch.equal(a[name][:, list(a_blocks)], b[name][:, list(b_blocks)])
        for name in a
    )


class _RecordingClient:
    """Forwards every call to a real `RequestClient` and keeps the futures,
    so that a caller can wait for the replies to the calls an adapter sends
    without waiting (free_lookup_locks, end_session, ...)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.pending: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name == "close" or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            future = attr(*args, **kwargs)
            if hasattr(future, "result"):
                self.pending.append((name, future))
            return future

        return call


def _wait(future: Any, timeout: float, what: str) -> Any:
    try:
        return future.result(timeout)
    except TimeoutError:
        raise TimeoutError(f"no answer to {what} within {timeout} s") from None


@attrs.define
class Worker:
    """lmcache 0.5.6's `LMCacheMPWorkerAdapter` with a registered CPU KV
    cache; store and retrieve wait for the server's answer. The class
    methods named with an underscore are what another release's adapter
    takes differently (`tests/lmcache04/rig.py`)."""

    adapter: Any
    kv: dict[str, torch.Tensor]
    layout: KVLayout
    startup_s: float
    timeout: float

    @classmethod
    def start(
        cls,
        url: str,
        context: Any,
        *,
        model: str,
        layout: KVLayout,
        mode: str | None,
        seed: int | None = None,
        timeout: float = 10.0,
        heartbeat: float | None = None,
    ) -> Worker:
        """Construct the adapter and register its KV cache, as vLLM's
        worker does at start-up; `startup_s` is how long that took.

        `timeout` is the adapter's `mq_timeout`: a request the server does
        not answer costs that long (at start-up, `get_experimental` too).
        `mode` and `heartbeat`: see `adapter_config`.
        """
        kv = layout.make(seed)
        t0 = time.perf_counter()
        adapter = cls._adapter(
            url, context, model, layout, cls._config(timeout, heartbeat, mode)
        )
        try:
            cls._register(adapter, kv, layout)
        except BaseException:
            adapter.shutdown()
            raise
        startup = time.perf_counter() - t0
        return cls(adapter, kv, layout, startup, timeout)

    @classmethod
    def _config(
        cls, timeout: float, heartbeat: float | None, mode: str | None
    ) -> dict[str, Any]:
        return adapter_config(timeout, heartbeat, mode)

    @classmethod
    def _adapter(
        cls, url: str, context: Any, model: str, layout: KVLayout, config: Any
    ) -> Any:
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPWorkerAdapter,
        )

        return LMCacheMPWorkerAdapter(
            url, context, model, layout.block_size, single_rank(), extra_config=config
        )

    @classmethod
    def _register(cls, adapter: Any, kv: Any, layout: KVLayout) -> None:
        adapter.register_kv_caches(
            kv, layout.engine_group_infos(), {"kv_layout": layout.order}
        )

    @classmethod
    def _block_ids(cls, blocks: Sequence[int]) -> list[Any]:
        """One list of block ids per KV cache group."""
        return [list(blocks)]

    def _event(self) -> Any:
        return self.adapter.create_recorded_event()

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
            block_ids=self._block_ids(blocks),
            start=start,
            end=len(tokens) if end is None else end,
            skip_first_n_tokens=skip,
        )

    def submit_store(
        self,
        request_id: str,
        tokens: Sequence[int],
        blocks: Sequence[int],
        *,
        start: int = 0,
        end: int | None = None,
    ) -> Any:
        """Store `[start, end)` of `tokens` (chunk-aligned) from `blocks`;
        returns the adapter's future (its result: success), or None when the
        adapter sent nothing (it holds the server for down)."""
        op = self._op(tokens, blocks, start, end)
        self.adapter.submit_store_request(request_id, op, self._event())
        return self.adapter.store_futures.get(request_id)

    def submit_retrieve(
        self,
        request_id: str,
        tokens: Sequence[int],
        blocks: Sequence[int],
        *,
        start: int = 0,
        end: int | None = None,
        skip_first_n_tokens: int = 0,
    ) -> Any:
        """Retrieve `[start, end)` of `tokens` into `blocks`; returns the
        adapter's future (its result: success), or None as `submit_store`."""
        op = self._op(tokens, blocks, start, end, skip_first_n_tokens)
        self.adapter.submit_retrieve_request(request_id, op, self._event())
        entry = self.adapter.retrieve_futures.get(request_id)
        return None if entry is None else entry[0]

    def finish(self, futures: dict[str, Any]) -> dict[str, bool]:
        """Wait for every future (request id -> future; None: a failure) and
        let the adapter collect them, as vLLM's `get_finished` does."""
        results = {
            rid: f is not None and bool(_wait(f, self.timeout, f"request {rid}"))
            for rid, f in futures.items()
        }
        self.adapter.get_finished(set(futures))
        return results

    def store(
        self,
        request_id: str,
        tokens: Sequence[int],
        blocks: Sequence[int],
        *,
        start: int = 0,
        end: int | None = None,
    ) -> bool:
        """Store and wait; the server's success flag."""
        future = self.submit_store(request_id, tokens, blocks, start=start, end=end)
        return self.finish({request_id: future})[request_id]

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
        """Retrieve and wait; the server's success flag."""
        future = self.submit_retrieve(
            request_id,
            tokens,
            blocks,
            start=start,
            end=end,
            skip_first_n_tokens=skip_first_n_tokens,
        )
        return self.finish({request_id: future})[request_id]

    @property
    def healthy(self) -> bool:
        """Whether the adapter holds the server for up."""
        return bool(self.adapter.is_healthy)

    def shutdown(self) -> None:
        """Stop the heartbeat and unregister (the adapter waits up to its
        `mq_timeout` for the answer)."""
        self.adapter.shutdown()


# Request ids of probing lookups: the servers keep sessions per request id,
# so no id may come back.
_PROBES = itertools.count()


@attrs.define
class Scheduler:
    """lmcache 0.5.6's `LMCacheMPSchedulerAdapter`; `lookup` waits for the
    answer, and `settle` for the replies the adapter does not wait for."""

    adapter: Any
    # None where the rig does not record the adapter's requests (lmcache 0.4).
    recorder: _RecordingClient | None
    timeout: float

    @classmethod
    def start(
        cls,
        url: str,
        context: Any,
        *,
        model: str,
        block_size: int,
        timeout: float = 10.0,
        heartbeat: float | None = None,
    ) -> Scheduler:
        """The adapter, with `timeout` as its mq_timeout and `heartbeat` as
        its heartbeat interval (None: lmcache's default)."""
        config = adapter_config(timeout, heartbeat, None)
        adapter, recorder = cls._adapter(url, context, model, block_size, config)
        return cls(adapter, recorder, timeout)

    @classmethod
    def _adapter(
        cls, url: str, context: Any, model: str, block_size: int, config: Any
    ) -> tuple[Any, _RecordingClient | None]:
        """0.5.6's adapter takes a list of server URLs; its client to `url`
        is replaced by a recording one."""
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPSchedulerAdapter,
        )

        adapter = LMCacheMPSchedulerAdapter(
            [url], context, model, block_size, single_rank(), extra_config=config
        )
        recorder = _RecordingClient(adapter.req_clients[url])
        adapter.req_clients[url] = recorder
        return adapter, recorder

    def lookup(self, request_id: str, tokens: Sequence[int]) -> int:
        """Tokens of `tokens`' prefix the server holds (LOOKUP, then
        QUERY_PREFETCH_STATUS polls, as vLLM's scheduler steps do); takes
        the server's read locks on the hit."""
        self.adapter.maybe_submit_lookup_request(request_id, list(tokens))
        deadline = time.monotonic() + self.timeout
        while (hit := self.adapter.check_lookup_result(request_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookup {request_id} unfinished after {deadline}")
            time.sleep(0.001)
        # The adapter answers 0 once the server stopped answering; a test
        # must not read that as a miss.
        if not self.adapter.is_healthy:
            raise TimeoutError(f"the server did not answer lookup {request_id}")
        self.adapter.cleanup_lookup_result(request_id)
        return int(hit)

    def wait_stored(
        self, tokens: Sequence[int], expected: int, timeout: float = 3.0
    ) -> int:
        """Look `tokens` up until the lookup finds `expected` tokens or
        `timeout` s pass; returns the last hit, and leaves no lock behind.

        A server may answer a store before its chunks are visible to
        lookups (the reference commits them from a callback thread just
        after answering).
        """
        deadline = time.monotonic() + timeout
        while True:
            probe = f"probe-{os.getpid()}-{next(_PROBES)}"
            hit = self.lookup(probe, tokens)
            if hit:
                self.free_lookup_locks(probe, tokens, 0, hit)
            if hit == expected or time.monotonic() > deadline:
                return hit
            time.sleep(0.02)

    def free_lookup_locks(
        self, request_id: str, tokens: Sequence[int], start: int, end: int
    ) -> None:
        """Release the read locks `lookup` took on `[start, end)`."""
        self.adapter.free_lookup_locks(list(tokens), start, end, request_id)
        self.settle()

    def end_session(self, request_id: str) -> None:
        self.adapter.end_session(request_id)
        self.settle()

    def reset_cache(self) -> bool:
        """CLEAR(force=False), as vLLM's prefix-cache reset sends it."""
        return bool(self.adapter.reset_cache())

    def settle(self) -> list[tuple[str, Any]]:
        """Wait for the reply to every request sent so far; returns
        (operation, reply) pairs. Raises `TimeoutError` naming the first
        request left unanswered. Without a recorder nothing was kept to
        wait for: returns []."""
        if self.recorder is None:
            return []
        pending, self.recorder.pending = self.recorder.pending, []
        return [(name, _wait(f, self.timeout, name)) for name, f in pending]

    def shutdown(self) -> None:
        self.adapter.shutdown()


# -- the benchmark -----------------------------------------------------------------

BENCH_CHUNK = 256
# A 0.5B-parameter model's KV (Qwen2.5-0.5B: 24 layers, 2 KV heads of 64):
# 3 MiB per 256-token chunk in bfloat16.
BENCH_LAYOUT = KVLayout(num_layers=24, block_size=16, num_heads=2, head_dim=64)
CLIENTS = 4


@attrs.frozen
class BenchConfig:
    duration: float = 5.0
    requests: int = 32
    chunks_per_request: int = 8
    batch: int = 8
    startups: int = 3


@attrs.frozen
class BenchResult:
    server: str
    lookup: LatencyResult | None = None
    store_gbps: float | None = None
    retrieve_gbps: float | None = None
    startup_s: float | None = None
    error: str | None = None


def _request_tokens(i: int, n_tokens: int) -> list[int]:
    # Distinct first tokens make distinct chains of chunk hashes.
    return [100_000 + i, *range(1, n_tokens)]


def _lookup_client(
    url: str, tokens: list[int], duration: float, warmup: float, out: Any
) -> None:
    """One closed loop of LOOKUP -> QUERY_PREFETCH_STATUS (until it answers)
    through the real request client, a new request id per cycle. Each cycle
    then releases its locks and ends its session without waiting, as the
    scheduler adapter does, so that neither server accumulates state."""
    ctx = zmq_context()
    client = request_client(url, ctx)
    latencies: list[float] = []
    pid = os.getpid()
    try:
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + duration
        n = 0
        while (t0 := time.perf_counter()) < end:
            rid = f"bench-{pid}-{n}"
            n += 1
            key = server_key("bench", tokens, rid, worker_id=None)
            client.lookup(key, 1).result(30)
            while client.query_prefetch_status(rid).result(30) is None:
                pass
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)
            client.free_lookup_locks(key, 1)
            client.end_session(rid)
    finally:
        client.close()
        ctx.term()
    out.put(latencies)


def lookup_cycles(
    url: str, tokens: list[int], duration: float, warmup: float = 1.0
) -> LatencyResult:
    """`CLIENTS` processes of `_lookup_client`."""
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    procs = [
        spawn.Process(target=_lookup_client, args=(url, tokens, duration, warmup, out))
        for _ in range(CLIENTS)
    ]
    for p in procs:
        p.start()
    latencies: list[float] = []
    try:
        for _ in procs:
            latencies.extend(out.get(timeout=duration + warmup + 120))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return LatencyResult.from_latencies("lookup cycle", CLIENTS, duration, latencies)


def _timed_batches(
    worker: Worker,
    submit: str,
    requests: dict[str, list[int]],
    cfg: BenchConfig,
    blocks_per_request: int,
) -> float:
    """Seconds to push every request (id -> tokens) through `submit`
    ('submit_store' or 'submit_retrieve'), `cfg.batch` in flight at a time,
    each request in its own blocks of the worker's cache."""
    ids = list(requests)
    call = getattr(worker, submit)
    t0 = time.perf_counter()
    for first in range(0, len(ids), cfg.batch):
        futures = {}
        for slot, rid in enumerate(ids[first : first + cfg.batch]):
            blocks = range(
                1 + slot * blocks_per_request, 1 + (slot + 1) * blocks_per_request
            )
            futures[rid] = call(rid, requests[rid], blocks)
        results = worker.finish(futures)
        failed = [rid for rid, ok in results.items() if not ok]
        if failed:
            raise LmcdError(f"{submit} failed for {failed}")
    return time.perf_counter() - t0


def bench_server(kind: str, cfg: BenchConfig, log_dir: Path) -> BenchResult:
    """Every figure for one server, or the error that stopped the run."""
    try:
        return _bench(kind, cfg, log_dir)
    except Exception as e:  # reported in the table; the other server still runs
        return BenchResult(kind, error=f"{type(e).__name__}: {e}"[:2000])


def _bench(kind: str, cfg: BenchConfig, log_dir: Path) -> BenchResult:
    blocks_per_request = cfg.chunks_per_request * BENCH_CHUNK // BENCH_LAYOUT.block_size
    layout = attrs.evolve(BENCH_LAYOUT, num_blocks=1 + cfg.batch * blocks_per_request)
    n_tokens = cfg.chunks_per_request * BENCH_CHUNK
    total = cfg.requests * n_tokens * layout.token_bytes()
    options = ServerOptions(
        chunk_size=BENCH_CHUNK,
        # Room to spare: the reference evicts from 80 % full on.
        buffer_gb=round(2 * total / 2**30 + 0.5, 1),
        # Both quiet: the reference logs a line per store and retrieve.
        lmcd_flags=("--log-level", "warning"),
    )
    # Request ids are never reused: the servers keep a session per id.
    warmup = {
        f"warmup-{i}": _request_tokens(cfg.requests + i, n_tokens)
        for i in range(cfg.requests)
    }
    stores = {f"store-{i}": _request_tokens(i, n_tokens) for i in range(cfg.requests)}
    loads = {f"load-{i}": _request_tokens(i, n_tokens) for i in range(cfg.requests)}
    with ExitStack() as stack:
        server = stack.enter_context(running_server(kind, options, log_dir))
        ctx = zmq_context()
        stack.callback(ctx.term)
        starts = []
        for _ in range(cfg.startups):
            w = Worker.start(
                server.url, ctx, model="bench", layout=layout, mode=LMCACHE_DRIVEN
            )
            starts.append(w.startup_s)
            w.shutdown()
        writer = Worker.start(
            server.url,
            ctx,
            model="bench",
            layout=layout,
            mode=LMCACHE_DRIVEN,
            seed=1,
            timeout=60,
        )
        stack.callback(writer.shutdown)
        # A first pass touches the servers' buffers (page faults, lazy
        # segments); a forced clear empties them again.
        _timed_batches(writer, "submit_store", warmup, cfg, blocks_per_request)
        raw = request_client(server.url, ctx)
        stack.callback(raw.close)
        _wait(raw.clear(True), 60, "clear(force=True)")
        store_s = _timed_batches(
            writer, "submit_store", stores, cfg, blocks_per_request
        )
        scheduler = Scheduler.start(
            server.url, ctx, model="bench", block_size=layout.block_size
        )
        stack.callback(scheduler.shutdown)
        scheduler.wait_stored(stores[f"store-{cfg.requests - 1}"], n_tokens)
        for rid, tokens in loads.items():
            hit = scheduler.lookup(rid, tokens)
            if hit != n_tokens:
                raise LmcdError(f"lookup {rid} found {hit} of {n_tokens} tokens")
        reader = Worker.start(
            server.url, ctx, model="bench", layout=layout, mode=LMCACHE_DRIVEN
        )
        stack.callback(reader.shutdown)
        retrieve_s = _timed_batches(
            reader, "submit_retrieve", loads, cfg, blocks_per_request
        )
        # The last batch sits in the same blocks of both caches.
        last = range(1, 1 + blocks_per_request)
        if not blocks_equal(writer.kv, last, reader.kv, last):
            raise LmcdError("retrieved bytes differ from the stored ones")
        lookup = lookup_cycles(server.url, stores["store-0"], cfg.duration)
        return BenchResult(
            kind,
            lookup=lookup,
            store_gbps=total / store_s / 1e9,
            retrieve_gbps=total / retrieve_s / 1e9,
            startup_s=statistics.median(starts),
        )


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def report(results: list[BenchResult], cfg: BenchConfig) -> str:
    """The results as a Markdown table, with lmcd/reference ratios."""
    kinds = [r.server for r in results]
    rows: list[tuple[str, str, list[float | None]]] = [
        (
            f"lookup→query_prefetch_status cycles/s ({CLIENTS} clients)",
            ",.0f",
            [r.lookup.rps if r.lookup else None for r in results],
        ),
        (
            "lookup cycle p50 µs",
            ",.0f",
            [r.lookup.p50_us if r.lookup else None for r in results],
        ),
        (
            "lookup cycle p99 µs",
            ",.0f",
            [r.lookup.p99_us if r.lookup else None for r in results],
        ),
        ("store GB/s (cpu_shm)", ".2f", [r.store_gbps for r in results]),
        ("retrieve GB/s (cpu_shm)", ".2f", [r.retrieve_gbps for r in results]),
        ("worker start-up s (median)", ".3f", [r.startup_s for r in results]),
    ]
    header = ["metric", *kinds]
    both = REFERENCE in kinds and LMCD in kinds
    if both:
        header.append("lmcd/reference")
    lines = [
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
    ]
    for name, spec, values in rows:
        cells = [name, *(_fmt(v, spec) for v in values)]
        if both:
            ref = values[kinds.index(REFERENCE)]
            own = values[kinds.index(LMCD)]
            cells.append(f"{own / ref:.2f}" if ref and own is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    chunk_mib = BENCH_CHUNK * BENCH_LAYOUT.token_bytes() / 2**20
    lines += [
        "",
        f"Layout: {BENCH_LAYOUT.num_layers} layers, {BENCH_LAYOUT.num_heads} KV "
        f"heads of {BENCH_LAYOUT.head_dim}, bfloat16, {BENCH_CHUNK}-token chunks "
        f"({chunk_mib:.0f} MiB); {cfg.requests} requests of "
        f"{cfg.chunks_per_request} chunks, {cfg.batch} in flight. Lookup cycles: "
        f"{cfg.duration:g} s per server, {CLIENTS} client processes. "
        "For the start-up time lower is better.",
    ]
    lines += [f"\n{r.server} failed: {r.error}" for r in results if r.error]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmcd.benchmarks.lmcache05", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--server", choices=[*SERVER_KINDS, "both"], default="both")
    defaults = BenchConfig()
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    os.environ.update(NO_TELEMETRY)
    cfg = BenchConfig(duration=args.duration, requests=args.requests)
    kinds = SERVER_KINDS if args.server == "both" else (args.server,)
    with tempfile.TemporaryDirectory(prefix="lmcd-bench05-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        results = []
        for kind in kinds:
            print(f"benchmarking {kind} ...", file=sys.stderr, flush=True)
            results.append(bench_server(kind, cfg, log_dir))
    print(report(results, cfg))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
