"""scripts/gpu-check.sh: on a machine without CUDA it skips with a clear message and exit 0, so CI and the
README's commands can run it anywhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/gpu-check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check (minutes)")
def test_without_cuda_the_gpu_check_skips_cleanly(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "skipped: torch sees no CUDA device" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing written when nothing ran


def test_without_torch_the_gpu_check_says_what_to_install(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "/bin/false"})
    assert proc.returncode == 2 and "install llmstack first" in proc.stderr
