"""scripts/gpu-check.sh: on a machine without CUDA it skips with a clear message and exit 0, so CI and the
README's commands can run it anywhere. The kernel tests it runs are parametrised over devices; their CPU side
is checked here: the cuda cases exist, and without CUDA they skip, saying why, while the cpu ones run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/gpu-check.sh"


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


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _device_of(test_id: str) -> str | None:
    params = re.search(r"\[(.*)\]$", test_id)
    found = {"cpu", "cuda"} & set(params.group(1).split("-")) if params else set()
    return found.pop() if found else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the cuda cases run (scripts/gpu-check.sh)")
def test_without_cuda_the_cuda_cases_are_collected_and_skip_with_the_reason_while_the_cpu_cases_run():
    # every cuda case of every module (all skip at once) and one module's cpu cases (run: a few seconds)
    proc = _pytest("-v", "-rs", "-k", "swiglu or cuda", "tests/kernels")
    assert proc.returncode == 0, proc.stdout[-3000:]
    outcomes = {}
    for test_id, outcome in re.findall(r"^(tests/kernels/\S+) (PASSED|SKIPPED|FAILED|ERROR)", proc.stdout, re.M):
        outcomes.setdefault(_device_of(test_id), {})[test_id] = outcome
    cuda, cpu = outcomes.get("cuda", {}), outcomes.get("cpu", {})
    for module in ("test_rms_norm", "test_rope", "test_swiglu", "test_linear_cross_entropy", "test_linear_logprobs",
                   "test_apply"):
        assert any(f"/{module}.py::" in test_id for test_id in cuda), f"{module} has no cuda cases"
    assert set(cuda.values()) == {"SKIPPED"}
    reasons = re.findall(r"^SKIPPED \[(\d+)\] \S+: (.*)$", proc.stdout, re.M)
    assert sum(int(n) for n, why in reasons if "no CUDA device here (torch.cuda.is_available() is False)" in why) \
        == len(cuda), "every cuda case says why it skipped"
    swiglu_cuda = {test_id.replace("cuda", "cpu") for test_id in cuda if "/test_swiglu.py::" in test_id}
    assert swiglu_cuda and swiglu_cuda == set(cpu), "each cuda case has its cpu twin"
    assert set(cpu.values()) == {"PASSED"}  # Triton interpreted, and the torch fallback
