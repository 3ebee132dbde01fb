"""Record the real lmcache 0.4.x vLLM adapters talking to lmcache's own
0.4.x server on CPU, frame by frame, through a recording proxy.

    PYTHONPATH=. python -m tests.lmcache04.capture OUT.json

(run in an environment with lmcache 0.4.6 or 0.4.7; `tests/data/
lmcache-0.4.6-real-server-transcript.json` was made so). The flow: a
scheduler and a worker start; the worker stores two chunks (and a partial
one that is never stored); the scheduler looks them up; a second worker
retrieves them into other blocks and the bytes are compared; locks are
freed, the session ended, block allocations reported; a raw client sends
PING, NOOP, QUERY_PREFETCH_LOOKUP_HITS and CLEAR; both workers unregister.
Every frame and who sent it is written out, with the request type table.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from lmcd.benchmarks.lmcache05 import REFERENCE, ServerOptions, blocks_equal
from lmcd.spawn import free_port
from tests.lmcache04.rig import (
    CHUNK,
    DATA,
    HEARTBEAT,
    LAYOUT,
    TIMEOUT,
    VERSION,
    RawClient,
    Scheduler,
    Worker,
    key,
    start_server,
    zmq_context,
)


@attrs.define
class RecordingProxy:
    """A ROUTER in front of a server: one DEALER to the server per client,
    every frame recorded. `label` names the next client that appears."""

    server_url: str
    context: Any
    port: int = attrs.field(factory=free_port)
    label: str = "client"
    entries: list[dict[str, Any]] = attrs.field(factory=list)
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> None:
        import zmq

        front = self.context.socket(zmq.ROUTER)
        front.bind(self.url)
        self._thread = threading.Thread(target=self._run, args=(front,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, front: Any) -> None:
        import zmq

        backs: dict[bytes, Any] = {}
        names: dict[Any, tuple[bytes, str]] = {}
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                if sock is front:
                    identity, *frames = front.recv_multipart()
                    back = backs.get(identity)
                    if back is None:
                        back = self.context.socket(zmq.DEALER)
                        back.connect(self.server_url)
                        backs[identity] = back
                        names[back] = (identity, self.label)
                        poller.register(back, zmq.POLLIN)
                    self._record(names[back][1], "c2s", frames)
                    back.send_multipart(frames)
                else:
                    identity, label = names[sock]
                    frames = sock.recv_multipart()
                    self._record(label, "s2c", frames)
                    front.send_multipart([identity, *frames])
        for back in backs.values():
            back.close()
        front.close()

    def _record(self, label: str, direction: str, frames: list[bytes]) -> None:
        self.entries.append(
            {
                "client": label,
                "dir": direction,
                "t": time.monotonic(),
                "frames_hex": [f.hex() for f in frames],
            }
        )


def drive(url: str, ctx: Any, proxy: RecordingProxy, opened: list[Any]) -> None:
    """The recorded flow (see the module docstring)."""
    from lmcache.v1.multiprocess.custom_types import BlockAllocationRecord

    model = "capture-model"
    tokens = [100 + i for i in range(2 * CHUNK + 8)]
    proxy.label = "scheduler"
    scheduler = Scheduler.start(
        url,
        ctx,
        model=model,
        block_size=LAYOUT.block_size,
        timeout=TIMEOUT,
        heartbeat=HEARTBEAT,
    )
    opened.append(scheduler)
    proxy.label = "worker-a"
    a = Worker.start(
        url,
        ctx,
        model=model,
        layout=LAYOUT,
        mode=DATA,
        seed=1,
        timeout=TIMEOUT,
        heartbeat=HEARTBEAT,
    )
    opened.append(a)
    assert a.store("req-store", tokens, [3, 4, 9, 10], end=2 * CHUNK)
    assert scheduler.wait_stored(tokens, 2 * CHUNK) == 2 * CHUNK
    assert scheduler.lookup("req-load", tokens) == 2 * CHUNK
    proxy.label = "worker-b"
    b = Worker.start(
        url,
        ctx,
        model=model,
        layout=LAYOUT,
        mode=DATA,
        timeout=TIMEOUT,
        heartbeat=HEARTBEAT,
    )
    opened.append(b)
    assert b.retrieve("req-load", tokens, [12, 5, 7, 1], end=2 * CHUNK)
    assert blocks_equal(a.kv, [3, 4, 9, 10], b.kv, [12, 5, 7, 1])
    scheduler.adapter.free_lookup_locks(tokens, 0, 2 * CHUNK, "req-store")
    scheduler.adapter.end_session("req-load")
    scheduler.adapter.report_block_allocations(
        [BlockAllocationRecord("req-load", [12, 5], [1, 2])]
    )
    proxy.label = "raw"
    raw = RawClient.connect(url, ctx)
    opened.append(raw)
    assert raw.call("PING", []) is True
    assert raw.call("NOOP", []) == "OK"
    lookup_key = key(model, tokens, "req-hits", worker_id=None)
    raw.call("LOOKUP", [lookup_key, 1])
    hits = raw.call("QUERY_PREFETCH_LOOKUP_HITS", ["req-hits"])
    status = raw.call("QUERY_PREFETCH_STATUS", ["req-hits"])
    again = raw.call("QUERY_PREFETCH_STATUS", ["req-hits"])
    print("hits", hits, "status", status, "again", again)
    raw.call("FREE_LOOKUP_LOCKS", [lookup_key, 1])
    raw.call("CLEAR", [])
    time.sleep(0.5)


def run(out: Path) -> None:
    from lmcache.v1.multiprocess.protocol import RequestType

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(REFERENCE, ServerOptions(), Path(tmp))
        ctx = zmq_context()
        proxy = RecordingProxy(server.url, ctx)
        proxy.start()
        opened: list[Any] = []
        try:
            drive(proxy.url, ctx, proxy, opened)
        finally:
            for thing in reversed(opened):
                if isinstance(thing, RawClient):
                    thing.close()
                else:
                    thing.shutdown()
            time.sleep(0.5)
            proxy.stop()
            ctx.term()
            server.stop()
    t0 = proxy.entries[0]["t"] if proxy.entries else 0.0
    for e in proxy.entries:
        e["t"] = round(e["t"] - t0, 4)
    doc = {
        "source": (
            f"lmcache {VERSION} vLLM adapters (CPU KV tensors, torch "
            f"{torch.__version__}) and lmcache {VERSION}'s own MP server "
            "(--chunk-size 16), recorded by a proxy (tests/lmcache04/capture.py)"
        ),
        "request_types": {t.name: t.value for t in RequestType},
        "entries": proxy.entries,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(proxy.entries)} frames to {out}")


if __name__ == "__main__":
    run(Path(sys.argv[1]))
