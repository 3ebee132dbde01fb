"""The `lmcd` command: serve, inspect, bench."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from lmcd.errors import ConfigError, LmcdError

app = typer.Typer(
    name="lmcd",
    help="A KV-cache daemon for vLLM, speaking LMCache's multi-process protocol.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LOG_LEVELS = ("debug", "info", "warning", "error")


@app.callback()
def _root() -> None:
    """A KV-cache daemon for vLLM, speaking LMCache's multi-process protocol."""


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"lmcd: error: {message}", err=True)
    return typer.Exit(code)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to bind the ZMQ server.")
    ] = "localhost",
    port: Annotated[int, typer.Option(help="Port to bind the ZMQ server.")] = 5555,
    chunk_size: Annotated[int, typer.Option(help="Tokens per chunk.")] = 256,
    cpu_buffer_size: Annotated[
        float, typer.Option(help="CPU buffer size in GB (GiB), allocated lazily.")
    ] = 5.0,
    max_workers: Annotated[int, typer.Option(help="Copies running at once.")] = 1,
    lock_ttl: Annotated[
        float, typer.Option(help="Seconds a LOOKUP lock protects a chunk.")
    ] = 300.0,
    staging_mb: Annotated[
        int, typer.Option(help="GPU staging memory per instance and buffer (MiB).")
    ] = 256,
    segment_mb: Annotated[
        int, typer.Option(help="Size of each pinned-memory segment (MiB).")
    ] = 1024,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics and /healthz on this port."),
    ] = None,
    disable_lazy_alloc: Annotated[
        bool,
        typer.Option(help="Allocate and commit the whole CPU buffer at start-up."),
    ] = False,
    prepare_ahead_mb: Annotated[
        int,
        typer.Option(
            help="Prepared, free CPU buffer kept ahead of the fill (MiB; at "
            "least two segments, doubled when stores outrun it)."
        ),
    ] = 2048,
    allow_overcommit: Annotated[
        bool,
        typer.Option(
            help="Start even when --cpu-buffer-size exceeds the available memory."
        ),
    ] = False,
    dialect: Annotated[
        str,
        typer.Option(
            help="Client dialect: auto (detected per connection), "
            "lmcache-0.3 or lmcache-0.5."
        ),
    ] = "auto",
    worker_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds after which a silent heartbeat client (lmcache 0.4+) "
            "is unregistered."
        ),
    ] = 120.0,
    pool_size: Annotated[
        int,
        typer.Option(
            help="Shared-memory pool of each engine-driven worker (lmcache 0.4.7+ "
            "CPU workers), in MiB, fully backed in /dev/shm; 0 refuses that mode."
        ),
    ] = 1024,
    shm_owners: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated uids whose /dev/shm files clients may "
            "register (default: any owner)."
        ),
    ] = None,
    disk_path: Annotated[
        str | None,
        typer.Option(
            help="Directory of a disk tier under the CPU buffer (kept across "
            "restarts; docs/disk-tier.md).",
            rich_help_panel="Disk tier",
        ),
    ] = None,
    disk_size: Annotated[
        float,
        typer.Option(
            help="Most the disk tier may hold, in GB (GiB); required with --disk-path.",
            rich_help_panel="Disk tier",
        ),
    ] = 0.0,
    disk_policy: Annotated[
        str,
        typer.Option(
            help="write-back: chunks go to disk while the CPU buffer is above "
            "--disk-high-water; write-through: every stored chunk goes to disk.",
            rich_help_panel="Disk tier",
        ),
    ] = "write-back",
    disk_threads: Annotated[
        int,
        typer.Option(help="Disk I/O worker threads.", rich_help_panel="Disk tier"),
    ] = 4,
    disk_direct_io: Annotated[
        str,
        typer.Option(
            help="auto (O_DIRECT where the filesystem takes it), on or off.",
            rich_help_panel="Disk tier",
        ),
    ] = "auto",
    disk_fsync: Annotated[
        bool,
        typer.Option(
            help="fsync each chunk file (survives power loss; slower).",
            rich_help_panel="Disk tier",
        ),
    ] = False,
    disk_high_water: Annotated[
        float,
        typer.Option(
            help="Write-back demotes chunks to disk while the CPU buffer is at "
            "least this full (0-1).",
            rich_help_panel="Disk tier",
        ),
    ] = 0.8,
    state_dir: Annotated[
        str | None,
        typer.Option(
            help="Where registrations are remembered across restarts "
            "(default: --disk-path).",
            rich_help_panel="Disk tier",
        ),
    ] = None,
    promotion_timeout: Annotated[
        float,
        typer.Option(
            help="Longest a RETRIEVE or lookup waits for chunks coming up from "
            "disk or the remote tier (seconds).",
            rich_help_panel="Disk tier",
        ),
    ] = 10.0,
    remote: Annotated[
        str | None,
        typer.Option(
            help="Valkey/Redis tier shared by daemons: valkey://HOST:PORT[,...] "
            "(valkeys:// for TLS; password from $LMCD_VALKEY_PASSWORD; "
            "docs/valkey.md).",
            rich_help_panel="Remote tier",
        ),
    ] = None,
    remote_prefix: Annotated[
        str,
        typer.Option(help="Key prefix in the cluster.", rich_help_panel="Remote tier"),
    ] = "lmcd:",
    remote_mode: Annotated[
        str,
        typer.Option(
            help="auto, cluster or standalone.", rich_help_panel="Remote tier"
        ),
    ] = "auto",
    remote_ttl: Annotated[
        float | None,
        typer.Option(
            help="Seconds a chunk lives in the cluster (default: until evicted).",
            rich_help_panel="Remote tier",
        ),
    ] = None,
    remote_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a chunk transfer waits on a silent node (plus its "
            "bytes at 200 MB/s).",
            rich_help_panel="Remote tier",
        ),
    ] = 1.0,
    remote_lookup_timeout: Annotated[
        float,
        typer.Option(
            help="Deadline of a batched remote lookup (seconds).",
            rich_help_panel="Remote tier",
        ),
    ] = 0.1,
    remote_queue: Annotated[
        int,
        typer.Option(
            help="Chunks waiting to be written to the cluster; beyond it new "
            "ones are dropped (counted), never waited for.",
            rich_help_panel="Remote tier",
        ),
    ] = 256,
    remote_username: Annotated[
        str | None,
        typer.Option(help="ACL user name.", rich_help_panel="Remote tier"),
    ] = None,
    remote_tls_ca_file: Annotated[
        str | None,
        typer.Option(help="CA bundle for TLS.", rich_help_panel="Remote tier"),
    ] = None,
    remote_tls_cert_file: Annotated[
        str | None,
        typer.Option(
            help="Client certificate (mutual TLS).", rich_help_panel="Remote tier"
        ),
    ] = None,
    remote_tls_key_file: Annotated[
        str | None,
        typer.Option(help="Client key (mutual TLS).", rich_help_panel="Remote tier"),
    ] = None,
    remote_tls_server_name: Annotated[
        str | None,
        typer.Option(
            help="Name to verify on the nodes' certificates.",
            rich_help_panel="Remote tier",
        ),
    ] = None,
    remote_tls_verify: Annotated[
        bool,
        typer.Option(
            help="Verify the nodes' certificates (turn off only in tests).",
            rich_help_panel="Remote tier",
        ),
    ] = True,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error.")
    ] = "info",
    port_file: Annotated[
        str | None,
        typer.Option(help="Write the bound port here once listening (--port 0)."),
    ] = None,
) -> None:
    """Run the cache daemon (a drop-in for lmcache.v1.multiprocess.server)."""
    import trio

    from lmcd.config import Config, parse_uids
    from lmcd.daemon import Daemon

    if log_level.lower() not in LOG_LEVELS:
        raise _fail(f"--log-level must be one of {', '.join(LOG_LEVELS)}", 2)
    try:
        config = Config(
            host=host,
            port=port,
            chunk_size=chunk_size,
            cpu_buffer_size=cpu_buffer_size,
            max_workers=max_workers,
            lock_ttl=lock_ttl,
            staging_mb=staging_mb,
            segment_mb=segment_mb,
            metrics_port=metrics_port,
            disable_lazy_alloc=disable_lazy_alloc,
            allow_overcommit=allow_overcommit,
            prepare_ahead_mb=prepare_ahead_mb,
            dialect=dialect,
            worker_timeout=worker_timeout,
            pool_mb=pool_size,
            shm_owners=None if shm_owners is None else parse_uids(shm_owners),
            disk_path=disk_path,
            disk_size=disk_size,
            disk_policy=disk_policy,
            disk_threads=disk_threads,
            disk_direct_io=disk_direct_io,
            disk_fsync=disk_fsync,
            disk_high_water=disk_high_water,
            state_dir=state_dir,
            promotion_timeout=promotion_timeout,
            remote=remote,
            remote_prefix=remote_prefix,
            remote_mode=remote_mode,
            remote_ttl=remote_ttl,
            remote_timeout=remote_timeout,
            remote_lookup_timeout=remote_lookup_timeout,
            remote_queue=remote_queue,
            remote_username=remote_username,
            remote_tls_ca_file=remote_tls_ca_file,
            remote_tls_cert_file=remote_tls_cert_file,
            remote_tls_key_file=remote_tls_key_file,
            remote_tls_server_name=remote_tls_server_name,
            remote_tls_verify=remote_tls_verify,
            port_file=port_file,
        )
    except ConfigError as e:
        raise _fail(str(e), 2) from None
    setup_logging(log_level)
    try:
        daemon = Daemon(config)
    except ConfigError as e:
        raise _fail(str(e), 2) from None
    try:
        trio.run(daemon.run)
    except ConfigError as e:
        raise _fail(str(e), 1) from None
    except BaseExceptionGroup as group:
        # Trio nurseries wrap errors in groups; a ConfigError is still a
        # user's mistake (a busy port), not a crash.
        config_errors, _ = group.split(ConfigError)
        if config_errors is None:
            raise
        raise _fail(str(_first_leaf(config_errors)), 1) from None
    except KeyboardInterrupt:
        pass


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@app.command()
def inspect(
    host: Annotated[str, typer.Option(help="The daemon's address.")] = "localhost",
    port: Annotated[int, typer.Option(help="The daemon's port.")] = 5555,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the STATS map as JSON.")
    ] = False,
    watch: Annotated[
        float | None, typer.Option(help="Refresh every SECONDS, with rates.")
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Exit 0 if the daemon answers, 1 if not (probes).")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for an answer.")
    ] = 2.0,
) -> None:
    """Show a running daemon's cache statistics."""
    import json

    from rich.console import Console

    from lmcd.client import Client
    from lmcd.inspect import render
    from lmcd.inspect import watch as watch_stats

    with Client(host, port) as client:
        try:
            stats = client.stats(timeout)
        except LmcdError as e:
            raise _fail(str(e), 1) from None
        if check:
            typer.echo(f"lmcd at {client.url} is serving ({stats['chunks']} chunks)")
            return
        if json_:
            typer.echo(json.dumps(stats, indent=2, sort_keys=True))
            return
        console = Console()
        if watch is None:
            console.print(render(stats))
            return
        try:
            watch_stats(lambda: client.stats(timeout), watch, console)
        except LmcdError as e:
            raise _fail(str(e), 1) from None
        except KeyboardInterrupt:
            pass


WORKLOADS = ("noop", "lookup", "store", "retrieve", "cuda", "all")


@app.command()
def bench(
    host: Annotated[str, typer.Option(help="The daemon's address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The daemon's port.")] = 5555,
    spawn: Annotated[
        bool, typer.Option(help="Start a daemon of its own on a free port.")
    ] = False,
    workload: Annotated[str, typer.Option(help=", ".join(WORKLOADS))] = "all",
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 4,
    duration: Annotated[float, typer.Option(help="Seconds per control test.")] = 5.0,
    keys: Annotated[int, typer.Option(help="Keys per LOOKUP.")] = 64,
    hits: Annotated[bool, typer.Option(help="LOOKUP keys that are present.")] = True,
    layers: Annotated[int, typer.Option(help="Model layers (store/retrieve).")] = 32,
    heads: Annotated[int, typer.Option(help="KV heads.")] = 8,
    head_size: Annotated[int, typer.Option(help="Head size.")] = 128,
    dtype: Annotated[str, typer.Option(help="KV dtype.")] = "bfloat16",
    block_size: Annotated[int, typer.Option(help="vLLM block size.")] = 16,
    chunks: Annotated[int, typer.Option(help="Chunks per STORE/RETRIEVE.")] = 8,
    rounds: Annotated[int, typer.Option(help="Timed STORE/RETRIEVE requests.")] = 6,
    warmup: Annotated[int, typer.Option(help="Untimed STORE/RETRIEVE rounds.")] = 2,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure a daemon: requests/s and latency, GB/s (like redis-benchmark)."""
    from lmcd.benchrun import BenchOptions, run_bench

    if workload not in WORKLOADS:
        raise _fail(f"--workload must be one of {', '.join(WORKLOADS)}", 2)
    if clients < 1 or duration <= 0 or keys < 1 or chunks < 1 or rounds < 1:
        raise _fail("--clients, --duration, --keys, --chunks, --rounds must be > 0", 2)
    options = BenchOptions(
        host=host,
        port=port,
        spawn=spawn,
        workload=workload,
        clients=clients,
        duration=duration,
        keys=keys,
        hits=hits,
        layers=layers,
        heads=heads,
        head_size=head_size,
        dtype=dtype,
        block_size=block_size,
        chunks=chunks,
        rounds=rounds,
        warmup=warmup,
        json=json_,
    )
    try:
        run_bench(options)
    except LmcdError as e:
        raise _fail(str(e), 1) from None


def main() -> None:
    """Console-script entry point."""
    app()
