"""Many clients with requests in flight at once: every reply reaches its uid."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import zmq

from tests.conftest import Server
from tests.lmcache_client import close_client, key, open_client

CLIENTS = 16
REQUESTS = 150


def test_real_clients_with_requests_in_flight(server: Server, zmq_context: Any) -> None:
    from lmcache.v1.multiprocess.protocol import RequestType

    errors: list[str] = []

    def worker(n: int) -> None:
        client = open_client(server.url, zmq_context)
        try:
            futures = []
            for i in range(REQUESTS):
                if i % 3 == 2:
                    futures.append(
                        (None, client.submit_request(RequestType.NOOP, [], str))
                    )
                else:
                    size = (n + i) % 9
                    keys = [key(j, worker=None, world=2) for j in range(size)]
                    f = client.submit_request(
                        RequestType.LOOKUP, [keys, True], list[bool]
                    )
                    futures.append((size, f))
            for size, f in futures:
                result = f.result(30)
                expected = "OK" if size is None else [False] * size
                if result != expected:
                    errors.append(f"client {n}: {result!r} != {expected!r}")
        finally:
            close_client(client)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client is still waiting"
    assert not errors, errors[:5]


def test_raw_pipelined_uids_all_answered(server: Server, zmq_context: Any) -> None:
    enc = msgspec.msgpack.encode
    socks = []
    for _ in range(CLIENTS):
        s = zmq_context.socket(zmq.DEALER)
        s.connect(server.url)
        socks.append(s)
    try:
        for s in socks:
            for uid in range(500):
                s.send_multipart([enc(uid), enc(7)])
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        seen: dict[int, set[int]] = {i: set() for i in range(CLIENTS)}
        remaining = CLIENTS * 500
        while remaining:
            events = dict(poller.poll(10_000))
            assert events, f"{remaining} replies never came"
            for i, s in enumerate(socks):
                while s in events and s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    uid, _, value = s.recv_multipart()
                    assert msgspec.msgpack.decode(value) == 256
                    seen[i].add(msgspec.msgpack.decode(uid))
                    remaining -= 1
        assert all(v == set(range(500)) for v in seen.values())
    finally:
        for s in socks:
            s.close(linger=0)
