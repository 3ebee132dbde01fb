"""Nox sessions: tests, tests_lmcache05, tests_lmcache046, tests_lmcache047,
lint, typing, bench, bench_lmcache05.

`python3 -m pip install nox && python3 -m nox` runs tests (lmcache 0.3.13
client), tests_lmcache05 (lmcache 0.5.6), tests_lmcache046 and
tests_lmcache047 (lmcache 0.4.6, 0.4.7), lint and typing.
`nox -s tests -- -k lookup` narrows the test run.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

# tests_lmcache05 first: its environment (lmcache 0.5.6) and the tests
# session's (0.3.13) are the peers other sessions start clients from.
nox.options.sessions = [
    "tests_lmcache05",
    "tests",
    "tests_lmcache046",
    "tests_lmcache047",
    "lint",
    "typing",
]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_external_run = True

# A CPU build of this torch lies in the local wheel cache; an unpinned torch
# would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# The real client, installed without its (GPU-heavy) dependencies.
LMCACHE_CLIENT = "lmcache==0.3.13"
# The reference server's storage manager, for same-run baselines.
LMCACHE_REFERENCE = "lmcache==0.3.11"
REFERENCE_DEPS = [
    "sortedcontainers",
    "nvtx",
    "prometheus_client",
    "pyyaml",
    "psutil",
    "py-cpuinfo",
    "aiohttp",
    "requests",
    "aiofile",
    "transformers",
]
# lmcache 0.5.6 (what `pip install lmcache` gives today): its real vLLM
# adapters, and its own MP server as a same-run reference. Both run on CPU.
LMCACHE_05 = "lmcache==0.5.6"
# Its dependencies that these need (LMCACHE-DIALECTS.md §10): the client's
# imports, then the server's extras. The caps are what 0.5.6 requires.
LMCACHE_05_DEPS = [
    "msgspec",
    "pyzmq",
    "numpy<=2.2.6",
    "numba",
    "cachetools",
    "prometheus_client<=0.24.1",
    "py-cpuinfo",
    "sortedcontainers",
    "requests",
    "psutil",
    "pyyaml",
    "aiohttp",
    "blake3",
    "cryptography",
    "opentelemetry-api<=1.40",
    "opentelemetry-sdk<=1.40",
    "opentelemetry-exporter-prometheus<=0.61b0",
    "httpx",
]
# lmcache 0.4.6: what vLLM 0.20-0.33's built-in LMCacheMPConnector runs
# (0.4.4-0.4.6 fit it); 0.4.7: vLLM 0.18-0.19's. Their adapters and their
# own servers run on CPU with the dependency set of 0.5.6.
LMCACHE_046 = "lmcache==0.4.6"
LMCACHE_047 = "lmcache==0.4.7"


def peer_env(session: nox.Session) -> dict[str, str]:
    """Where tests find the other releases' clients (tests/peers): the
    environments of the tests and tests_lmcache05 sessions. Under CI a test
    that needs a missing one fails instead of skipping."""
    root = Path(__file__).resolve().parent / ".nox"
    env = {
        "LMCD_PYTHON_LMCACHE03": str(root / "tests" / "bin" / "python"),
        "LMCD_PYTHON_LMCACHE05": str(root / "tests_lmcache05" / "bin" / "python"),
    }
    if os.environ.get("CI"):
        env["LMCD_REQUIRE_PEERS"] = "1"
    return env


def install(session: nox.Session, *extras: str, lmcache: str | None = None) -> None:
    """Install torch (pinned), the project with `extras`, and an lmcache client."""
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)
    if lmcache:
        session.install("--no-deps", lmcache)


def basetemp(session: nox.Session) -> list[str]:
    """pytest's temporary directories inside the session's own folder: a
    shared /tmp/pytest-of-USER is cleaned by every pytest run, and one that
    ends while another is writing there fails on "directory not empty"."""
    return ["--basetemp", os.path.join(session.create_tmp(), "pytest")]


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Unit and integration tests (GPU tests skip without CUDA)."""
    install(session, "test", lmcache=LMCACHE_CLIENT)
    session.run("pytest", *basetemp(session), *session.posargs, env=peer_env(session))


def install_lmcache(session: nox.Session, release: str = LMCACHE_05) -> None:
    """The project with its test extra, and an lmcache release (0.4.6+)
    without its (GPU-heavy) dependencies but with the few it needs on CPU."""
    install(session, "test")
    session.install(*LMCACHE_05_DEPS)
    session.install("--no-deps", release)


def install_lmcache05(session: nox.Session) -> None:
    install_lmcache(session, LMCACHE_05)


@nox.session(python="3.11")
def tests_lmcache05(session: nox.Session) -> None:
    """lmcache 0.5.6's real adapters against its own server and lmcd (CPU)."""
    install_lmcache05(session)
    session.run("pytest", "tests/lmcache05", *basetemp(session), *session.posargs)


@nox.session(python="3.11")
def tests_lmcache046(session: nox.Session) -> None:
    """lmcache 0.4.6's real adapters against its own server and lmcd (CPU)."""
    install_lmcache(session, LMCACHE_046)
    session.run(
        "pytest",
        "tests/lmcache04",
        *basetemp(session),
        *session.posargs,
        env=peer_env(session),
    )


@nox.session(python="3.11")
def tests_lmcache047(session: nox.Session) -> None:
    """lmcache 0.4.7's real adapters against its own server and lmcd (CPU)."""
    install_lmcache(session, LMCACHE_047)
    session.run(
        "pytest",
        "tests/lmcache04",
        *basetemp(session),
        *session.posargs,
        env=peer_env(session),
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typing(session: nox.Session) -> None:
    """mypy --strict over the packages."""
    install(session, "test")
    session.install("mypy")
    session.run("mypy")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks with same-run baselines; prints the report.
    `nox -s bench -- --write-docs` also rewrites docs/performance.md,
    `-- --out PATH` writes it elsewhere."""
    install(session, "test")
    session.install(*REFERENCE_DEPS)
    session.install("--no-deps", LMCACHE_REFERENCE)
    session.run("python", "-m", "lmcd.benchmarks", *session.posargs)


@nox.session(python="3.11")
def bench_lmcache05(session: nox.Session) -> None:
    """lmcd vs lmcache's own 0.5.6 server, same run, same real 0.5.6 client."""
    install_lmcache05(session)
    session.run("python", "-m", "lmcd.benchmarks.lmcache05", *session.posargs)
