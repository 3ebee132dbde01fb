"""Starting and steering peer clients (`python -m tests.peers.lmcache03`,
`tests.peers.lmcache05`) from a test.

A peer sets itself up, creates `<dir>/ready-<name>`, waits for `<dir>/go`,
then runs round trips against the daemon until `<dir>/stop` appears
(at least `MIN_ROUNDS`), and prints `ok <name> <rounds>` when done. So a test
can start its peers, wait until all are ready, and have every client work
at the same time.

The interpreters come from `LMCD_PYTHON_LMCACHE03` / `LMCD_PYTHON_LMCACHE05`
(defaults: the nox sessions' environments, `.nox/tests/bin/python` and
`.nox/tests_lmcache05/bin/python`; nox passes them). Tests that need a peer
skip without it, unless `LMCD_REQUIRE_PEERS=1` (nox sets it under CI), when
they fail instead.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[2]
MIN_ROUNDS = 2
PYTHONS = {
    "lmcache03": os.environ.get(
        "LMCD_PYTHON_LMCACHE03", str(ROOT / ".nox" / "tests" / "bin" / "python")
    ),
    "lmcache05": os.environ.get(
        "LMCD_PYTHON_LMCACHE05",
        str(ROOT / ".nox" / "tests_lmcache05" / "bin" / "python"),
    ),
}
REQUIRED = os.environ.get("LMCD_REQUIRE_PEERS") == "1"


def available(name: str) -> bool:
    """Whether peer `name`'s interpreter exists (always True when peers are
    required, so that a missing one fails its test instead of skipping)."""
    return REQUIRED or Path(PYTHONS[name]).exists()


@attrs.define
class Peer:
    name: str
    proc: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(name: str, url: str, folder: Path) -> Peer:
    """Start peer `name` on `url`, steered through files in `folder`."""
    log = folder / f"{name}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LMCACHE_TRACK_USAGE": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PYTHONS[name], "-m", f"tests.peers.{name}", str(folder), url],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
    return Peer(name, proc, log)


def wait_ready(peers: list[Peer], folder: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for p in peers:
        while not (folder / f"ready-{p.name}").exists():
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited early:\n{p.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{p.name} not ready:\n{p.output()}")
            time.sleep(0.05)


def finish(peers: list[Peer], folder: Path, timeout: float = 60.0) -> dict[str, int]:
    """Tell the peers to stop; the rounds each completed. Raises
    `AssertionError` with its output when one failed."""
    (folder / "stop").touch()
    rounds = {}
    for p in peers:
        try:
            p.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
        out = p.output()
        done = [line for line in out.splitlines() if line.startswith(f"ok {p.name} ")]
        if p.proc.returncode != 0 or not done:
            raise AssertionError(f"{p.name} failed ({p.proc.returncode}):\n{out}")
        rounds[p.name] = int(done[-1].split()[-1])
    return rounds


def kill(peers: list[Peer]) -> None:
    for p in peers:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def steer(folder: Path, name: str) -> None:
    """In a peer: announce readiness, then wait for the go."""
    (folder / f"ready-{name}").touch()
    deadline = time.monotonic() + 300
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no go")
        time.sleep(0.02)


def more(folder: Path, rounds: int) -> bool:
    """In a peer: whether to run another round."""
    return rounds < MIN_ROUNDS or not (folder / "stop").exists()
