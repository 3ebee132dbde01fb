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
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run the cache daemon (a drop-in for lmcache.v1.multiprocess.server)."""
    import trio

    from lmcd.config import Config
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
        )
    except ConfigError as e:
        raise _fail(str(e), 2) from None
    setup_logging(log_level)
    daemon = Daemon(config)
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


def main() -> None:
    """Console-script entry point."""
    app()
