"""The real lmcache 0.5.6 adapters: a worker stores two chunks, the
scheduler looks them up, another worker retrieves them into other blocks,
bytes equal, each round. Run by `tests.peers.run`."""

from __future__ import annotations

import sys
from pathlib import Path

from lmcd.benchmarks.lmcache05 import blocks_equal, zmq_context
from tests.lmcache05.helpers import CHUNK, Rig, prompt, rid
from tests.peers.run import more, steer


def main(folder: Path, url: str) -> None:
    ctx = zmq_context()
    rig = Rig(url, ctx, model="auto-05")
    try:
        writer = rig.worker(seed=9)
        scheduler = rig.scheduler()
        reader = rig.worker()
        steer(folder, "lmcache05")
        rounds = 0
        while more(folder, rounds):
            # lmcd keys sessions and lookup jobs by request id alone, as
            # vLLM's are unique: this process's must differ from the test's.
            tokens = prompt(2 * CHUNK)
            assert writer.store(rid("peer05-store"), tokens, [1, 2, 3, 4])
            load = rid("peer05-load")
            assert scheduler.lookup(load, tokens) == 2 * CHUNK
            assert reader.retrieve(load, tokens, [5, 6, 7, 8])
            assert blocks_equal(writer.kv, [1, 2, 3, 4], reader.kv, [5, 6, 7, 8])
            rounds += 1
        print(f"ok lmcache05 {rounds}", flush=True)
    finally:
        rig.close()
        ctx.term()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
