"""Daemon settings, validated once at start-up."""

from __future__ import annotations

import attrs

from lmcd.errors import ConfigError
from lmcd.transfer.cuda import DEFAULT_STAGING_BYTES
from lmcd.wire.registry import dialects_for
from lmcd_backends.pinned_cpu import DEFAULT_LEAD_BYTES, DEFAULT_SEGMENT_BYTES

GiB = 1 << 30
MiB = 1 << 20
DISK_POLICIES = ("write-back", "write-through")
DIRECT_IO: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


@attrs.frozen
class Config:
    """`lmcd serve`'s flags. Defaults are the reference server's."""

    host: str = "localhost"
    port: int = 5555
    chunk_size: int = 256
    cpu_buffer_size: float = 5.0  # GiB, like the reference's "GB"
    max_workers: int = 1
    lock_ttl: float = 300.0
    staging_mb: int = DEFAULT_STAGING_BYTES // MiB
    segment_mb: int = DEFAULT_SEGMENT_BYTES // MiB
    shutdown_grace: float = 3.0
    metrics_port: int | None = None
    disable_lazy_alloc: bool = False
    allow_overcommit: bool = False
    prepare_ahead_mb: int = DEFAULT_LEAD_BYTES // MiB
    dialect: str = "auto"
    worker_timeout: float = 120.0
    # A heartbeat client that never pinged is reaped only after this long
    # (lmcache's registration grace).
    registration_grace: float = 3600.0
    # Each engine-driven worker's shared-memory pool (MiB); 0 refuses that mode.
    pool_mb: int = 1024
    # uids whose /dev/shm files may be registered; None: any owner.
    shm_owners: frozenset[int] | None = None
    # Where to write the bound port (for `--port 0`).
    port_file: str | None = None
    # -- lower tiers (lmcd.tiering; docs/disk-tier.md, docs/valkey.md) --
    disk_path: str | None = None
    disk_size: float = 0.0  # GiB
    disk_policy: str = "write-back"
    disk_threads: int = 4
    disk_direct_io: str = "auto"
    disk_fsync: bool = False
    # Write-back demotes while the CPU buffer is at least this full.
    disk_high_water: float = 0.8
    # Where registrations are remembered across restarts (default: the disk
    # path); None with no disk path: not remembered.
    state_dir: str | None = None
    promotion_timeout: float = 10.0
    remote: str | None = None
    remote_prefix: str = "lmcd:"
    remote_mode: str = "auto"
    remote_ttl: float | None = None
    remote_timeout: float = 1.0
    remote_lookup_timeout: float = 0.1
    remote_queue: int = 256
    remote_username: str | None = None
    remote_tls_ca_file: str | None = None
    remote_tls_cert_file: str | None = None
    remote_tls_key_file: str | None = None
    remote_tls_server_name: str | None = None
    remote_tls_verify: bool = True

    def __attrs_post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ConfigError(f"--chunk-size must be > 0 (got {self.chunk_size})")
        if not self.cpu_buffer_size > 0:
            raise ConfigError(
                f"--cpu-buffer-size must be > 0 (got {self.cpu_buffer_size})"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535 (got {self.port})")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"--metrics-port must be in 0..65535 (got {self.metrics_port})"
            )
        if self.max_workers < 1:
            raise ConfigError(f"--max-workers must be >= 1 (got {self.max_workers})")
        if not self.lock_ttl > 0:
            raise ConfigError(f"--lock-ttl must be > 0 (got {self.lock_ttl})")
        if self.staging_mb < 1 or self.segment_mb < 1:
            raise ConfigError("--staging-mb and --segment-mb must be >= 1")
        if self.prepare_ahead_mb < 0:
            raise ConfigError(
                f"--prepare-ahead-mb must be >= 0 (got {self.prepare_ahead_mb})"
            )
        if not 0 < self.worker_timeout < float("inf"):
            raise ConfigError(
                f"--worker-timeout must be > 0 seconds (got {self.worker_timeout})"
            )
        if not 0 <= self.pool_mb <= 1 << 20:
            raise ConfigError(
                f"--pool-size must be 0..{1 << 20} MiB (got {self.pool_mb})"
            )
        dialects_for(self.dialect)  # raises ConfigError for an unknown name
        if self.buffer_bytes < 4096:
            raise ConfigError("--cpu-buffer-size is smaller than one 4 KiB page")
        if self.shm_owners is not None and (
            not self.shm_owners or any(not 0 <= u < 1 << 32 for u in self.shm_owners)
        ):
            raise ConfigError("--shm-owners must name at least one uid in 0..2^32-1")
        self._check_tiers()

    def _check_tiers(self) -> None:
        if self.disk_path is not None:
            if not self.disk_path:
                raise ConfigError("--disk-path must name a directory")
            if not self.disk_size > 0:
                raise ConfigError("--disk-size (GB) must be > 0 with --disk-path")
        if self.disk_policy not in DISK_POLICIES:
            raise ConfigError(
                f"--disk-policy must be one of {', '.join(DISK_POLICIES)} "
                f"(got {self.disk_policy!r})"
            )
        if not 1 <= self.disk_threads <= 256:
            raise ConfigError(
                f"--disk-threads must be 1..256 (got {self.disk_threads})"
            )
        if self.disk_direct_io not in DIRECT_IO:
            raise ConfigError(
                "--disk-direct-io must be auto, on or off "
                f"(got {self.disk_direct_io!r})"
            )
        if not 0 < self.disk_high_water <= 1:
            raise ConfigError(
                f"--disk-high-water must be in (0, 1] (got {self.disk_high_water})"
            )
        if not 0 < self.promotion_timeout < float("inf"):
            raise ConfigError("--promotion-timeout must be > 0 seconds")
        if self.remote is not None:
            from lmcd_backends.remote.tier import parse_url

            parse_url(self.remote)  # raises ConfigError
            if self.remote_mode not in ("auto", "cluster", "standalone"):
                raise ConfigError("--remote-mode must be auto, cluster or standalone")
            if self.remote_ttl is not None and not self.remote_ttl > 0:
                raise ConfigError("--remote-ttl must be > 0 seconds")
            if not (self.remote_timeout > 0 and self.remote_lookup_timeout > 0):
                raise ConfigError("--remote-timeout and --remote-lookup-timeout > 0")
            if not 1 <= self.remote_queue <= 1 << 20:
                raise ConfigError("--remote-queue must be 1..1048576 chunks")

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_size * GiB)

    @property
    def direct_io(self) -> bool | None:
        """DiskTier's `direct`: None (auto), True (required) or False."""
        return DIRECT_IO[self.disk_direct_io]

    @property
    def registrations_dir(self) -> str | None:
        return self.state_dir or self.disk_path

    @property
    def buffer_bytes(self) -> int:
        return int(self.cpu_buffer_size * GiB)

    @property
    def pool_bytes(self) -> int:
        return self.pool_mb * MiB

    @property
    def staging_bytes(self) -> int:
        return self.staging_mb * MiB

    @property
    def segment_bytes(self) -> int:
        return self.segment_mb * MiB

    @property
    def lead_bytes(self) -> int:
        return self.prepare_ahead_mb * MiB


def parse_uids(text: str) -> frozenset[int]:
    """`--shm-owners`: comma-separated numeric uids ("0,1000").

    Raises `ConfigError` for anything else (names are not looked up: the
    daemon may run where the clients' user names do not exist).
    """
    uids: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        if not part.isascii() or not part.isdigit():
            raise ConfigError(
                f"--shm-owners takes comma-separated numeric uids (got {text!r})"
            )
        uids.add(int(part))
    return frozenset(uids)
