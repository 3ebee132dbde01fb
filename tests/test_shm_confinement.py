"""The host path's confinement to /dev/shm and its fault-free copies.

In-process tests of `lmcd.transfer.host` and `lmcd.shmkv`: which files a
client can make the daemon open (only a bare `lmcd-*` or
`lmcache_kv_<pid>_<n>` name in /dev/shm, checked after opening), and that a
file that shrinks or cannot be backed turns a copy into a `TransferError`,
never a signal. docs/operations.md ("Host path threat model") cites these.
End-to-end counterparts against a live daemon are in test_host_path.py.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmcd.errors import RegistrationError, TransferError
from lmcd.shmkv import SharedKVCache
from lmcd.transfer import host
from lmcd.wire.types import HostTensorRef
from tests.peers import run as peers

SHAPE = (2, 8, 4, 2, 8)  # MHA: 2 x 8 blocks x 4 tokens x 2 heads x 8
LAYER_BYTES = math.prod(SHAPE) * 2  # float16
_n = itertools.count()

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mount)")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def shm() -> Iterator[Callable[[str], Path]]:
    """`shm(prefix)`: a fresh unique path in /dev/shm; all removed after."""
    made: list[Path] = []

    def new(prefix: str) -> Path:
        path = Path(host.SHM_ROOT) / f"{prefix}{os.getpid()}_{next(_n)}"
        made.append(path)
        return path

    yield new
    for path in reversed(made):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def make_file(path: Path, nbytes: int = 2 * LAYER_BYTES, seed: int = 0) -> bytes:
    """A fully backed file of random bytes; returns its content."""
    data = random.Random(seed).randbytes(nbytes)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    return data


def refs(path: str, layers: int = 2, **kw: Any) -> list[HostTensorRef]:
    return [
        HostTensorRef(path, i * LAYER_BYTES, SHAPE, "float16", **kw)
        for i in range(layers)
    ]


def chunk(kv: host.HostKV, blocks: int) -> torch.Tensor:
    return torch.zeros(
        kv.layout.chunk_bytes(blocks * kv.layout.block_size), dtype=torch.uint8
    )


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/dev/shm/lmcd-kv-12-0", "lmcd-kv-12-0"),
        ("/dev/shm/lmcd-bench.1_x", "lmcd-bench.1_x"),
        ("/dev/shm/lmcache_kv_21357_0", "lmcache_kv_21357_0"),
        # lmcache's shm_name has a leading "/": "/dev/shm/" + "/lmcache_kv_..."
        ("/dev/shm//lmcache_kv_21357_0", "lmcache_kv_21357_0"),
    ],
)
def test_registrable_names(path: str, name: str) -> None:
    assert host.shm_file_name(path) == name


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/dev/shm/../../etc/passwd",
        "/dev/shm/../shm/lmcd-x",
        "/dev/shm/sub/lmcd-x",
        "/dev/shm/lmcd-x/../lmcd-y",
        "/dev/shm/lmcd-x/",
        "/dev/shm///lmcd-x",
        "/dev/shmx/lmcd-x",
        "/dev/shm/lmcd-",
        "/dev/shm/lmcd-a\n",
        "/dev/shm/lmcd-a\0",
        "/dev/shm/other-file",
        "/dev/shm/lmcache_l1_pool_x",
        "/dev/shm/lmcache_kv_1",
        "/dev/shm/lmcache_kv_1_2x",
        "/dev/shm/sem.mp-abc",
        "lmcd-relative",
        "/dev/shm/..",
        "/dev/shm/.",
        "/dev/shm/",
    ],
)
def test_other_names_are_refused(path: str) -> None:
    with pytest.raises(RegistrationError, match="not a"):
        host.shm_file_name(path)


def test_a_long_path_is_cut_short_in_the_error() -> None:
    with pytest.raises(RegistrationError) as info:
        host.shm_file_name("/dev/shm/" + "x" * 1_000_000)
    assert len(str(info.value)) < 300


# -- files: each refused case would open fine but for the defence named ------


def _symlink(shm: Callable[[str], Path]) -> tuple[str, str]:
    target = shm("lmcd-target-")
    make_file(target)
    link = shm("lmcd-link-")
    link.symlink_to(target)
    return str(link), "is a symbolic link"  # defence: O_NOFOLLOW


def _symlink_outside(shm: Callable[[str], Path], tmp_path: Path) -> tuple[str, str]:
    target = tmp_path / "secret"
    make_file(target)
    link = shm("lmcd-link-")
    link.symlink_to(target)
    return str(link), "is a symbolic link"


def _subdirectory(shm: Callable[[str], Path]) -> tuple[str, str]:
    sub = shm("lmcd-dir-")
    sub.mkdir()
    make_file(sub / "lmcd-inner")
    return str(sub / "lmcd-inner"), "not a registrable"  # defence: name pattern


def _dotdot(shm: Callable[[str], Path]) -> tuple[str, str]:
    target = shm("lmcd-dotdot-")
    make_file(target)
    return f"/dev/shm/../shm/{target.name}", "not a registrable"


def _other_name(shm: Callable[[str], Path]) -> tuple[str, str]:
    target = shm("notlmcd-")
    make_file(target)
    return str(target), "not a registrable"


def _hard_link(shm: Callable[[str], Path]) -> tuple[str, str]:
    first = shm("lmcd-first-")
    make_file(first)
    second = shm("lmcd-second-")
    os.link(first, second)
    return str(second), "has 2 links"  # defence: st_nlink == 1


def _too_short(shm: Callable[[str], Path]) -> tuple[str, str]:
    target = shm("lmcd-short-")
    make_file(target, LAYER_BYTES + LAYER_BYTES // 2)
    return str(target), "do not fit"  # defence: size covers offset + bytes


def _fifo(shm: Callable[[str], Path]) -> tuple[str, str]:
    target = shm("lmcd-fifo-")
    os.mkfifo(target)
    return str(target), "not a regular file"


def _directory(shm: Callable[[str], Path]) -> tuple[str, str]:
    target = shm("lmcd-isdir-")
    target.mkdir()
    return str(target), "cannot open"


def _missing(shm: Callable[[str], Path]) -> tuple[str, str]:
    return str(shm("lmcd-missing-")), "cannot open"


CASES: dict[str, Callable[..., tuple[str, str]]] = {
    "symlink": _symlink,
    "subdirectory": _subdirectory,
    "dotdot": _dotdot,
    "other-name": _other_name,
    "hard-link": _hard_link,
    "too-short": _too_short,
    "fifo": _fifo,
    "directory": _directory,
    "missing": _missing,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_files(case: str, shm: Callable[[str], Path]) -> None:
    path, why = CASES[case](shm)
    before = open_fds()
    with pytest.raises(RegistrationError, match=why):
        host.open_host_kv(refs(path))
    assert open_fds() == before, "a refused registration leaked a descriptor"


def test_symlink_out_of_shm_is_refused(
    shm: Callable[[str], Path], tmp_path: Path
) -> None:
    path, why = _symlink_outside(shm, tmp_path)
    with pytest.raises(RegistrationError, match=why):
        host.open_host_kv(refs(path))


@pytest.mark.parametrize("offset", [-2, 1, LAYER_BYTES + 2])
def test_offsets_must_be_aligned_and_inside(
    offset: int, shm: Callable[[str], Path]
) -> None:
    target = shm("lmcd-offset-")
    make_file(target)
    with pytest.raises(RegistrationError, match="do not fit"):
        host.open_host_kv([HostTensorRef(str(target), offset, SHAPE, "float16")])


def test_a_good_file_opens_once_for_all_its_layers(shm: Callable[[str], Path]) -> None:
    target = shm("lmcd-good-")
    make_file(target)
    before = open_fds()
    kv = host.open_host_kv(refs(str(target)))
    assert len(kv.files) == 1
    assert len(kv.layers) == 2
    assert open_fds() == before + 1
    kv.close()
    kv.close()  # idempotent
    assert open_fds() == before


@root_only
def test_owner_is_checked_on_the_descriptor(shm: Callable[[str], Path]) -> None:
    theirs = shm("lmcd-theirs-")
    make_file(theirs)
    os.chown(theirs, 4242, 4242)
    with pytest.raises(RegistrationError, match="owned by uid 4242"):
        host.open_host_kv(refs(str(theirs)), owners=frozenset({0}))
    host.open_host_kv(refs(str(theirs)), owners=frozenset({0, 4242})).close()
    host.open_host_kv(refs(str(theirs)), owners=None).close()  # default: any


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@root_only
def test_file_of_another_file_system_is_refused(tmp_path: Path) -> None:
    # A file bind-mounted into the shm directory: the name is fine, the
    # descriptor's st_dev is not that of the directory.
    with tmpfs(tmp_path / "shm", "1m") as shm_dir:
        outside = tmp_path / "outside"
        make_file(outside)
        inside = shm_dir / "lmcd-bind"
        inside.touch()
        subprocess.run(["mount", "--bind", str(outside), str(inside)], check=True)
        try:
            with pytest.raises(RegistrationError, match="not on the shared-memory"):
                host.open_host_kv(refs(str(inside)), shm_dir=str(shm_dir))
        finally:
            subprocess.run(["umount", str(inside)], check=False)


# -- strides and lmcache 0.5 `cpu_shm` descriptors ------------------------------


def test_strides_must_be_contiguous(shm: Callable[[str], Path]) -> None:
    target = shm("lmcd-strided-")
    make_file(target)
    contiguous = (512, 64, 16, 8, 1)
    host.open_host_kv(refs(str(target), stride=contiguous)).close()
    with pytest.raises(RegistrationError, match="not contiguous"):
        host.open_host_kv(refs(str(target), stride=(512, 64, 16, 1, 2)))
    with pytest.raises(RegistrationError, match="strides for a 5-d shape"):
        host.open_host_kv(refs(str(target), stride=(512, 64, 16, 8)))
    # A dimension of size 1 may have any stride (torch's is_contiguous rule).
    one = HostTensorRef(str(target), 0, (8, 1, 16), "float16", (16, 999, 1))
    host.open_host_kv([one]).close()


def cpu_shm_ref(desc: dict[str, Any]) -> HostTensorRef:
    """An lmcache 0.5 `cpu_shm` descriptor as the lead maps it."""
    meta = desc["metadata"]
    itemsize = torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
    return HostTensorRef(
        path="/dev/shm/" + desc["shm_name"],
        offset=meta["storage_offset"] * itemsize,
        shape=tuple(meta["shape"]),
        dtype=meta["dtype"],
        stride=tuple(meta["stride"]),
    )


def test_cpu_shm_descriptor_of_two_views_of_one_segment(
    shm: Callable[[str], Path],
) -> None:
    path = shm("lmcache_kv_")  # lmcache_kv_<pid>_<n>
    data = make_file(path)
    numel = math.prod(SHAPE)
    stride = [math.prod(SHAPE[i + 1 :]) for i in range(len(SHAPE))]
    descs = [
        {
            "type": "cpu_shm",
            "shm_name": "/" + path.name,
            "nbytes": 2 * LAYER_BYTES,
            "metadata": {
                "dtype": "float16",
                "shape": list(SHAPE),
                "stride": stride,
                "storage_offset": layer * numel,
            },
        }
        for layer in range(2)
    ]
    kv = host.open_host_kv([cpu_shm_ref(d) for d in descs])
    try:
        buf = chunk(kv, 2)
        host.gather(kv, [([3, 4], buf)])
        layers = torch.frombuffer(bytearray(data), dtype=torch.int16).view(2, *SHAPE)
        # [layers, K, blocks, ...] -> the chunk's [K, layers, tokens, hidden]
        expected = layers[:, :, 3:5].transpose(0, 1).reshape(-1)
        assert torch.equal(buf.view(torch.int16), expected)
    finally:
        kv.close()


LMCACHE05_PYTHON = peers.PYTHONS["lmcache05"]

_LMCACHE05_SCRIPT = """
import json, sys, torch, msgspec
from lmcache.v1.platform.devices.cpu.shm import migrate_to_shm_and_wrap
layers = [torch.arange(2 * 8 * 4 * 16, dtype=torch.float32)
          .add(1000 * i).to(torch.float16).view(2, 8, 4, 2, 8) for i in range(2)]
wrapped = [migrate_to_shm_and_wrap(t) for t in layers]
print(json.dumps([msgspec.to_builtins(w.to_wire()) for w in wrapped]), flush=True)
sys.stdin.readline()  # keep the segments until the test is done
"""


@pytest.mark.skipif(
    not peers.available("lmcache05"), reason="no lmcache 0.5 environment"
)
def test_real_lmcache05_cpu_shm_descriptors_open_and_copy() -> None:
    with subprocess.Popen(
        [LMCACHE05_PYTHON, "-c", _LMCACHE05_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"},
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the lmcache 0.5 helper printed nothing"
        descs = json.loads(line)
        assert all(d["shm_name"].startswith("/lmcache_kv_") for d in descs)
        kv = host.open_host_kv([cpu_shm_ref(d) for d in descs])
        try:
            buf = chunk(kv, 1)
            host.gather(kv, [([5], buf)])
            got = buf.view(torch.float16).view(2, 2, 4 * 16)  # [K, layers, T*h]
            for layer in range(2):
                full = torch.arange(2 * 8 * 4 * 16, dtype=torch.float32)
                full = full.add(1000 * layer).to(torch.float16).view(2, 8, 64)
                assert torch.equal(got[:, layer], full[:, 5])
        finally:
            kv.close()
            proc.communicate("\n", timeout=30)  # lets lmcache unlink its segments


# -- copies never fault ----------------------------------------------------------


def test_truncated_file_fails_copies_and_is_not_regrown(
    shm: Callable[[str], Path],
) -> None:
    target = shm("lmcd-trunc-")
    make_file(target)
    kv = host.open_host_kv(refs(str(target)))
    try:
        buf = chunk(kv, 2)
        host.gather(kv, [([0, 1], buf)])
        os.truncate(target, 1024)
        with pytest.raises(TransferError, match="shrank"):
            host.gather(kv, [([0, 1], buf)])
        with pytest.raises(TransferError, match="shrank"):
            host.scatter(kv, [([6, 7], buf)])
        # A RETRIEVE must not write the client's file back to full size.
        assert os.stat(target).st_size == 1024
    finally:
        kv.close()


def test_file_shrinking_during_copies_never_kills_the_process(
    shm: Callable[[str], Path],
) -> None:
    # A client truncating and re-growing its file while copies run: with a
    # memory map this is SIGBUS (the test process dies); with preadv and
    # pwritev every copy either completes or raises TransferError.
    shape = (2, 64, 16, 8, 64)  # 2 MiB a layer
    layer = math.prod(shape) * 2
    target = shm("lmcd-race-")
    make_file(target, 4 * layer)
    kv = host.open_host_kv(
        [HostTensorRef(str(target), i * layer, shape, "float16") for i in range(4)]
    )
    stop = threading.Event()

    def vandal() -> None:
        fd = os.open(target, os.O_RDWR)
        try:
            while not stop.is_set():
                os.ftruncate(fd, layer)
                os.ftruncate(fd, 4 * layer)
        finally:
            os.close(fd)

    thread = threading.Thread(target=vandal)
    thread.start()
    outcomes = {"ok": 0, "failed": 0}
    try:
        buf = chunk(kv, 64)
        ids = list(range(64))
        for i in range(150):
            copy = host.gather if i % 2 else host.scatter
            try:
                copy(kv, [(ids, buf)])
                outcomes["ok"] += 1
            except TransferError:
                outcomes["failed"] += 1
    finally:
        stop.set()
        thread.join()
        kv.close()
    assert outcomes["failed"] > 0, outcomes  # the race did happen


@root_only
def test_sparse_file_on_a_full_tmpfs_fails_the_copy(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "1m") as shm_dir:
        sparse = shm_dir / "lmcd-sparse"
        fd = os.open(sparse, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 2 * LAYER_BYTES)  # a hole: no page behind it
        os.close(fd)
        filler = os.open(shm_dir / "filler", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(filler, b"\1" * 65536)
        finally:
            os.close(filler)
        kv = host.open_host_kv(refs(str(sparse)), shm_dir=str(shm_dir))
        try:
            buf = chunk(kv, 2)
            buf.fill_(7)
            with pytest.raises(TransferError, match="No space left"):
                host.scatter(kv, [([0, 1], buf)])
        finally:
            kv.close()


# -- the client-side helper ---------------------------------------------------------


def test_shared_kv_cache_files_are_fully_backed() -> None:
    with SharedKVCache.create(
        "mha", num_layers=2, num_blocks=64, block_size=16, num_heads=4, head_size=32
    ) as kv:
        st = os.stat(kv.path)
        assert st.st_blocks * 512 >= st.st_size > 0


@pytest.mark.parametrize("file_per_layer", [False, True])
def test_shared_kv_cache_round_trips_through_the_host_path(
    file_per_layer: bool,
) -> None:
    import msgspec

    with SharedKVCache.create(
        "mha",
        num_layers=3,
        num_blocks=8,
        block_size=4,
        num_heads=2,
        head_size=8,
        dtype="float16",
        file_per_layer=file_per_layer,
    ) as kv:
        assert len(kv.paths) == (3 if file_per_layer else 1)
        for layer in kv.layers:
            layer.view(torch.int16).random_()
        refs = [
            HostTensorRef(**{**msgspec.msgpack.decode(e.data), "shape": kv.shape})
            for e in kv.register_payload()
        ]
        opened = host.open_host_kv(refs)
        try:
            assert len(opened.files) == len(kv.paths)
            buf = chunk(opened, 2)
            host.gather(opened, [([1, 2], buf)])
            host.scatter(opened, [([6, 7], buf)])
            for layer in kv.layers:
                bits = layer.view(torch.int16)
                assert torch.equal(bits[:, 1:3], bits[:, 6:8])
        finally:
            opened.close()
    assert not any(os.path.exists(p) for p in kv.paths)


def test_copies_split_over_threads_are_bit_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import msgspec

    monkeypatch.setattr(host, "COPY_THREADS", 3)
    with SharedKVCache.create(
        "mla",
        num_layers=5,
        num_blocks=16,
        block_size=4,
        dim=32,
        dtype="float16",
        file_per_layer=True,
    ) as kv:
        for layer in kv.layers:
            layer.view(torch.int16).random_()
        refs = [
            HostTensorRef(**{**msgspec.msgpack.decode(e.data), "shape": kv.shape})
            for e in kv.register_payload()
        ]
        opened = host.open_host_kv(refs)
        try:
            bufs = [chunk(opened, 2) for _ in range(3)]
            host.gather(opened, list(zip([[0, 1], [5, 3], [9, 10]], bufs, strict=True)))
            back = [[12, 13], [14, 2], [15, 11]]
            host.scatter(opened, list(zip(back, bufs, strict=True)))
            for layer in kv.layers:
                bits = layer.view(torch.int16)
                assert torch.equal(
                    bits[[0, 1, 5, 3, 9, 10]], bits[[12, 13, 14, 2, 15, 11]]
                )
        finally:
            opened.close()


def test_shared_kv_cache_refuses_names_lmcd_would_refuse() -> None:
    with pytest.raises(RegistrationError, match="not a registrable"):
        SharedKVCache.create(
            "mla", num_layers=1, num_blocks=1, block_size=1, name="../x"
        )


@root_only
def test_shared_kv_cache_on_a_full_tmpfs_fails_clearly(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "256k") as shm_dir:
        with pytest.raises(RegistrationError, match="No space left") as info:
            SharedKVCache.create(
                "mha",
                num_layers=4,
                num_blocks=64,
                block_size=16,
                num_heads=4,
                head_size=32,
                shm_dir=str(shm_dir),
            )
        assert info.value.__cause__ is not None
        assert info.value.__cause__.errno == errno.ENOSPC  # type: ignore[attr-defined]
        assert os.listdir(shm_dir) == [], "the failed file was left behind"


def test_the_checked_file_is_the_one_copied_even_if_the_name_changes(
    shm: Callable[[str], Path],
) -> None:
    # After REGISTER the name means nothing: the daemon copies through the
    # descriptor it checked, so putting another file under the name (one
    # that would fail the checks, say) gives a client nothing new to reach.
    target = shm("lmcd-renamed-")
    make_file(target)
    kv = host.open_host_kv(refs(str(target)))
    try:
        swapped = shm("lmcd-swapped-")
        make_file(swapped, seed=1)
        os.rename(swapped, target)  # the name is now another file
        before = target.read_bytes()
        buf = chunk(kv, 1)
        buf.fill_(0x5A)
        host.scatter(kv, [([2], buf)])
        assert target.read_bytes() == before, "the copy followed the name"
    finally:
        kv.close()


# -- registrations (scheduler) ------------------------------------------------------


def _scheduler(**kw: Any) -> Any:
    import time

    from lmcd.scheduler import TransferScheduler
    from lmcd.storage import StorageManager
    from lmcd_backends.pinned_cpu import PinnedCpuTier

    tier = PinnedCpuTier(1 << 20, segment_bytes=1 << 20, pin=False)
    storage = StorageManager(tier=tier, clock=time.monotonic)
    return TransferScheduler(storage, 16, **kw)


async def test_registrations_hold_at_most_the_file_limit(
    shm: Callable[[str], Path],
) -> None:
    from lmcd.wire.types import RegisterKVCache

    def two_files() -> tuple[HostTensorRef, ...]:
        paths = [shm("lmcd-limit-"), shm("lmcd-limit-")]
        for p in paths:
            make_file(p)
        return tuple(HostTensorRef(str(p), 0, SHAPE, "float16") for p in paths)

    scheduler = _scheduler(shm_file_limit=3)
    before = open_fds()
    a, b = two_files(), two_files()
    await scheduler.register(RegisterKVCache(1, a))
    with pytest.raises(RegistrationError, match="limit of 3"):
        await scheduler.register(RegisterKVCache(2, b))
    assert open_fds() == before + 2
    await scheduler.register(RegisterKVCache(1, b))  # a replacement fits
    assert open_fds() == before + 2
    assert await scheduler.unregister(1)
    await scheduler.register(RegisterKVCache(2, a))
    assert await scheduler.unregister(2)
    assert open_fds() == before


# -- --shm-owners --------------------------------------------------------------------


def test_shm_owners_parses_numeric_uids() -> None:
    from lmcd.config import Config, parse_uids

    assert parse_uids("0") == frozenset({0})
    assert parse_uids(" 0, 1000 ,1000") == frozenset({0, 1000})
    assert Config(shm_owners=parse_uids("7")).shm_owners == frozenset({7})
    assert Config().shm_owners is None  # default: any owner


@pytest.mark.parametrize("value", ["", "root", "1,,2", "-1", "1.5", "٣", "4294967296"])
def test_bad_shm_owners_exit_2_with_one_line(value: str) -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lmcd", "serve", "--shm-owners", value],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--shm-owners" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_lists_shm_owners() -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lmcd", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "--shm-owners" in result.stdout
