"""Deployment files and docs: what they depend on must hold."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import Server

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"


def load(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / name).read_text()))


def serve_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "lmcd", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    return result.stdout


def test_manifests_parse_and_name_their_kinds() -> None:
    kinds = {p.name: yaml.safe_load(p.read_text())["kind"] for p in K8S.glob("*.yaml")}
    assert kinds == {
        "namespace.yaml": "Namespace",
        "lmcd-daemonset.yaml": "DaemonSet",
        "vllm-deployment.yaml": "Deployment",
    }


def test_daemonset_wiring() -> None:
    ds = load("lmcd-daemonset.yaml")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["hostIPC"] is True
    shm = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/dev/shm"]
    assert shm, "the host's /dev/shm must be mounted"
    (container,) = pod["containers"]
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    resources = container["resources"]
    for part in ("requests", "limits"):
        assert "nvidia.com/gpu" not in resources.get(part, {}), "GPUs stay with vLLM"
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:3] == ["lmcd", "inspect", "--check"]
    args = container["args"]
    buffer_gib = float(
        next(a for a in args if a.startswith("--cpu-buffer-size=")).split("=")[1]
    )
    request = resources["requests"]["memory"]
    assert request.endswith("Gi")
    assert float(request[:-2]) >= buffer_gib, "memory request must cover the buffer"
    port = int(next(a for a in args if a.startswith("--port=")).split("=")[1])
    assert container["ports"][0]["containerPort"] == port
    help_text = serve_help()
    for arg in args:
        assert arg.split("=")[0] in help_text, arg


def test_probe_command_exists() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmcd", "inspect", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--check" in result.stdout


def test_vllm_deployment_points_at_lmcd() -> None:
    dep = load("vllm-deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (script,) = container["args"]  # one shell line: install lmcache, run vLLM
    assert "lmcache==0.5.6" in script
    assert container["image"].rsplit(":", 1)[1] != "latest"  # a pinned vLLM
    config = json.loads(re.search(r"--kv-transfer-config '(\{.*\})'", script).group(1))  # type: ignore[union-attr]
    assert config["kv_connector"] == "LMCacheMPConnector"
    assert config["kv_connector_module_path"] == (
        "lmcache.integration.vllm.lmcache_mp_connector"
    )
    extra = config["kv_connector_extra_config"]
    assert extra["lmcache.mp.autostart"] is False
    ds_args = load("lmcd-daemonset.yaml")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    lmcd_port = int(next(a for a in ds_args if a.startswith("--port=")).split("=")[1])
    assert extra["lmcache.mp.port"] == lmcd_port
    assert extra["lmcache.mp.host"] == "tcp://$(LMCD_HOST)"
    env = {e["name"]: e for e in container["env"]}
    assert env["LMCD_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert any(v.get("hostPath", {}).get("path") == "/dev/shm" for v in pod["volumes"])


def test_dockerfile_runs_lmcd_serve() -> None:
    text = (ROOT / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry is not None
    assert json.loads(entry.group(1))[:2] == ["lmcd", "serve"]
    assert (ROOT / ".dockerignore").exists()


def test_every_serve_flag_in_the_docs_exists() -> None:
    help_text = serve_help()
    docs = [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "Dockerfile"]
    mentioned: set[str] = set()
    for path in docs:
        text = path.read_text()
        if path.name == "configuration.md":
            # The tables after this heading are the client commands' flags
            # (tests/test_docs.py checks every command's table).
            text = text.split("## Other commands")[0]
        for line in text.splitlines():
            if "lmcd serve" in line or (
                path.name == "configuration.md" and line.startswith("| `--")
            ):
                mentioned.update(
                    re.findall(r"(--[a-z][a-z-]+)", line.split("lmcd serve")[-1])
                )
    assert {"--cpu-buffer-size", "--metrics-port", "--lock-ttl"} <= mentioned
    missing = sorted(f for f in mentioned if f not in help_text)
    assert not missing, f"flags in docs but not in `lmcd serve --help`: {missing}"


def test_quickstart_connector_config_is_valid_json() -> None:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    config = json.loads(re.search(r"--kv-transfer-config '(\{.*\})'", text).group(1))  # type: ignore[union-attr]
    assert config["kv_connector"] == "LMCacheMPConnector"
    # lmcache 0.5.6 through its bundled connector, its own server off.
    assert config["kv_connector_module_path"] == (
        "lmcache.integration.vllm.lmcache_mp_connector"
    )
    extra = config["kv_connector_extra_config"]
    assert extra["lmcache.mp.port"] == 5555
    assert extra["lmcache.mp.autostart"] is False


def test_quickstart_example_reaches_a_cache_hit(server: Server) -> None:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    code = text.split("<!-- quickstart-example -->", 1)[1].split("```python", 1)[1]
    code = code.split("```", 1)[0]
    expected = text.split("It prints:", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    for _ in range(2):  # the example must work twice, like a user tries it
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "LMCD_PORT": str(server.port)},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected.strip()
