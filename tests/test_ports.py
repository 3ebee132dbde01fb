"""`lmcd serve --port 0`: the kernel picks the port, the daemon tells it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lmcd.client import Client
from lmcd.spawn import serve_command, spawned_daemon, stop, wait_port_file


def test_port_file_names_the_bound_port(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        serve_command(0, "--cpu-buffer-size", "0.05", "--port-file", str(port_file)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = wait_port_file(str(port_file), proc, timeout=30)
        assert port > 0
        assert port_file.read_text() == f"{port}\n"
        with Client("127.0.0.1", port) as client:
            assert client.stats()["chunk_size"] == 256
    finally:
        stop(proc)
        _, err = proc.communicate()
    assert proc.returncode == 0
    assert f"listening on tcp://127.0.0.1:{port} " in err


def test_spawned_daemon_uses_port_zero() -> None:
    with (
        spawned_daemon("--cpu-buffer-size", "0.05") as port,
        Client("127.0.0.1", port) as client,
    ):
        assert client.stats()["chunk_size"] == 256


def test_unwritable_port_file_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "missing-dir" / "port"
    result = subprocess.run(
        serve_command(0, "--cpu-buffer-size", "0.05", "--port-file", str(bad)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # A directory that does not exist is a bad flag value (exit 2), caught
    # before the daemon starts.
    assert result.returncode == 2
    assert "--port-file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
