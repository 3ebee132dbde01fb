"""Baseline servers for the control-plane benchmark, one per process.

    python -m lmcd.benchmarks.servers echo --port P
    python -m lmcd.benchmarks.servers reference --port P --prefill N

`echo`: a bare pyzmq ROUTER that answers every message with "OK" (the floor
for a Python server). `reference`: lmcache 0.3.11's `MessageQueueServer`
with its `MPStorageManager`, answering LOOKUP, NOOP, GET_CHUNK_SIZE and CLEAR
as its `server.py` does (its STORE/RETRIEVE need CUDA; `--prefill` stores N
chunks directly in the storage manager so that lookups can hit).
"""

# No `from __future__ import annotations`: the reference server checks the
# handlers' annotations at run time, so they must be real types.

import argparse
import signal
import sys
import time
from typing import Any

import msgspec
import zmq

OK = msgspec.msgpack.encode("OK")


def echo(port: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    print("ready", flush=True)
    while True:
        frames = sock.recv_multipart()
        sock.send_multipart([frames[0], frames[1], frames[2], OK])


def reference(port: int, prefill: int, chunk_size: int) -> None:
    import torch
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
    from lmcache.v1.multiprocess.mp_storage_manager import MPStorageManager
    from lmcache.v1.multiprocess.mq import MessageQueueServer
    from lmcache.v1.multiprocess.protocol import (
        RequestType,
        get_handler_type,
        get_payload_classes,
    )

    manager = MPStorageManager(0.25)
    if prefill:
        keys = [
            IPCCacheEngineKey("bench", 1, 0, b"hit" + i.to_bytes(4, "big"))
            for i in range(prefill)
        ]
        handle, _ = manager.reserve(
            keys, torch.Size([2, 1, chunk_size, 8]), torch.float16, MemoryFormat.KV_2LTD
        )
        manager.commit(handle)

    # The handlers of lmcache 0.3.11's MPCacheEngine, without the GPU parts.
    def lookup(keys: list[IPCCacheEngineKey], lock: bool | None = None) -> list[bool]:
        found = manager.lookup(keys)
        return [True] * found + [False] * (len(keys) - found)

    def get_chunk_size() -> int:
        return chunk_size

    def debug() -> str:
        return "OK"

    def clear() -> None:
        manager.clear()

    server = MessageQueueServer(
        bind_url=f"tcp://127.0.0.1:{port}",
        context=zmq.Context.instance(),
        max_workers=1,
    )
    handlers: dict[Any, Any] = {
        RequestType.LOOKUP: lookup,
        RequestType.GET_CHUNK_SIZE: get_chunk_size,
        RequestType.NOOP: debug,
        RequestType.CLEAR: clear,
    }
    for rtype, fn in handlers.items():
        server.add_handler(
            rtype, get_payload_classes(rtype), get_handler_type(rtype), fn
        )
    server.start()
    print("ready", flush=True)
    while True:
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["echo", "reference"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sys.exit(0))
    if args.kind == "echo":
        echo(args.port)
    else:
        reference(args.port, args.prefill, args.chunk_size)


if __name__ == "__main__":
    main()
