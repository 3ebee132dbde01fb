"""Fixtures: lmcache's own 0.4.x server and lmcd (with the matching
`--dialect`, and detecting among every dialect), on loopback, for the real
lmcache 0.4.6 or 0.4.7 adapters of this environment
(`tests/lmcache04/rig.py`).

These tests need lmcache 0.4.6 or 0.4.7 (`nox -s tests_lmcache046` /
`tests_lmcache047`); with any other lmcache, or none, this directory is not
collected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adapter_rig import filter_warnings_under, lmcache_version

VERSION = lmcache_version()

if VERSION not in ("0.4.6", "0.4.7"):
    collect_ignore_glob = ["test_*.py"]
else:
    from functools import partial

    from lmcd.benchmarks.lmcache05 import LMCD, REFERENCE, ServerOptions
    from lmcd.benchmarks.lmcache05 import ServerProcess as _ServerProcess
    from tests.adapter_rig import context, rig_for, served, start_for_module
    from tests.lmcache04.rig import Rig, start_server

    __all__ = ["context"]

    DIALECT = f"lmcache-{VERSION}"
    # Every dialect at once, detected per connection.
    EVERY = "auto"
    MIXED = "lmcd-every-dialect"
    # Small pools: every engine-driven worker of a test holds one.
    LMCD_FLAGS = ("--pool-size", "16", "--log-level", "info")

    def lmcd_options(dialect: str = DIALECT, **kw: Any) -> ServerOptions:
        return ServerOptions(lmcd_flags=(*LMCD_FLAGS, "--dialect", dialect), **kw)

    _start = partial(start_for_module, start_server)

    @pytest.fixture(scope="module")
    def reference_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[_ServerProcess]:
        """lmcache's own MP server of this release on CPU (chunk 16, 0.25
        GB, LRU), telemetry off; stopped after the module."""
        server = _start(REFERENCE, ServerOptions(), tmp_path_factory)
        yield from served(server, clean_exit=False)

    @pytest.fixture(scope="module")
    def lmcd_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[_ServerProcess]:
        """`lmcd serve --chunk-size 16 --dialect lmcache-0.4.x`; stopped (and
        checked to exit 0) after the module."""
        server = _start(LMCD, lmcd_options(), tmp_path_factory)
        yield from served(server, clean_exit=True)

    @pytest.fixture(scope="module")
    def lmcd_mixed_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[_ServerProcess]:
        """The same with `--dialect auto` (every dialect, detected)."""
        server = _start(LMCD, lmcd_options(EVERY), tmp_path_factory)
        yield from served(server, clean_exit=True)

    @pytest.fixture(scope="module", params=[REFERENCE, LMCD, MIXED])
    def server(request: pytest.FixtureRequest) -> _ServerProcess:
        """Each test runs against lmcache's own server and against lmcd,
        with its dialect chosen and detected."""
        name = {
            REFERENCE: "reference_server",
            LMCD: "lmcd_server",
            MIXED: "lmcd_mixed_server",
        }[request.param]
        result: _ServerProcess = request.getfixturevalue(name)
        return result

    @pytest.fixture
    def rig(
        server: _ServerProcess, context: Any, request: pytest.FixtureRequest
    ) -> Iterator[Rig]:
        """Adapters and clients on `server`, for a model of this test's own."""
        yield from rig_for(Rig, server, context, request.node.name)

    @pytest.fixture
    def tmp_logs(tmp_path: Path) -> Path:
        return tmp_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # lmcache 0.4 builds deprecated opentelemetry handlers.
    filter_warnings_under(Path(__file__).parent, items, "ignore::DeprecationWarning")
