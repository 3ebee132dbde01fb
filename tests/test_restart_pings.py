"""A ping from a worker the daemon holds no registration for (it restarted,
or reaped the worker) is answered False once, then True: the edge on which
lmcache 0.5's heartbeat registers its KV caches again
(tests/lmcache05/test_restart.py drives the real client through it)."""

from __future__ import annotations

import trio

from lmcd.wire.types import Ping, PoolInfo, UnregisterPool
from tests.test_enginepool import Driver, _ids, make_pools, register_request


async def test_an_unknown_worker_is_told_unhealthy_once() -> None:
    pools = make_pools()
    d = Driver.create(pools)
    wid = next(_ids)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.handlers.run)
            # Untracked probers (no id) are always answered True.
            assert await d.call(Ping(None)) == (True, True)
            assert await d.call(Ping(wid)) == (True, False)
            assert await d.call(Ping(wid)) == (True, True)
            assert await d.call(Ping(wid)) == (True, True)
            ok, info = await d.call(register_request(wid))
            assert ok
            assert isinstance(info, PoolInfo)
            assert await d.call(Ping(wid)) == (True, True)
            # Gone again (unregistered here; reaped or restarted alike):
            # told once more.
            assert await d.call(UnregisterPool(wid)) == (True, None)
            assert await d.call(Ping(wid)) == (True, False)
            assert await d.call(Ping(wid)) == (True, True)
            nursery.cancel_scope.cancel()
