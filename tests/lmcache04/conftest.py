"""Fixtures: lmcache's own 0.4.x server and lmcd (with the matching
`--dialect`, and detecting among every dialect), on loopback, for the real
lmcache 0.4.6 or 0.4.7 adapters of this environment
(`tests/lmcache04/rig.py`).

These tests need lmcache 0.4.6 or 0.4.7 (`nox -s tests_lmcache046` /
`tests_lmcache047`); with any other lmcache, or none, this directory is not
collected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest


def _lmcache_version() -> str | None:
    try:
        return metadata.version("lmcache")
    except metadata.PackageNotFoundError:
        return None


VERSION = _lmcache_version()

if VERSION not in ("0.4.6", "0.4.7"):
    collect_ignore_glob = ["test_*.py"]
else:
    from lmcd.benchmarks.lmcache05 import LMCD, NO_TELEMETRY, REFERENCE, ServerOptions
    from lmcd.benchmarks.lmcache05 import ServerProcess as _ServerProcess
    from tests.lmcache04.rig import Rig, start_server, zmq_context

    DIALECT = f"lmcache-{VERSION}"
    # Every dialect at once, detected per connection.
    EVERY = "auto"
    MIXED = "lmcd-every-dialect"
    # Small pools: every engine-driven worker of a test holds one.
    LMCD_FLAGS = ("--pool-size", "16", "--log-level", "info")

    def lmcd_options(dialect: str = DIALECT, **kw: Any) -> ServerOptions:
        return ServerOptions(lmcd_flags=(*LMCD_FLAGS, "--dialect", dialect), **kw)

    def _start(
        kind: str, options: ServerOptions, factory: pytest.TempPathFactory
    ) -> _ServerProcess:
        os.environ.update(NO_TELEMETRY)
        return start_server(kind, options, factory.mktemp(f"{kind}-logs"))

    @pytest.fixture(scope="module")
    def reference_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[_ServerProcess]:
        """lmcache's own MP server of this release on CPU (chunk 16, 0.25
        GB, LRU), telemetry off; stopped after the module."""
        server = _start(REFERENCE, ServerOptions(), tmp_path_factory)
        yield server
        server.stop()

    @pytest.fixture(scope="module")
    def lmcd_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[_ServerProcess]:
        """`lmcd serve --chunk-size 16 --dialect lmcache-0.4.x`; stopped (and
        checked to exit 0) after the module."""
        server = _start(LMCD, lmcd_options(), tmp_path_factory)
        yield server
        code = server.stop()
        assert code == 0, server.log_tail()

    @pytest.fixture(scope="module")
    def lmcd_mixed_server(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[_ServerProcess]:
        """The same with `--dialect auto` (every dialect, detected)."""
        server = _start(LMCD, lmcd_options(EVERY), tmp_path_factory)
        yield server
        code = server.stop()
        assert code == 0, server.log_tail()

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
    def context() -> Iterator[Any]:
        ctx = zmq_context()
        yield ctx
        ctx.term()

    @pytest.fixture
    def rig(
        server: _ServerProcess, context: Any, request: pytest.FixtureRequest
    ) -> Iterator[Rig]:
        """Adapters and clients on `server`, for a model of this test's own."""
        r = Rig(server.url, context, model=f"model-{request.node.name}")
        yield r
        r.close()

    @pytest.fixture
    def tmp_logs(tmp_path: Path) -> Path:
        return tmp_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # lmcache 0.4's logger setup may build deprecated opentelemetry handlers
    # when a module is first imported, inside any test.
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))
