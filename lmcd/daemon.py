"""The daemon: one Trio nursery holding listener, handlers, scheduler, storage.

    typer CLI -- lmcd serve --> trio.run(Daemon.run)
                                 nursery
                                 |-- listener   ZMQ ROUTER <-> frames
                                 |-- handlers   inline control plane, a task per copy
                                 |-- scheduler  in-flight copies and completions
                                 |-- pools      engine-driven workers' shm pools
                                 |-- tiers      disk and remote tiers (optional)
                                 `-- storage    index, locks, LRU over a tier

Shutdown (SIGINT/SIGTERM): answer what the socket already holds (control
plane as usual, data-plane requests not yet started with their failure
reply), stop receiving, give in-flight requests `grace` seconds to finish
and be answered, let queued replies leave, then cancel the rest and close
the socket.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time

import attrs
import trio

from lmcd import __version__
from lmcd.config import Config
from lmcd.enginepool import EnginePools
from lmcd.errors import ConfigError
from lmcd.handlers import Handlers
from lmcd.listener import Listener
from lmcd.lookups import LookupJobs, Sessions
from lmcd.scheduler import TransferScheduler
from lmcd.storage import StorageManager
from lmcd.tiering import Policy, Registrations, Tiering
from lmcd.tokens import TokenHasher
from lmcd.wire.detect import DialectRouter
from lmcd.wire.registry import dialects_for
from lmcd_backends.pinned_cpu import (
    PinnedCpuTier,
    SegmentPreparer,
    available_memory,
    preallocate,
)

log = logging.getLogger(__name__)


def _one_torch_thread() -> None:
    """Copies run in lmcd's own worker threads (`--max-workers`) next to
    segment preparation. torch's intra-op threads on top of them only
    compete for the cores, and under contention their barriers stall a copy
    for tens of milliseconds (measured: a first fill at 0.27 GB/s with
    torch's default threads, 3.4 GB/s with one, on a loaded 2-core VM)."""
    import torch

    torch.set_num_threads(1)


def _import_torch_in_background() -> None:
    """Import torch (over a second of CPU on a small machine) in a thread of
    its own while the daemon binds and recovers its disk index; whatever
    needs torch first (the first segment, a reopened registration) waits
    for this import through Python's module lock, not for a second one."""

    def target() -> None:
        try:
            _one_torch_thread()
        except Exception:  # an import that fails fails again where it is used
            log.exception("Importing torch failed")

    threading.Thread(target=target, name="lmcd-import-torch", daemon=True).start()


@attrs.define(slots=True, eq=False)
class Daemon:
    """Everything `lmcd serve` runs, wired together."""

    config: Config
    storage: StorageManager = attrs.field(init=False)
    scheduler: TransferScheduler = attrs.field(init=False)
    pools: EnginePools = attrs.field(init=False)
    handlers: Handlers = attrs.field(init=False)
    listener: Listener = attrs.field(init=False)
    tiers: Tiering | None = attrs.field(default=None, init=False)
    registrations: Registrations | None = attrs.field(default=None, init=False)
    preparer: SegmentPreparer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        # Segments are prepared in worker threads (the preparer, or all at
        # start-up): a STORE never waits for memory on the Trio thread.
        tier = PinnedCpuTier(
            cfg.buffer_bytes,
            segment_bytes=cfg.segment_bytes,
            grow_inline=False,
            lead_bytes=cfg.lead_bytes,
        )
        self.preparer = SegmentPreparer(tier)
        self.storage = StorageManager(
            tier=tier, clock=time.monotonic, lock_ttl=cfg.lock_ttl
        )
        self.scheduler = TransferScheduler(
            self.storage,
            cfg.chunk_size,
            cfg.max_workers,
            cfg.staging_bytes,
            shm_owners=cfg.shm_owners,
        )
        sessions = Sessions(TokenHasher(cfg.chunk_size), time.monotonic)
        self.pools = EnginePools(
            self.storage,
            sessions,
            cfg.chunk_size,
            cfg.pool_bytes,
            cfg.max_workers,
            clock=time.monotonic,
        )
        self.scheduler.peers.append(self.pools)
        self.listener = Listener(
            cfg.host,
            cfg.port,
            self._on_message,
            on_oversized=self._on_oversized,
            max_message_bytes=cfg.max_message_bytes,
        )
        self.handlers = Handlers(
            self.storage,
            self.scheduler,
            cfg.chunk_size,
            self.listener.send,
            DialectRouter(dialects_for(cfg.dialect)),
            sessions,
            LookupJobs(time.monotonic),
            extra_stats=self._extra_stats,
            pools=self.pools,
        )
        self._make_tiers()

    def _make_tiers(self) -> None:
        """The disk and remote tiers and the remembered registrations, as
        configured. Raises `ConfigError` for settings a tier refuses."""
        cfg = self.config
        disk = remote = None
        if cfg.disk_path is not None:
            from lmcd_backends.disk import DiskTier

            try:
                disk = DiskTier(
                    cfg.disk_path,
                    cfg.disk_bytes,
                    threads=cfg.disk_threads,
                    direct=cfg.direct_io,
                    fsync=cfg.disk_fsync,
                )
            except ValueError as e:
                raise ConfigError(f"--disk-path/--disk-size: {e}") from e
        if cfg.remote is not None:
            from lmcd_backends.remote import tier_from_env

            remote = tier_from_env(
                cfg.remote,
                prefix=cfg.remote_prefix,
                mode=cfg.remote_mode,
                ttl=cfg.remote_ttl,
                timeout=cfg.remote_timeout,
                lookup_timeout=cfg.remote_lookup_timeout,
                username=cfg.remote_username,
                tls_ca_file=cfg.remote_tls_ca_file,
                tls_cert_file=cfg.remote_tls_cert_file,
                tls_key_file=cfg.remote_tls_key_file,
                tls_server_name=cfg.remote_tls_server_name,
                tls_verify=cfg.remote_tls_verify,
            )
        if disk is not None or remote is not None:
            self.tiers = Tiering(
                self.storage,
                disk,
                remote,
                policy=Policy(cfg.disk_policy),
                high_water=cfg.disk_high_water,
                promotion_timeout=cfg.promotion_timeout,
                remote_queue=cfg.remote_queue,
                layouts=self._layouts,
                demotion_batch=cfg.disk_threads,
            )
            self.storage.on_commit = self.tiers.on_commit
            self.handlers.tiers = self.tiers
        state = cfg.registrations_dir
        if state is not None:
            self.registrations = Registrations(state)
            self.scheduler.on_registration = self.registrations.changed

    def _layouts(self) -> list[tuple[str | None, int | None, str, int]]:
        size = self.config.chunk_size
        shapes: list[tuple[str | None, int | None, str, int]] = [
            (i.model_name, i.world_size, i.layout.tag, i.layout.chunk_bytes(size))
            for i in self.scheduler.instances()
        ]
        shapes += [
            (p.model_name, p.world_size, p.layout.tag, p.chunk_bytes)
            for p in self.pools.instances()
        ]
        return shapes

    def _on_message(self, identity: bytes, frames: list[bytes]) -> None:
        self.handlers.on_message(identity, frames)

    def _on_oversized(self, identity: bytes, frames: list[bytes], what: str) -> None:
        self.handlers.on_oversized(identity, frames, what)

    def _extra_stats(self) -> dict[str, object]:
        tier = self.preparer.tier
        ls = self.listener.statistics()
        return {
            "tiers": {} if self.tiers is None else self.tiers.statistics(),
            "pinned_memory": tier.pinned,
            "segment_bytes": self.config.segment_bytes,
            "preparing_bytes": tier.preparing_bytes,
            "buffer_outruns": tier.outruns,
            "buffer_prepare_failures": tier.prepare_failures,
            "busy_workers": self.scheduler.busy_workers,
            "max_workers": self.config.max_workers,
            "pending_replies": ls.queued_replies,
            "dropped_replies": ls.dropped_replies,
            "oversized_messages": ls.oversized_messages,
            "parked_clients": ls.parked_clients,
            "listener": {
                "received": ls.received,
                "sent": ls.sent,
                "last_receive_age_s": ls.last_receive_age,
                "last_send_age_s": ls.last_send_age,
                "last_pass_age_s": ls.last_pass_age,
                "stalled": ls.stalled,
                "dropped_replies_by_client": dict(ls.drops_by_client),
            },
            "engine_pools": self.pools.statistics(),
        }

    async def run(
        self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled or signalled; `started(endpoint)` once bound.

        Raises `ConfigError` when the address cannot be bound.
        """
        self._check_memory()
        _import_torch_in_background()
        endpoint = self.listener.bind()
        if self.config.disable_lazy_alloc:
            try:
                await self._preallocate()
            except BaseException:
                self.listener.close()
                raise
        # Signals are caught from here on, so that one arriving during
        # start-up still means a clean shutdown rather than a traceback.
        signals = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        try:
            with signals as received:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.scheduler.run)
                    if self.tiers is not None:
                        # Opens the disk tier and seeds its index: hits from
                        # disk are served from the first request on. First,
                        # so that the index recovery overlaps torch's import.
                        await nursery.start(self.tiers.run)
                    if not self.config.disable_lazy_alloc:
                        await nursery.start(self.preparer.run)
                    if self.registrations is not None:
                        await nursery.start(self.registrations.run)
                        await self.registrations.restore(self.scheduler.register)
                    await nursery.start(self.pools.serve)
                    await nursery.start(self.handlers.run)
                    await nursery.start(self.listener.run)
                    nursery.start_soon(self._reap_silent_workers)
                    if self.config.metrics_port is not None:
                        await self._start_metrics(nursery)
                    # Start-up objects (torch, modules) live for good: keep
                    # the cyclic GC from rescanning them on the request path.
                    # No full collection first: it finds ~70 garbage objects
                    # among ~190,000 and would hold the first request back
                    # by 0.1-0.2 s on a small machine.
                    gc.freeze()
                    if self.config.port_file is not None:
                        _write_port_file(self.config.port_file, endpoint)
                    for line in self.summary(endpoint):
                        log.info("%s", line)
                    task_status.started(endpoint)
                    async for signum in received:
                        name = signal.Signals(signum).name
                        log.info("Received %s, shutting down", name)
                        break
                    await self.shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            self.listener.close()
            log.info("lmcd stopped")

    def summary(self, endpoint: str) -> list[str]:
        """The start-up lines: where lmcd listens and for which clients,
        its CPU buffer, and its lower tiers (the metrics port is logged
        when it is bound)."""
        cfg = self.config
        tier = self.preparer.tier
        dialects = [d.name for d in self.handlers.router.dialects]
        speaks = (
            dialects[0]
            if len(dialects) == 1
            else f"{', '.join(dialects)} (detected per connection)"
        )
        lines = [
            f"lmcd {__version__} listening on {endpoint} for {speaks}; "
            f"chunk size {cfg.chunk_size} tokens, {cfg.max_workers} copy "
            f"worker{'' if cfg.max_workers == 1 else 's'}",
        ]
        kind = "pinned" if tier.pinned else "host"
        growth = (
            "committed at start-up"
            if cfg.disable_lazy_alloc
            else f"prepared as it fills, {_gib(tier.lead_bytes)} ahead"
        )
        lines.append(
            f"CPU buffer: {_gib(tier.capacity)} of {kind} memory in segments of "
            f"{tier.segment_size >> 20} MiB, {growth}; lock TTL {cfg.lock_ttl:g} s"
        )
        lower = []
        if cfg.disk_path is not None:
            lower.append(
                f"disk {cfg.disk_path} ({cfg.disk_size:g} GiB, {cfg.disk_policy})"
            )
        if cfg.remote is not None:
            lower.append(f"remote {cfg.remote} (prefix {cfg.remote_prefix!r})")
        if lower:
            lines.append(f"Lower tiers: {'; '.join(lower)}")
        if cfg.pool_mb:
            lines.append(
                f"Engine-driven workers (lmcache 0.4.7+): {cfg.pool_mb} MiB "
                "shared-memory pool each"
            )
        return lines

    def _check_memory(self) -> None:
        """Refuse a buffer larger than the memory available (ConfigError),
        unless --allow-overcommit, which turns that into a warning: a buffer
        the machine cannot back ends in the OOM killer, not in an error."""
        cfg = self.config
        available = available_memory()
        if available is None or cfg.buffer_bytes <= available[0]:
            return
        message = (
            f"--cpu-buffer-size {cfg.cpu_buffer_size:g} GiB is more than the "
            f"{available[0] / (1 << 30):.1f} GiB of memory available "
            f"({available[1]})"
        )
        if not cfg.allow_overcommit:
            raise ConfigError(
                f"{message}; lower it, or pass --allow-overcommit to start anyway"
            )
        log.warning("%s; starting anyway (--allow-overcommit)", message)

    async def _preallocate(self) -> None:
        """--disable-lazy-alloc: obtain and commit (populate, or pin) the
        whole buffer in worker threads, or raise ConfigError."""
        tier = self.storage.tier
        assert isinstance(tier, PinnedCpuTier)
        gib = tier.capacity / (1 << 30)
        kind = "pinned" if tier.pinned else "host"
        log.info("Allocating and committing the whole %.2f GiB %s buffer", gib, kind)
        started = time.perf_counter()
        try:
            await preallocate(tier, workers=min(8, os.cpu_count() or 1))
        except MemoryError as e:
            raise ConfigError(
                f"--disable-lazy-alloc: cannot allocate the {gib:.2f} GiB buffer: {e}"
            ) from None
        log.info(
            "Allocated and committed %.2f GiB of %s memory (%d segments) in %.1f s",
            gib,
            kind,
            tier.statistics().segments,
            time.perf_counter() - started,
        )

    async def _reap_silent_workers(self) -> None:
        """Close the registrations of heartbeat clients (lmcache 0.4+) that
        went silent: a worker that died without unregistering must not hold
        its shared memory and descriptors for ever (LMCache #3206). That
        includes engine-driven workers, whose pools are removed."""
        cfg = self.config
        period = min(10.0, cfg.worker_timeout / 4)
        while True:
            await trio.sleep(period)
            now = time.monotonic()
            for instance_id in self.scheduler.silent_instances(
                now, cfg.worker_timeout, cfg.registration_grace
            ):
                log.warning(
                    "Worker %d silent for over %.0f s; unregistering it",
                    instance_id,
                    cfg.worker_timeout,
                )
                self.handlers.counters.reaped_workers += 1
                await self.scheduler.unregister(instance_id)
            for instance_id in self.pools.silent_instances(
                now, cfg.worker_timeout, cfg.registration_grace
            ):
                log.warning(
                    "Engine-driven worker %d silent for over %.0f s; "
                    "unregistering it and removing its pool",
                    instance_id,
                    cfg.worker_timeout,
                )
                self.handlers.counters.reaped_workers += 1
                await self.pools.unregister(instance_id)

    async def _start_metrics(self, nursery: trio.Nursery) -> None:
        from lmcd import metrics

        app = metrics.make_app(self.handlers.stats, self.listener.healthy)
        port = self.config.metrics_port
        assert port is not None
        urls = await nursery.start(metrics.serve, app, self.config.host, port)
        log.info("Metrics on %s/metrics", urls[0] if urls else port)

    async def shutdown(self) -> None:
        """Answer the requests already received, stop receiving, and let
        in-flight requests finish within the grace; then give queued
        replies a moment to leave. Data-plane requests not started by now
        are answered with their failure reply."""
        self.handlers.begin_shutdown()
        with trio.move_on_after(self.config.shutdown_grace) as scope:
            await self.listener.finish_input()
            await self.handlers.drain()
        self.listener.stop_accepting()
        if scope.cancelled_caught:
            log.warning(
                "%d requests still running after %.1f s; cancelling",
                self.handlers.inflight,
                self.config.shutdown_grace,
            )
        # Replies to clients whose pipes are full wait in their outboxes;
        # the rest are with ZMQ, which gets LINGER to send them at close.
        with trio.move_on_after(0.5):
            await self.listener.wait_sent()


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _write_port_file(path: str, endpoint: str) -> None:
    """Write the bound port (the text after the endpoint's last colon) and a
    newline to `path`, atomically, once the daemon serves: a reader that
    sees the file may connect. Raises `ConfigError` if it cannot."""
    port = endpoint.rsplit(":", 1)[-1]
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{port}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write --port-file {path}: {e.strerror}") from e
