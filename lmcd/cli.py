"""The `lmcd` command: serve, inspect, bench."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from lmcd.errors import ConfigError, LmcdError

app = typer.Typer(
    name="lmcd",
    help="A KV-cache daemon for vLLM, speaking LMCache's multi-process protocol.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

LOG_LEVELS = ("debug", "info", "warning", "error")


def _print_version(value: bool) -> None:
    if value:
        from lmcd import __version__

        typer.echo(f"lmcd {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
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
        float,
        typer.Option(
            help="CPU buffer size in GB (GiB), allocated as it fills "
            "(see --disable-lazy-alloc)."
        ),
    ] = 5.0,
    max_workers: Annotated[int, typer.Option(help="Copies running at once.")] = 1,
    lock_ttl: Annotated[
        float, typer.Option(help="Seconds a LOOKUP lock protects a chunk.")
    ] = 300.0,
    staging_mb: Annotated[
        int, typer.Option(help="GPU staging memory per instance and buffer (MiB).")
    ] = 256,
    segment_mb: Annotated[
        int,
        typer.Option(
            help="Size of each CPU buffer segment (MiB), the unit of allocation "
            "and pinning; a chunk must fit in one."
        ),
    ] = 1024,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics and /healthz on this port."),
    ] = None,
    disable_lazy_alloc: Annotated[
        bool,
        typer.Option(
            "--disable-lazy-alloc",
            help="Allocate and commit (populate, or pin with CUDA) the whole CPU "
            "buffer at start-up, before serving; a buffer that cannot be "
            "committed is an error.",
        ),
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
            "--allow-overcommit",
            help="Start even when --cpu-buffer-size exceeds the available memory.",
        ),
    ] = False,
    dialect: Annotated[
        str,
        typer.Option(
            help="Client dialect: auto (every dialect below, detected per "
            "connection), lmcache-0.3, lmcache-0.4.4, lmcache-0.4.6, "
            "lmcache-0.4.7 or lmcache-0.5, or several names separated by "
            "commas (detected among those)."
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
    max_message_mb: Annotated[
        int,
        typer.Option(
            help="The most one client message may carry, in MiB (1..4096); "
            "larger ones are answered as failures. lmcache 0.4.6 CPU workers "
            "send their chunks inside STOREs: raise it for large models."
        ),
    ] = 32,
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
            max_message_mb=max_message_mb,
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
    host: Annotated[str, typer.Option(help="The daemon's address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The daemon's port.")] = 5555,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the STATS map as JSON.")
    ] = False,
    watch: Annotated[
        float | None, typer.Option(help="Refresh every SECONDS, with rates.")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Exit 0 if the daemon answers, 1 if not (probes)."
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for an answer.")
    ] = 2.0,
) -> None:
    """Show a running daemon's cache statistics."""
    import json

    from rich.console import Console

    from lmcd.client import Client
    from lmcd.config import MAX_SECONDS, check_number, check_target
    from lmcd.inspect import render
    from lmcd.inspect import watch as watch_stats

    try:
        check_target(host, port)
        check_number("--timeout", timeout, 0, MAX_SECONDS, "seconds")
        if watch is not None:
            check_number("--watch", watch, 0, MAX_SECONDS, "seconds")
    except ConfigError as e:
        raise _fail(str(e), 2) from None
    with Client(host, port) as client:
        try:
            client.check_listening(timeout)
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


def _connect(host: str, port: int, timeout: float) -> Any:
    """A `Client` of a daemon that answers, or exit 2 (bad flag) / 1."""
    from lmcd.client import Client
    from lmcd.config import MAX_SECONDS, check_number, check_target

    try:
        check_target(host, port)
        check_number("--timeout", timeout, 0, MAX_SECONDS, "seconds")
    except ConfigError as e:
        raise _fail(str(e), 2) from None
    client = Client(host, port)
    try:
        client.check_listening(timeout)
        client.stats(timeout)
    except LmcdError as e:
        client.close()
        raise _fail(str(e), 1) from None
    return client


@app.command()
def clear(
    host: Annotated[str, typer.Option(help="The daemon's address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The daemon's port.")] = 5555,
    model: Annotated[
        str | None, typer.Option(help="Drop only this model's chunks.")
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for an answer.")
    ] = 10.0,
) -> None:
    """Drop every cached chunk (or one model's) that no request is using."""
    client = _connect(host, port, timeout)
    with client:
        what = "every chunk" if model is None else f"every chunk of {model!r}"
        if not yes:
            if not sys.stdin.isatty():
                raise _fail("clear: pass --yes to confirm when not on a terminal", 2)
            if not typer.confirm(f"Drop {what} in lmcd at {client.url}?"):
                raise _fail("clear: not confirmed, nothing dropped", 1)
        try:
            dropped = client.drop(model, timeout)
        except LmcdError as e:
            raise _fail(str(e), 1) from None
        typer.echo(f"dropped {dropped} chunks from lmcd at {client.url}")


@app.command("reset-stats")
def reset_stats(
    host: Annotated[str, typer.Option(help="The daemon's address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The daemon's port.")] = 5555,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for an answer.")
    ] = 10.0,
) -> None:
    """Zero the daemon's statistics counters (gauges such as chunks stay)."""
    client = _connect(host, port, timeout)
    with client:
        try:
            client.reset_stats(timeout)
        except LmcdError as e:
            raise _fail(str(e), 1) from None
        typer.echo(f"statistics counters of lmcd at {client.url} reset")


WORKLOADS = ("noop", "lookup", "store", "retrieve", "cuda", "all")


@app.command()
def bench(
    host: Annotated[
        str | None,
        typer.Option(
            help="Measure the live daemon at this address (default: a private "
            "daemon, see --spawn)."
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Measure the live daemon on this port (127.0.0.1 unless --host)."
        ),
    ] = None,
    spawn: Annotated[
        bool,
        typer.Option(
            "--spawn",
            help="Measure a private daemon started on a free loopback port "
            "(the default unless --host or --port is given).",
        ),
    ] = False,
    workload: Annotated[str, typer.Option(help=", ".join(WORKLOADS))] = "all",
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 4,
    duration: Annotated[float, typer.Option(help="Seconds per control test.")] = 5.0,
    keys: Annotated[int, typer.Option(help="Keys per LOOKUP.")] = 64,
    hits: Annotated[
        bool,
        typer.Option(
            "--hits/--misses", help="LOOKUP keys that are present, or absent."
        ),
    ] = True,
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
    """Measure a daemon: requests/s and latency, GB/s (like redis-benchmark).

    By default a private daemon; a live one (--host/--port) is measured
    without locking its chunks or leaving data behind."""
    from lmcd.benchrun import BenchOptions, run_bench
    from lmcd.config import check_target

    live = host is not None or port is not None
    if spawn and live:
        raise _fail("--spawn measures a private daemon: drop --host/--port", 2)
    try:
        _check_bench_flags(
            workload=workload,
            clients=clients,
            duration=duration,
            keys=keys,
            layers=layers,
            heads=heads,
            head_size=head_size,
            dtype=dtype,
            block_size=block_size,
            chunks=chunks,
            rounds=rounds,
            warmup=warmup,
        )
        host = "127.0.0.1" if host is None else host
        port = 5555 if port is None else port
        if live:
            check_target(host, port)
    except ConfigError as e:
        raise _fail(str(e), 2) from None
    options = BenchOptions(
        host=host,
        port=port,
        spawn=not live,
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
    except ConfigError as e:  # a shape the daemon cannot hold
        raise _fail(str(e), 2) from None
    except LmcdError as e:
        raise _fail(str(e), 1) from None


def _check_bench_flags(
    *,
    workload: str,
    clients: int,
    duration: float,
    keys: int,
    layers: int,
    heads: int,
    head_size: int,
    dtype: str,
    block_size: int,
    chunks: int,
    rounds: int,
    warmup: int,
) -> None:
    """Raise `ConfigError` for the first `lmcd bench` flag out of range."""
    from lmcd.config import check_int, check_number
    from lmcd.transfer.layouts import DTYPE_SIZES
    from lmcd.wire.types import MAX_KEYS_PER_REQUEST, MAX_LAYERS

    if workload not in WORKLOADS:
        raise ConfigError(f"--workload must be one of {', '.join(WORKLOADS)}")
    if dtype not in DTYPE_SIZES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_SIZES)}")
    check_int("--clients", clients, 1, 1024)
    check_number("--duration", duration, 0, 24 * 3600.0, "seconds")
    check_int("--keys", keys, 1, MAX_KEYS_PER_REQUEST)
    check_int("--layers", layers, 1, MAX_LAYERS)
    check_int("--heads", heads, 1, 1024)
    check_int("--head-size", head_size, 1, 4096)
    check_int("--block-size", block_size, 1, 4096)
    check_int("--chunks", chunks, 1, 4096)
    check_int("--rounds", rounds, 1, 1_000_000)
    check_int("--warmup", warmup, 0, 1_000_000)


def main() -> None:
    """Console-script entry point: a usage error (an unparsable value, an
    unknown flag) is one `lmcd: error:` line and exit code 2, like the
    range checks."""
    try:
        result = app(standalone_mode=False, prog_name="lmcd")
    except _usage_error() as e:
        message = str(e.format_message())  # type: ignore[attr-defined]
        if message:  # empty: bare `lmcd`, whose help is already printed
            typer.echo(f"lmcd: error: {message}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("lmcd: aborted", err=True)
        sys.exit(1)
    # Without standalone mode, `--help` and `typer.Exit` come back as a code.
    sys.exit(result if isinstance(result, int) else 0)


def _usage_error() -> type[Exception]:
    """click's UsageError: typer >= 0.23 bundles its own click, earlier
    ones use click's."""
    import importlib

    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls: type[Exception] = importlib.import_module(module).UsageError
        except ImportError:
            continue
        return cls
    raise ImportError("typer without click")
