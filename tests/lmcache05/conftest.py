"""Fixtures: lmcache's own 0.5.6 server and lmcd, both on loopback, and the
real lmcache 0.5.6 adapters to drive them.

These tests need lmcache 0.5.x (`nox -s tests_lmcache05`); with any other
lmcache (the default `tests` session has the 0.3.13 client) or none, this
directory is not collected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adapter_rig import filter_warnings_under, lmcache_version

if not (lmcache_version() or "").startswith("0.5."):
    collect_ignore_glob = ["test_*.py"]
else:
    from functools import partial

    from lmcd.benchmarks.lmcache05 import (
        LMCD,
        REFERENCE,
        ServerOptions,
        ServerProcess,
        start_server,
    )
    from tests.adapter_rig import context, rig_for, served, start_for_module

    __all__ = ["context"]

    SERVER_PARAMS = [REFERENCE, LMCD]

    # The lock TTL of the `short_ttl_server`s, in seconds.
    SHORT_LOCK_TTL = 1

    # Both kinds start in seconds; lmcd answers or fails the probe at once,
    # so an lmcd without the dialect costs each module one wait. lmcd binds
    # its port before torch is imported (1-2 s, more on a loaded machine)
    # and answers once it is: the wait counts from the bind.
    _start = partial(start_for_module, partial(start_server, answer_timeout=20.0))

    @pytest.fixture(scope="module")
    def reference_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[ServerProcess]:
        """lmcache's own 0.5.6 MP server on CPU (chunk 16, 0.25 GB, LRU,
        engine-driven SHM pool), telemetry off; stopped after the module."""
        server = _start(REFERENCE, ServerOptions(), tmp_path_factory)
        yield from served(server, clean_exit=False)

    @pytest.fixture(scope="module")
    def lmcd_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[ServerProcess]:
        """`lmcd serve --chunk-size 16 --cpu-buffer-size 0.25`; stopped
        (and checked to exit 0) after the module."""
        server = _start(LMCD, ServerOptions(), tmp_path_factory)
        yield from served(server, clean_exit=True)

    @pytest.fixture(scope="module", params=SERVER_PARAMS)
    def server(request: pytest.FixtureRequest) -> ServerProcess:
        """Each test runs against lmcache's own server and against lmcd."""
        name = "reference_server" if request.param == REFERENCE else "lmcd_server"
        result: ServerProcess = request.getfixturevalue(name)
        return result

    @pytest.fixture(scope="module", params=SERVER_PARAMS)
    def short_ttl_server(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[ServerProcess]:
        """A server whose lookup read locks expire after `SHORT_LOCK_TTL` s
        (`--l1-read-ttl-seconds` / `--lock-ttl`)."""
        options = ServerOptions(lock_ttl=SHORT_LOCK_TTL)
        server = _start(request.param, options, tmp_path_factory)
        yield from served(server, clean_exit=False)

    def _rig(server: ServerProcess, context: Any, name: str) -> Iterator[Any]:
        from tests.lmcache05.helpers import Rig

        yield from rig_for(Rig, server, context, name)

    @pytest.fixture
    def rig(
        server: ServerProcess, context: Any, request: pytest.FixtureRequest
    ) -> Iterator[Any]:
        """Adapters and clients on `server`, for a model of this test's own."""
        yield from _rig(server, context, request.node.name)

    @pytest.fixture
    def ttl_rig(
        short_ttl_server: ServerProcess, context: Any, request: pytest.FixtureRequest
    ) -> Iterator[Any]:
        """The same on a `short_ttl_server`."""
        yield from _rig(short_ttl_server, context, request.node.name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # lmcache 0.5.6 builds opentelemetry-sdk's deprecated LoggingHandler.
    filter_warnings_under(
        Path(__file__).parent,
        items,
        "ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated"
        ":DeprecationWarning",
    )
