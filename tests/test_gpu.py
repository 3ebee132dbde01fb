"""GPU checks: the prepared script, small (marked `gpu`; skipped without CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_checks.py"


@pytest.mark.gpu
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


def test_gpu_report_table_without_a_gpu() -> None:
    """The table the GPU check writes for docs (pure formatting, runs anywhere)."""
    import argparse

    from lmcd.gpucheck import markdown

    report = {
        "device": "NVIDIA H200",
        "pinned_copy_GBps": {"d2h": 50.0, "h2d": 52.0},
        "checks": {
            "mha-bf16": {
                "bit_exact_and_found": True,
                "store_GBps": 45.0,
                "retrieve_GBps": 41.6,
            },
        },
        "store_vs_pinned_copy": 0.9,
        "retrieve_vs_pinned_copy": 0.8,
    }
    text = markdown(report, argparse.Namespace(layers=32, chunks=32, iters=4))
    assert "| mha-bf16 | yes | 45.0 | 41.6 |" in text
    assert "MHA store: 90% of the pinned copy; retrieve: 80%" in text
