"""The daemon: one Trio nursery holding listener, handlers, scheduler, storage.

    typer CLI -- lmcd serve --> trio.run(Daemon.run)
                                 nursery
                                 |-- listener   ZMQ ROUTER <-> frames
                                 |-- handlers   inline control plane, a task per copy
                                 |-- scheduler  in-flight copies and completions
                                 |-- pools      engine-driven workers' shm pools
                                 |-- tiers      disk and remote tiers (optional)
                                 `-- storage    index, locks, LRU over a tier

Shutdown (SIGINT/SIGTERM, or cancellation): stop receiving, give in-flight
requests `grace` seconds to finish and be answered, then cancel the rest and
close the socket.
"""

from __future__ import annotations

import gc
import logging
import signal
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
from lmcd_backends.pinned_cpu import PinnedCpuTier

log = logging.getLogger(__name__)


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

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        tier = PinnedCpuTier(cfg.buffer_bytes, segment_bytes=cfg.segment_bytes)
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
        self.listener = Listener(cfg.host, cfg.port, self._on_message)
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

    def _extra_stats(self) -> dict[str, object]:
        return {
            "tiers": {} if self.tiers is None else self.tiers.statistics(),
            "pinned_memory": bool(getattr(self.storage.tier, "pinned", False)),
            "busy_workers": self.scheduler.busy_workers,
            "max_workers": self.config.max_workers,
            "pending_replies": self.listener.pending_replies,
            "dropped_replies": self.listener.dropped_replies,
            "engine_pools": self.pools.statistics(),
        }

    async def run(
        self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled or signalled; `started(endpoint)` once bound.

        Raises `ConfigError` when the address cannot be bound.
        """
        endpoint = self.listener.bind()
        if self.config.disable_lazy_alloc:
            tier = self.storage.tier
            assert isinstance(tier, PinnedCpuTier)
            log.info(
                "Allocating the whole %.2f GiB buffer now", self.config.cpu_buffer_size
            )
            try:
                await trio.to_thread.run_sync(tier.preallocate)
            except MemoryError as e:
                self.listener.close()
                raise ConfigError(str(e)) from e
        # Signals are caught from here on, so that one arriving during
        # start-up still means a clean shutdown rather than a traceback.
        signals = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        try:
            with signals as received:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.scheduler.run)
                    if self.tiers is not None:
                        # Opens the disk tier and seeds its index: hits from
                        # disk are served from the first request on.
                        await nursery.start(self.tiers.run)
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
                    gc.collect()
                    gc.freeze()
                    log.info(
                        "lmcd %s listening on %s (chunk size %d, CPU buffer "
                        "%.2f GiB, %d worker%s)",
                        __version__,
                        endpoint,
                        self.config.chunk_size,
                        self.config.cpu_buffer_size,
                        self.config.max_workers,
                        "" if self.config.max_workers == 1 else "s",
                    )
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

        app = metrics.make_app(self.handlers.stats, lambda: self.listener.serving)
        port = self.config.metrics_port
        assert port is not None
        urls = await nursery.start(metrics.serve, app, self.config.host, port)
        log.info("Metrics on %s/metrics", urls[0] if urls else port)

    async def shutdown(self) -> None:
        """Stop receiving and let in-flight requests finish within the grace."""
        self.listener.stop_accepting()
        with trio.move_on_after(self.config.shutdown_grace) as scope:
            await self.handlers.drain()
        if scope.cancelled_caught:
            log.warning(
                "%d requests still running after %.1f s; cancelling",
                self.handlers.inflight,
                self.config.shutdown_grace,
            )
        # Let the listener push out the last replies before it is cancelled.
        with trio.move_on_after(0.5):
            # Shutdown only, bounded: the outbox has no event to wait on.
            while self.listener.pending_replies:  # noqa: ASYNC110
                await trio.sleep(0.01)
