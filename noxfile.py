"""Nox sessions: tests, lint, typing, bench.

`python3 -m pip install nox && python3 -m nox` runs tests, lint and typing.
`nox -s tests -- -k lookup` narrows the test run.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typing"]
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


def install(session: nox.Session, *extras: str, lmcache: str | None = None) -> None:
    """Install torch (pinned), the project with `extras`, and an lmcache client."""
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)
    if lmcache:
        session.install("--no-deps", lmcache)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Unit and integration tests (GPU tests skip without CUDA)."""
    install(session, "test", lmcache=LMCACHE_CLIENT)
    session.run("pytest", *session.posargs)


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
    """Benchmarks with same-run baselines; writes docs/performance.md."""
    install(session, "test")
    session.install(*REFERENCE_DEPS)
    session.install("--no-deps", LMCACHE_REFERENCE)
    session.run("python", "-m", "lmcd.benchmarks", *session.posargs)
