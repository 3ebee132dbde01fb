"""The host path: KV caches in `/dev/shm` files, copied on the CPU.

REGISTER_KV_CACHE with extension code 2 (or an lmcache 0.5 `cpu_shm`
descriptor, mapped to the same `HostTensorRef`) names, per layer, a file in
`/dev/shm`, a byte offset, a shape and a dtype. Nothing in such a request is
trusted (see "Host path threat model" in docs/operations.md):

- only a bare file name of a registration pattern is accepted (`lmcd-*`, or
  lmcache's `lmcache_kv_<pid>_<n>`), opened relative to a descriptor of the
  shared-memory directory itself with `O_NOFOLLOW`: no `..`, no
  subdirectory, no symbolic link can lead anywhere else;
- the *opened* descriptor is then checked (`fstat`: a regular file on that
  same tmpfs, one link, an allowed owner, long enough). No path is ever
  checked and then opened again.

Copies never map the client's file: a mapping faults (SIGBUS, the whole
daemon dies) when the client truncates the file or the tmpfs cannot back a
sparse page. They use `preadv`/`pwritev` on the descriptor instead, one
system call per run of consecutive blocks, so every such case is an error
return, raised as `TransferError`. Copies run in a worker thread on the plan
the scheduler hands over; they never touch the storage index.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import math
import os
import re
import resource
import stat
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any

import attrs

from lmcd.errors import RegistrationError, TransferError
from lmcd.transfer.layouts import KVLayout
from lmcd.wire.types import HostTensorRef

SHM_ROOT = "/dev/shm"

# The only file names a host tensor may have: lmcd's own (`lmcd.shmkv`) and
# lmcache's `cpu_shm` segments (`CpuShmTensorWrapper.SHM_NAME_PREFIX`
# "/lmcache_kv_" + "<pid>_<n>", lmcache 0.4.7 and 0.5.x). Neither admits a
# "/" or a name made only of dots, so a name is always one entry of the
# directory itself. 255 is NAME_MAX.
_NAME_PATTERNS = (
    re.compile(r"lmcd-[A-Za-z0-9._-]{1,250}"),
    re.compile(r"lmcache_kv_[0-9]{1,20}_[0-9]{1,20}"),
)
NAME_PATTERNS_TEXT = "lmcd-* or lmcache_kv_<pid>_<n>"

# O_NONBLOCK: opening a FIFO or device that someone planted under an allowed
# name must not block the worker; it is refused by the fstat check after.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def torch_dtype(name: str) -> Any:
    """The torch dtype called `name` (e.g. "bfloat16")."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RegistrationError(f"unknown torch dtype {name!r}")
    return dtype


def default_file_limit() -> int:
    """How many shared-memory files registrations may hold open at once:
    three quarters of the soft open-file limit, so that a client that
    registers many files cannot take the descriptors that new connections
    and the daemon itself need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft * 3 // 4)


def shm_file_name(path: str, shm_dir: str = SHM_ROOT) -> str:
    """The bare file name that `path` names in `shm_dir`.

    `path` must be `shm_dir + "/" + name`; one more "/" before the name is
    allowed, because lmcache's `shm_name` carries a leading slash
    ("/lmcache_kv_<pid>_<n>") and joins to "/dev/shm//lmcache_kv_...". The
    name must match a registration pattern (`NAME_PATTERNS_TEXT`).

    Raises `RegistrationError` otherwise.
    """
    prefix = shm_dir.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise RegistrationError(
            f"host KV cache {_shown(path)} is not a file in {shm_dir}"
        )
    name = path[len(prefix) :]
    if name.startswith("/"):
        name = name[1:]
    if not any(p.fullmatch(name) for p in _NAME_PATTERNS):
        raise RegistrationError(
            f"host KV cache {_shown(path)} is not a registrable shared-memory "
            f"name (a file directly in {shm_dir} named {NAME_PATTERNS_TEXT})"
        )
    return name


def _shown(path: str) -> str:
    """A client's path for a log line: quoted, escaped and at most ~100
    characters (the codec does not bound its length)."""
    return repr(path) if len(path) <= 100 else repr(path[:100]) + "..."


@attrs.define(slots=True)
class ShmFile:
    """An opened, checked shared-memory file. `required` is how many bytes
    the registered tensors in it need; a copy fails once the file is shorter."""

    name: str
    fd: int
    required: int = 0

    def check(self) -> None:
        """Raise `TransferError` if the file is now shorter than its tensors."""
        try:
            size = os.fstat(self.fd).st_size
        except OSError as e:  # the descriptor is ours: should not happen
            raise TransferError(f"{self.name}: fstat failed: {e.strerror}") from e
        if size < self.required:
            raise TransferError(
                f"{self.name} shrank to {size} bytes after registration "
                f"(its tensors need {self.required})"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@attrs.frozen
class LayerSpan:
    """Where one layer's tensor lies: a file and the byte offset in it."""

    file: ShmFile
    offset: int


@attrs.define(slots=True)
class HostKV:
    """An opened host KV cache: per layer, the file and offset of its
    `[K, num_blocks, block_row]` contiguous tensor."""

    layout: KVLayout
    layers: list[LayerSpan]
    files: list[ShmFile]

    def check(self) -> None:
        """Raise `TransferError` if a file behind the cache has shrunk."""
        for f in self.files:
            f.check()

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        self.layers.clear()
        for f in self.files:
            f.close()
        self.files.clear()


def open_host_kv(
    refs: Sequence[HostTensorRef],
    *,
    owners: Collection[int] | None = None,
    shm_dir: str = SHM_ROOT,
) -> HostKV:
    """Open and check every file of a host KV cache.

    `owners`: the uids whose files may be registered (None: any owner).
    `shm_dir` is for tests on a small tmpfs; the daemon uses `/dev/shm`.

    Raises `RegistrationError` for a name outside the registration patterns
    or outside `shm_dir`, a symbolic link, anything but a regular file with
    one link on the same file system as `shm_dir`, a file of another owner,
    a file too short for its tensor (or a misaligned offset), strides that
    are not contiguous, or layers that differ in shape or dtype.
    """
    layout = KVLayout.detect([r.shape for r in refs], [r.dtype for r in refs])
    for ref in refs:
        check_contiguous(ref)
    tensor_bytes = math.prod(refs[0].shape) * layout.itemsize
    kv = HostKV(layout, [], [])
    try:
        dir_fd = os.open(shm_dir, _DIR_FLAGS)
    except OSError as e:
        raise RegistrationError(f"cannot open {shm_dir}: {e.strerror}") from e
    try:
        dir_dev = os.fstat(dir_fd).st_dev
        by_name: dict[str, ShmFile] = {}
        for ref in refs:
            name = shm_file_name(ref.path, shm_dir)
            f = by_name.get(name)
            if f is None:
                f = by_name[name] = _open_checked(dir_fd, dir_dev, name, owners)
                kv.files.append(f)
            _check_fits(f, ref, tensor_bytes, layout.itemsize)
            f.required = max(f.required, ref.offset + tensor_bytes)
            kv.layers.append(LayerSpan(f, ref.offset))
    except BaseException:
        kv.close()
        raise
    finally:
        os.close(dir_fd)
    return kv


def check_contiguous(ref: HostTensorRef) -> None:
    """Raise `RegistrationError` unless `ref.stride` is None or the
    row-major contiguous strides of `ref.shape` (in elements; the stride of
    a dimension of size 1 is free, as torch's `is_contiguous` has it)."""
    if ref.stride is None:
        return
    if len(ref.stride) != len(ref.shape):
        raise RegistrationError(
            f"{_shown(ref.path)}: {len(ref.stride)} strides for a "
            f"{len(ref.shape)}-d shape"
        )
    expected = 1
    for size, stride in zip(reversed(ref.shape), reversed(ref.stride), strict=True):
        if size != 1 and stride != expected:
            raise RegistrationError(
                f"{_shown(ref.path)}: strides {list(ref.stride)} of shape "
                f"{list(ref.shape)} are not contiguous; only contiguous host "
                "tensors are supported"
            )
        expected *= size


def _open_checked(
    dir_fd: int, dir_dev: int, name: str, owners: Collection[int] | None
) -> ShmFile:
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RegistrationError(f"{name} is a symbolic link") from e
        raise RegistrationError(f"cannot open {name}: {e.strerror}") from e
    try:
        _check_opened(fd, name, dir_dev, owners)
    except BaseException:
        os.close(fd)
        raise
    return ShmFile(name, fd)


def _check_opened(
    fd: int, name: str, dir_dev: int, owners: Collection[int] | None
) -> None:
    """The checks on the opened descriptor (never on a path)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RegistrationError(f"{name} is not a regular file")
    if st.st_dev != dir_dev:
        raise RegistrationError(f"{name} is not on the shared-memory file system")
    if st.st_nlink != 1:
        raise RegistrationError(
            f"{name} has {st.st_nlink} links (a registered file must have one)"
        )
    if owners is not None and st.st_uid not in owners:
        raise RegistrationError(
            f"{name} is owned by uid {st.st_uid}, not one of --shm-owners"
        )


def _check_fits(f: ShmFile, ref: HostTensorRef, nbytes: int, itemsize: int) -> None:
    size = os.fstat(f.fd).st_size
    if ref.offset < 0 or ref.offset % itemsize or ref.offset + nbytes > size:
        raise RegistrationError(
            f"{f.name}: {nbytes} bytes at offset {ref.offset} do not fit "
            f"a {size}-byte file (or the offset is misaligned)"
        )


# -- copies --------------------------------------------------------------------


def _memory(buffer: Any, nbytes: int) -> memoryview:
    """A writable byte view of the first `nbytes` of a contiguous tensor
    (the caller keeps the tensor alive while the view is used)."""
    if not buffer.is_contiguous() or buffer.numel() * buffer.element_size() < nbytes:
        raise TransferError(f"chunk buffer is not {nbytes} contiguous bytes")
    array = (ctypes.c_ubyte * nbytes).from_address(buffer.data_ptr())
    return memoryview(array).cast("B")


def _plan(
    kv: HostKV, block_ids: Sequence[int], first_token: int = 0
) -> list[tuple[LayerSpan, int, int, int]]:
    """The copies of one chunk: `(layer, file offset, chunk offset, bytes)`,
    one per run of consecutive block ids per layer and plane; the chunk is
    `[K, layers, tokens, hidden]` (see layouts.py). The chunk's tokens
    before `first_token` are left out (a retrieve's skipped tokens)."""
    layout = kv.layout
    row = layout.block_row * layout.itemsize
    token_bytes = row // layout.block_size
    plane_bytes = layout.num_blocks * row
    n = len(block_ids)
    runs = block_runs(block_ids)
    plan = []
    for layer, span in enumerate(kv.layers):
        for plane in range(layout.planes):
            at = (plane * layout.num_layers + layer) * n * row
            for start, count in runs:
                size = count * row
                # Tokens of this run before `first_token`: a run lies
                # contiguously in the file and in the chunk, so leaving a
                # prefix out only moves both offsets.
                cut = min(size, max(0, first_token * token_bytes - at % (n * row)))
                if cut < size:
                    plan.append(
                        (
                            span,
                            span.offset + plane * plane_bytes + start * row + cut,
                            at + cut,
                            size - cut,
                        )
                    )
                at += size
    return plan


def gather(kv: HostKV, chunks: Sequence[tuple[Sequence[int], Any]]) -> None:
    """Copy each chunk's blocks out of the KV cache into its buffer.

    `chunks` is `[(block_ids, uint8 buffer)]`; the buffer receives the chunk
    in `[K, layers, tokens, hidden]` order. The reads are spread over up to
    `COPY_THREADS` threads (this one included). Raises `TransferError` when
    a file is shorter than at registration or a read fails.
    """
    kv.check()
    _in_parallel(_copies(kv, chunks), _read, per_file=False)


def scatter(
    kv: HostKV,
    chunks: Sequence[tuple[Sequence[int], Any]],
    skip: Sequence[int] = (),
) -> None:
    """Copy each chunk's buffer into its blocks of the KV cache (reverse of
    `gather`); `skip[i]` (when given) is chunk i's first token to write.
    Writes to one file are serialized by the kernel (the inode lock), so
    only different files are written in parallel. Raises `TransferError`
    when a file is shorter than at registration or a write fails (e.g.
    ENOSPC on a full tmpfs for a file that is not fully backed).
    """
    kv.check()
    _in_parallel(_copies(kv, chunks, skip), _write, per_file=True)


# One copy: the file, the chunk bytes of the run, the run's offset in the file.
_Copy = tuple[ShmFile, memoryview, int]


def _copies(
    kv: HostKV, chunks: Sequence[tuple[Sequence[int], Any]], skip: Sequence[int] = ()
) -> list[_Copy]:
    copies: list[_Copy] = []
    for i, (block_ids, buffer) in enumerate(chunks):
        memory = _memory(
            buffer, kv.layout.chunk_bytes(len(block_ids) * kv.layout.block_size)
        )
        first = skip[i] if skip else 0
        for span, file_at, at, size in _plan(kv, block_ids, first):
            copies.append((span.file, memory[at : at + size], file_at))
    return copies


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Threads one copy may use. The kernel's copy between the page cache and
# user memory costs about twice a memcpy per byte with 4 KiB tmpfs pages
# (per-page work), and scales with threads until memory bandwidth runs out.
COPY_THREADS = max(1, min(4, _cpus()))

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helpers() -> concurrent.futures.ThreadPoolExecutor:
    global _pool  # noqa: PLW0603 - one pool for the process, made on first use
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, COPY_THREADS - 1), thread_name_prefix="lmcd-copy"
            )
        return _pool


def _in_parallel(
    copies: list[_Copy],
    copy: Callable[[ShmFile, memoryview, int], None],
    *,
    per_file: bool,
) -> None:
    groups = _split(copies, COPY_THREADS, per_file=per_file)
    if len(groups) == 1:
        _run(groups[0], copy)
        return
    pool = _helpers()
    futures = [pool.submit(_run, group, copy) for group in groups[1:]]
    try:
        _run(groups[0], copy)
    finally:
        # Never return while a helper still copies: the buffers and the
        # descriptors must outlive every copy.
        concurrent.futures.wait(futures)
    for future in futures:
        future.result()  # the first helper's error, if any


def _split(copies: list[_Copy], n: int, *, per_file: bool) -> list[list[_Copy]]:
    if n <= 1 or len(copies) <= 1:
        return [copies]
    if not per_file:
        return [copies[i::n] for i in range(min(n, len(copies)))]
    slot: dict[int, int] = {}
    for f, _, _ in copies:
        slot.setdefault(id(f), len(slot) % n)
    if len(slot) <= 1:
        return [copies]
    groups: list[list[_Copy]] = [[] for _ in range(min(n, len(slot)))]
    for c in copies:
        groups[slot[id(c[0])]].append(c)
    return groups


def _run(copies: list[_Copy], copy: Callable[[ShmFile, memoryview, int], None]) -> None:
    for f, memory, at in copies:
        copy(f, memory, at)


def _read(f: ShmFile, into: memoryview, at: int) -> None:
    done, size = 0, len(into)
    while done < size:  # Linux caps one call at about 2 GiB
        try:
            n = os.preadv(f.fd, [into[done:]], at + done)
        except OSError as e:
            raise TransferError(f"reading {f.name} failed: {e.strerror}") from e
        if n <= 0:
            raise TransferError(
                f"{f.name} ended at byte {at + done}: shrank during the copy"
            )
        done += n


def _write(f: ShmFile, data: memoryview, at: int) -> None:
    done, size = 0, len(data)
    while done < size:
        try:
            n = os.pwritev(f.fd, [data[done:]], at + done)
        except OSError as e:
            raise TransferError(f"writing {f.name} failed: {e.strerror}") from e
        if n <= 0:
            raise TransferError(
                f"writing {f.name} made no progress at byte {at + done}"
            )
        done += n


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """`block_ids` as (first id, count) runs of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
