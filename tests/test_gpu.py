"""GPU checks (marked `gpu`; skipped without CUDA): the prepared script, small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_checks.py"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_store_retrieve_bit_exact() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--layers",
            "4",
            "--chunks",
            "4",
            "--iters",
            "1",
            "--buffer-gb",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["passed"], report
