"""Daemon settings, validated once at start-up."""

from __future__ import annotations

import math
import os
import socket

import attrs

from lmcd.errors import ConfigError
from lmcd.transfer.cuda import DEFAULT_STAGING_BYTES
from lmcd.wire.registry import dialects_for
from lmcd_backends.pinned_cpu import DEFAULT_LEAD_BYTES, DEFAULT_SEGMENT_BYTES

GiB = 1 << 30
MiB = 1 << 20
# Upper bounds that keep every size an ordinary int (`inf` or 1e300 GiB
# would overflow) while allowing any real machine.
MAX_BUFFER_GIB = 1 << 20
MAX_MB = 1 << 30
MAX_SECONDS = 366 * 24 * 3600.0
MAX_MESSAGE_MB = 4096
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
    # The most one message may carry after its routing identity (MiB).
    max_message_mb: int = 32
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
        check_int("--chunk-size", self.chunk_size, 1, 1 << 20)
        check_number(
            "--cpu-buffer-size", self.cpu_buffer_size, 0, MAX_BUFFER_GIB, "GiB"
        )
        check_int("--port", self.port, 0, 65535)
        if self.metrics_port is not None:
            check_int("--metrics-port", self.metrics_port, 0, 65535)
            if self.metrics_port == self.port != 0:
                raise ConfigError(
                    f"--metrics-port must differ from --port (both {self.port})"
                )
        check_int("--max-workers", self.max_workers, 1, 1024)
        check_number("--lock-ttl", self.lock_ttl, 0, MAX_SECONDS, "seconds")
        check_int("--staging-mb", self.staging_mb, 1, MAX_MB)
        check_int("--segment-mb", self.segment_mb, 1, MAX_MB)
        check_int("--prepare-ahead-mb", self.prepare_ahead_mb, 0, MAX_MB)
        check_number("--worker-timeout", self.worker_timeout, 0, MAX_SECONDS, "seconds")
        check_int("--pool-size", self.pool_mb, 0, 1 << 20)
        check_int("--max-message-mb", self.max_message_mb, 1, MAX_MESSAGE_MB)
        dialects_for(self.dialect)  # raises ConfigError for an unknown name
        if self.buffer_bytes < 4096:
            raise ConfigError("--cpu-buffer-size is smaller than one 4 KiB page")
        if self.shm_owners is not None and (
            not self.shm_owners or any(not 0 <= u < 1 << 32 for u in self.shm_owners)
        ):
            raise ConfigError("--shm-owners must name at least one uid in 0..2^32-1")
        check_bind_host(self.host)
        if self.port_file is not None:
            parent = os.path.dirname(os.path.abspath(self.port_file))
            if not os.path.isdir(parent):
                raise ConfigError(f"--port-file: no directory {parent!r}")
        self._check_tiers()

    def _check_tiers(self) -> None:
        if self.disk_path is not None:
            if not self.disk_path:
                raise ConfigError("--disk-path must name a directory")
            check_number("--disk-size", self.disk_size, 0, MAX_BUFFER_GIB, "GB")
        if self.disk_policy not in DISK_POLICIES:
            raise ConfigError(
                f"--disk-policy must be one of {', '.join(DISK_POLICIES)} "
                f"(got {self.disk_policy!r})"
            )
        check_int("--disk-threads", self.disk_threads, 1, 256)
        if self.disk_direct_io not in DIRECT_IO:
            raise ConfigError(
                "--disk-direct-io must be auto, on or off "
                f"(got {self.disk_direct_io!r})"
            )
        check_number("--disk-high-water", self.disk_high_water, 0, 1, "(a fraction)")
        check_number(
            "--promotion-timeout", self.promotion_timeout, 0, MAX_SECONDS, "seconds"
        )
        if self.remote is not None:
            from lmcd_backends.remote.tier import parse_url

            parse_url(self.remote)  # raises ConfigError
            if self.remote_mode not in ("auto", "cluster", "standalone"):
                raise ConfigError(
                    "--remote-mode must be auto, cluster or standalone "
                    f"(got {self.remote_mode!r})"
                )
            if self.remote_ttl is not None:
                check_number("--remote-ttl", self.remote_ttl, 0, MAX_SECONDS, "seconds")
            check_number(
                "--remote-timeout", self.remote_timeout, 0, MAX_SECONDS, "seconds"
            )
            check_number(
                "--remote-lookup-timeout",
                self.remote_lookup_timeout,
                0,
                MAX_SECONDS,
                "seconds",
            )
            check_int("--remote-queue", self.remote_queue, 1, 1 << 20)

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
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB

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


def check_int(flag: str, value: int, low: int, high: int) -> None:
    """Raise `ConfigError` naming `flag` unless `low <= value <= high`."""
    if not low <= value <= high:
        raise ConfigError(f"{flag} must be in {low}..{high} (got {value})")


def check_number(flag: str, value: float, above: float, high: float, unit: str) -> None:
    """Raise `ConfigError` naming `flag` unless `above < value <= high`
    (which also refuses nan and infinities)."""
    if not (above < value <= high and math.isfinite(value)):
        raise ConfigError(
            f"{flag} must be > {_num(above)} and at most {_num(high)} {unit} "
            f"(got {value})"
        )


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def check_bind_host(host: str) -> None:
    """`serve --host`: `*`, a local interface's name, or an address or name
    that resolves; raises `ConfigError` otherwise (ZeroMQ would say only
    "No such device")."""
    if host == "*" or host in {name for _, name in socket.if_nameindex()}:
        return
    check_host("--host", host)


def check_host(flag: str, host: str) -> None:
    """Raise `ConfigError` unless `host` resolves to an address."""
    if not host:
        raise ConfigError(f"{flag} must not be empty")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{flag} {host!r} does not resolve ({reason})") from None


def check_target(host: str, port: int) -> None:
    """`--host`/`--port` of a client command (inspect, bench, clear)."""
    check_host("--host", host)
    check_int("--port", port, 1, 65535)
