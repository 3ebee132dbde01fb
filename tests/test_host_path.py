"""STORE, LOOKUP and RETRIEVE end to end through the host path.

A fake vLLM worker (this test) creates random paged KV caches in /dev/shm,
registers them with lmcd, and drives the real lmcache 0.3.13 client.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmcd.shmkv import SharedKVCache
from tests.conftest import Server, start_server
from tests.lmcache_client import call, close_client, key, open_client

BLOCK = 16
PER_CHUNK = 256 // BLOCK
EVENT = b"\x5a" * 64
_ids = itertools.count(10_000)


def random_kv(kind: str, dtype: str = "bfloat16", **kw: Any) -> SharedKVCache:
    kv = SharedKVCache.create(
        kind,  # type: ignore[arg-type]
        num_layers=kw.pop("num_layers", 3),
        num_blocks=kw.pop("num_blocks", 128),
        block_size=BLOCK,
        num_heads=4,
        head_size=32,
        dim=96,
        dtype=dtype,
    )
    gen = torch.Generator().manual_seed(next(_ids))
    for layer in kv.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen).to(layer.dtype))
    return kv


def blocks_of(kv: SharedKVCache, ids: list[int]) -> list[torch.Tensor]:
    if len(kv.shape) == 5:
        return [layer[:, ids].clone() for layer in kv.layers]
    return [layer[ids].clone() for layer in kv.layers]


def register(client: Any, kv: SharedKVCache) -> int:
    instance = next(_ids)
    assert call(client, "REGISTER_KV_CACHE", [instance, kv.register_payload()]) is None
    return instance


@pytest.fixture
def kv_mha() -> Iterator[SharedKVCache]:
    kv = random_kv("mha")
    yield kv
    kv.close()


@pytest.mark.parametrize(
    ("kind", "dtype"), [("mha", "bfloat16"), ("mha", "float16"), ("mla", "bfloat16")]
)
def test_store_lookup_retrieve_bit_exact(
    kind: str, dtype: str, client: Any, server: Server
) -> None:
    with random_kv(kind, dtype) as kv:
        instance = register(client, kv)
        server.wait_for_log(f"Registered KV cache for GPU ID {instance} with 3 layers")
        model = f"{kind}-{dtype}-{instance}"
        keys = [key(i, worker=0, model=model) for i in range(3)]
        src = list(range(0, 3 * PER_CHUNK))
        expected = blocks_of(kv, src)

        handle, ok = call(client, "STORE", [keys, instance, src, EVENT])
        assert (handle, ok) == (EVENT, True)
        server.wait_for_log("Stored 768 tokens")
        nil = [k.no_worker_id_version() for k in keys]
        assert call(client, "LOOKUP", [nil, True]) == [True, True, True]

        dst = list(range(3 * PER_CHUNK, 6 * PER_CHUNK))
        for layer in kv.layers:
            layer.zero_()
        handle, found = call(client, "RETRIEVE", [keys, instance, dst, EVENT])
        assert (handle, found) == (EVENT, [True, True, True])
        got = blocks_of(kv, dst)
        for a, b in zip(expected, got, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert call(client, "UNREGISTER_KV_CACHE", [instance]) is None


def test_store_skips_present_keys_and_partial_retrieve(
    client: Any, kv_mha: SharedKVCache
) -> None:
    instance = register(client, kv_mha)
    keys = [key(i, model=f"p{instance}") for i in range(4)]
    ids = list(range(4 * PER_CHUNK))
    assert call(client, "STORE", [keys[:2], instance, ids, EVENT]) == (EVENT, True)
    assert call(client, "STORE", [keys, instance, ids, EVENT]) == (EVENT, True)
    missing = [keys[0], key(99, model=f"p{instance}"), keys[2]]
    _, found = call(
        client, "RETRIEVE", [missing, instance, ids[: 3 * PER_CHUNK], EVENT]
    )
    assert found == [True, False, False]


def test_two_models_at_once(client: Any) -> None:
    with random_kv("mha") as a, random_kv("mla", "float16") as b:
        ia, ib = register(client, a), register(client, b)
        ka = [key(1, model="model-a"), key(2, model="model-a")]
        kb = [key(1, model="model-b")]
        ids = list(range(2 * PER_CHUNK))
        assert call(client, "STORE", [ka, ia, ids, EVENT])[1]
        assert call(client, "STORE", [kb, ib, ids, EVENT])[1]
        assert call(client, "LOOKUP", [ka, None]) == [True, True]
        assert call(client, "LOOKUP", [kb, None]) == [True]
        # A chunk of another layout is not retrievable into this cache.
        assert call(client, "RETRIEVE", [kb, ia, ids, EVENT])[1] == [False]


def test_tensor_parallel_pair_with_nil_worker_lookup(client: Any) -> None:
    with random_kv("mha") as r0, random_kv("mha") as r1:
        i0, i1 = register(client, r0), register(client, r1)
        ids = list(range(2 * PER_CHUNK))
        k0 = [key(h, worker=0, world=2, model="tp") for h in (1, 2)]
        k1 = [key(h, worker=1, world=2, model="tp") for h in (1, 2)]
        nil = [key(h, worker=None, world=2, model="tp") for h in (1, 2)]
        assert call(client, "STORE", [k0, i0, ids, EVENT])[1]
        assert call(client, "LOOKUP", [nil, True]) == [False, False]
        assert call(client, "STORE", [k1[:1], i1, ids, EVENT])[1]
        assert call(client, "LOOKUP", [nil, True]) == [True, False]
        assert call(client, "STORE", [k1, i1, ids, EVENT])[1]
        assert call(client, "LOOKUP", [nil, True]) == [True, True]
        expected = blocks_of(r1, ids)
        for layer in r1.layers:
            layer.zero_()
        assert call(client, "RETRIEVE", [k1, i1, ids, EVENT])[1] == [True, True]
        for a, b in zip(expected, blocks_of(r1, ids), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("keys", "ids", "why"),
    [
        (2, list(range(PER_CHUNK)), "too few block ids"),
        (1, [0] * (PER_CHUNK - 1) + [128], "block id out of range"),
        (1, [-1] + [0] * (PER_CHUNK - 1), "negative block id"),
    ],
)
def test_bad_copy_requests_fail_at_once(
    keys: int, ids: list[int], why: str, client: Any, kv_mha: SharedKVCache
) -> None:
    instance = register(client, kv_mha)
    ks = [key(i, model=f"bad{instance}") for i in range(keys)]
    assert call(client, "STORE", [ks, instance, ids, EVENT]) == (EVENT, False), why
    assert call(client, "RETRIEVE", [ks, instance, ids, EVENT]) == (
        EVENT,
        [False] * keys,
    ), why
    assert call(client, "LOOKUP", [ks, None]) == [False] * keys


def test_store_with_nil_worker_fails(client: Any, kv_mha: SharedKVCache) -> None:
    instance = register(client, kv_mha)
    ks = [key(1, worker=None)]
    assert call(client, "STORE", [ks, instance, list(range(PER_CHUNK)), EVENT]) == (
        EVENT,
        False,
    )


def _register_ext(client: Any, data: dict[str, Any]) -> int:
    import msgspec

    instance = next(_ids)
    ext = msgspec.msgpack.Ext(2, msgspec.msgpack.encode(data))
    assert call(client, "REGISTER_KV_CACHE", [instance, [ext]]) is None
    return instance


def wait_logged(server: Server, since: int, text: str, timeout: float = 10.0) -> None:
    """Wait until `text` is in what `server` logged after line `since`: a
    case never passes on a line that an earlier case wrote."""
    deadline = time.monotonic() + timeout
    while text not in "".join(server.lines[since:]):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{text!r} not logged; log since:\n{''.join(server.lines[since:])}"
            )
        time.sleep(0.02)


def failed_requests(server: Server) -> int:
    from lmcd.client import Client

    with Client("127.0.0.1", server.port) as c:
        return int(c.stats()["failed_requests"])


def daemon_fds(server: Server) -> list[str]:
    """The files (not sockets, pipes or event descriptors) the daemon holds
    open: the count of all descriptors moves with clients connecting and
    leaving, which would make a check on it flaky."""
    fd_dir = f"/proc/{server.proc.pid}/fd"
    files = []
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("/"):
                files.append(target)
    return sorted(files)


def _shm_path(prefix: str) -> Path:
    return Path("/dev/shm") / f"{prefix}{os.getpid()}-{next(_ids)}"


@pytest.fixture
def shm_paths() -> Iterator[list[Path]]:
    """Paths a test makes in /dev/shm (links, directories); removed after."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _symlink(kv: SharedKVCache, made: list[Path]) -> dict[str, Any]:
    link = _shm_path("lmcd-link-")
    made.append(link)
    link.symlink_to(kv.path)  # a good file: only O_NOFOLLOW refuses it
    return {"path": str(link)}


def _subdirectory(kv: SharedKVCache, made: list[Path]) -> dict[str, Any]:
    sub = _shm_path("lmcd-dir-")
    made.append(sub)
    sub.mkdir()
    os.link(kv.path, sub / "lmcd-inner")  # nlink 2 as well; the name is refused first
    return {"path": str(sub / "lmcd-inner")}


def _renamed(prefix: str) -> Callable[[SharedKVCache, list[Path]], dict[str, Any]]:
    def make(kv: SharedKVCache, made: list[Path]) -> dict[str, Any]:
        # The client's good file under another name (moved, so one link).
        path = _shm_path(prefix)
        os.rename(kv.path, path)
        kv.path = str(path)
        return {"path": str(path)}

    return make


def _hard_link(kv: SharedKVCache, made: list[Path]) -> dict[str, Any]:
    link = _shm_path("lmcd-hard-")
    made.append(link)
    os.link(kv.path, link)
    return {"path": str(link)}


@pytest.mark.parametrize(
    ("case", "change", "logged"),
    [
        ("outside", lambda kv, made: {"path": "/etc/passwd"}, "is not a file in"),
        (
            "dotdot-out",
            lambda kv, made: {"path": "/dev/shm/../../etc/passwd"},
            "not a registrable",
        ),
        (
            "dotdot-in",
            lambda kv, made: {"path": "/dev/shm/../shm/" + Path(kv.path).name},
            "not a registrable",
        ),
        ("subdirectory", _subdirectory, "not a registrable"),
        ("other-name", _renamed("other-"), "not a registrable"),
        ("symlink", _symlink, "is a symbolic link"),
        ("hard-link", _hard_link, "has 2 links"),
        (
            "missing",
            lambda kv, made: {"path": "/dev/shm/lmcd-does-not-exist"},
            "cannot open",
        ),
        ("too-short", lambda kv, made: {"shape": [2, 12800, 16, 4, 32]}, "do not fit"),
        ("not-kv", lambda kv, made: {"shape": [3, 128, 16, 4, 32]}, "neither MHA"),
    ],
)
def test_bad_host_registrations_are_refused(
    case: str,
    change: Callable[[SharedKVCache, list[Path]], dict[str, Any]],
    logged: str,
    client: Any,
    server: Server,
    kv_mha: SharedKVCache,
    shm_paths: list[Path],
) -> None:
    import msgspec

    payload = kv_mha.register_payload()[0]
    data = {**msgspec.msgpack.decode(payload.data), **change(kv_mha, shm_paths)}
    fds = daemon_fds(server)
    since = len(server.lines)
    instance = _register_ext(client, data)
    wait_logged(server, since, f"REGISTER_KV_CACHE for GPU ID {instance} (")
    wait_logged(server, since, ") failed: ")
    wait_logged(server, since, logged)
    assert daemon_fds(server) == fds, f"{case}: a refused registration kept a file"
    ks = [key(1, model="refused")]
    assert call(client, "STORE", [ks, instance, list(range(PER_CHUNK)), EVENT]) == (
        EVENT,
        False,
    )


def test_shm_owners_restricts_whose_files_register(
    server_factory: list[Server], zmq_context: Any
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    s = start_server("--cpu-buffer-size", "0.1", "--shm-owners", f"{os.geteuid()},7")
    server_factory.append(s)
    c = open_client(s.url, zmq_context)
    try:
        with random_kv("mha") as theirs, random_kv("mha") as ours:
            os.chown(theirs.path, 4242, 4242)
            since = len(s.lines)
            refused = register(c, theirs)
            wait_logged(s, since, "is owned by uid 4242, not one of --shm-owners")
            ids = list(range(PER_CHUNK))
            ks = [key(1, model="owners")]
            assert call(c, "STORE", [ks, refused, ids, EVENT]) == (EVENT, False)
            accepted = register(c, ours)
            assert call(c, "STORE", [ks, accepted, ids, EVENT]) == (EVENT, True)
    finally:
        close_client(c)


def test_mixed_layer_shapes_are_refused(client: Any, server: Server) -> None:
    with random_kv("mha") as a, random_kv("mha", num_blocks=32) as b:
        instance = next(_ids)
        payload = [a.register_payload()[0], b.register_payload()[0]]
        since = len(server.lines)
        assert call(client, "REGISTER_KV_CACHE", [instance, payload]) is None
        wait_logged(server, since, "differ in shape or dtype")


def test_chunk_size_not_multiple_of_block_size(
    server_factory: list[Server], zmq_context: Any
) -> None:
    s = start_server("--chunk-size", "100", "--cpu-buffer-size", "0.1")
    server_factory.append(s)
    c = open_client(s.url, zmq_context)
    try:
        with random_kv("mha") as kv:
            register(c, kv)
            s.wait_for_log("not a multiple of block size")
    finally:
        close_client(c)


def test_store_larger_than_buffer_evicts_and_keeps_serving(
    server_factory: list[Server], zmq_context: Any
) -> None:
    # 3 layers x 2 x 256 tokens x 128 x bf16 = 384 KiB a chunk; 4 MiB holds 10.
    s = start_server("--cpu-buffer-size", str(4 / 1024), "--segment-mb", "4")
    server_factory.append(s)
    c = open_client(s.url, zmq_context)
    try:
        with random_kv("mha", num_blocks=16 * 8) as kv:
            instance = register(c, kv)
            ids = list(range(8 * PER_CHUNK))
            prefixes = [
                [key(p * 100 + i, model="e") for i in range(8)] for p in range(4)
            ]
            for keys in prefixes:
                assert call(c, "STORE", [keys, instance, ids, EVENT]) == (EVENT, True)
            assert call(c, "LOOKUP", [prefixes[0], None]) == [False] * 8
            assert call(c, "LOOKUP", [prefixes[-1], None]) == [True] * 8
            expected = blocks_of(kv, ids)
            for layer in kv.layers:
                layer.zero_()
            assert (
                call(c, "RETRIEVE", [prefixes[-1], instance, ids, EVENT])[1]
                == [True] * 8
            )
            for a, b in zip(expected, blocks_of(kv, ids), strict=True):
                assert torch.equal(a, b)
    finally:
        close_client(c)


def test_unregister_waits_for_in_flight_copies(client: Any, server: Server) -> None:
    from lmcache.v1.multiprocess.protocol import RequestType, get_response_class

    # A copy long enough (32 layers, 32 chunks) to still run when UNREGISTER lands.
    with random_kv("mha", num_layers=32, num_blocks=32 * PER_CHUNK) as kv:
        instance = register(client, kv)
        keys = [key(i, model=f"unreg{instance}") for i in range(32)]
        ids = list(range(32 * PER_CHUNK))
        store = client.submit_request(
            RequestType.STORE,
            [keys, instance, ids, EVENT],
            get_response_class(RequestType.STORE),
        )
        unregister = client.submit_request(
            RequestType.UNREGISTER_KV_CACHE, [instance], None
        )
        assert unregister.result(30) is None
        assert store.query(), "UNREGISTER was answered before the STORE it waited for"
        assert store.result(30) == (EVENT, True)
        assert call(client, "LOOKUP", [keys, None]) == [True] * 32
        server.wait_for_log(f"Unregistered KV cache for GPU ID {instance}")
        # The instance is gone: copies for it now fail at once.
        assert call(client, "STORE", [keys[:1], instance, ids, EVENT]) == (EVENT, False)


def test_file_truncated_after_registration_fails_copies_not_the_daemon(
    client: Any, server: Server, zmq_context: Any
) -> None:
    kv = random_kv("mha")
    other = open_client(server.url, zmq_context)
    try:
        instance = register(client, kv)
        ks = [key(1, model=f"shrunk{instance}")]
        ids = list(range(PER_CHUNK))
        assert call(client, "STORE", [ks, instance, ids, EVENT]) == (EVENT, True)
        os.truncate(kv.path, 4096)  # the client breaks its own KV cache
        since = len(server.lines)
        failed = failed_requests(server)
        more = [key(2, model=f"shrunk{instance}")]
        assert call(client, "STORE", [more, instance, ids, EVENT]) == (EVENT, False)
        assert call(client, "RETRIEVE", [ks, instance, ids, EVENT]) == (EVENT, [False])
        assert failed_requests(server) == failed + 2
        who = f"GPU ID {instance} (model 'shrunk{instance}') failed:"
        wait_logged(server, since, f"from {who} store copy failed: ")
        wait_logged(server, since, f"into {who} retrieve copy failed: ")
        assert "shrank to 4096 bytes" in "".join(server.lines[since:])
        assert os.stat(kv.path).st_size == 4096, "RETRIEVE regrew the client's file"
        # The daemon is alive and serves everyone else.
        assert server.proc.poll() is None
        with random_kv("mha") as healthy:
            ok = register(other, healthy)
            theirs = [key(1, model=f"healthy{ok}")]
            assert call(other, "STORE", [theirs, ok, ids, EVENT]) == (EVENT, True)
            assert call(other, "RETRIEVE", [theirs, ok, ids, EVENT]) == (EVENT, [True])
        assert call(client, "UNREGISTER_KV_CACHE", [instance]) is None
    finally:
        close_client(other)
        kv.layers.clear()  # its pages are gone: never touch them again
        kv.close()


def test_concurrent_registers_leave_one_registration_and_no_leak(
    server_factory: list[Server],
) -> None:
    from lmcd.client import Client
    from lmcd.wire.lmcache03 import RequestType

    s = start_server("--cpu-buffer-size", "0.1")
    server_factory.append(s)
    with (
        Client("127.0.0.1", s.port) as c,
        random_kv("mha") as a,
        random_kv("mha") as b,
    ):
        instance = next(_ids)
        payloads = [a.register_payload(), b.register_payload()]
        # Warm up (thread pool, lazy imports), then take the baseline.
        c.call(RequestType.REGISTER_KV_CACHE, instance, payloads[0])
        c.call(RequestType.UNREGISTER_KV_CACHE, instance)
        baseline = daemon_fds(s)
        for _ in range(10):
            # Two REGISTERs of one id sent together, then their replies.
            c.send(RequestType.REGISTER_KV_CACHE, instance, payloads[0])
            c.send(RequestType.REGISTER_KV_CACHE, instance, payloads[1])
            for _ in range(2):
                c.receive(10.0)
        held = daemon_fds(s)
        assert len(held) == len(baseline) + 1, "a replaced registration leaked"
        assert b.path in held, "the second registration is not the one kept"
        mine = [i for i in c.stats()["instances"] if i["instance_id"] == instance]
        assert len(mine) == 1
        ks = [{"model_name": "c", "world_size": 1, "worker_id": 0, "chunk_hash": b"1"}]
        ids = list(range(PER_CHUNK))
        assert c.call(RequestType.STORE, ks, instance, ids, EVENT) == [EVENT, True]
        c.call(RequestType.UNREGISTER_KV_CACHE, instance)
        assert daemon_fds(s) == baseline, "UNREGISTER left a descriptor open"
        assert c.stats()["instances"] == []
