"""A real lmcache 0.3.13 client (its `MessageQueueClient`) with a host-path
KV cache: register, then store two chunks, look them up and retrieve them
into other blocks, bytes equal, each round. Run by `tests.peers.run`."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch
import zmq

from lmcd.shmkv import SharedKVCache
from tests.lmcache_client import call, close_client, key, open_client
from tests.peers.run import more, steer

CHUNK = 16
EVENT = b"\x5a" * 64


def main(folder: Path, url: str) -> None:
    ctx = zmq.Context()
    client = open_client(url, ctx)
    kv = SharedKVCache.create(
        "mha", num_layers=2, num_blocks=16, block_size=8, num_heads=2, head_size=8
    )
    try:
        gen = torch.Generator().manual_seed(5)
        for layer in kv.layers:
            layer.copy_(torch.randn(layer.shape, generator=gen).to(layer.dtype))
        assert call(client, "GET_CHUNK_SIZE", []) == CHUNK
        instance = 70_000 + os.getpid() % 10_000
        payload = [instance, kv.register_payload()]
        assert call(client, "REGISTER_KV_CACHE", payload) is None
        expected = [layer[:, [0, 1, 2, 3]].clone() for layer in kv.layers]
        steer(folder, "lmcache03")
        rounds = 0
        hashes = itertools.count(1)
        while more(folder, rounds):
            keys = [key(next(hashes), worker=0, model="auto-03") for _ in range(2)]
            assert call(client, "STORE", [keys, instance, [0, 1, 2, 3], EVENT]) == (
                EVENT,
                True,
            )
            nil = [k.no_worker_id_version() for k in keys]
            assert call(client, "LOOKUP", [nil, True]) == [True, True]
            for layer in kv.layers:
                layer[:, [4, 5, 6, 7]] = 0
            got = call(client, "RETRIEVE", [keys, instance, [4, 5, 6, 7], EVENT])
            assert got == (EVENT, [True, True])
            for want, layer in zip(expected, kv.layers, strict=True):
                assert torch.equal(
                    want.view(torch.uint8), layer[:, [4, 5, 6, 7]].view(torch.uint8)
                )
            rounds += 1
        assert call(client, "UNREGISTER_KV_CACHE", [instance]) is None
        print(f"ok lmcache03 {rounds}", flush=True)
    finally:
        kv.close()
        close_client(client)
        ctx.term()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
