"""Kernel tests run on every device (the `device` fixture of tests/conftest.py): `cpu` always, `cuda` when torch
sees a GPU, skipped with the reason otherwise.

Which Triton runs is one switch per process, TRITON_INTERPRET, read when the kernels are defined:
- without CUDA, tests/conftest.py sets it, so the Triton cases run interpreted on CPU tensors;
- with CUDA it is left unset, so the kernels compile and the `cuda` cases test them (this is what
  scripts/gpu-check.sh runs); the Triton-on-CPU cases then skip, saying so. The plain-torch cases run on both.
- `TRITON_INTERPRET=1 pytest tests/kernels` on a CUDA machine runs the interpreter cases instead, and the
  Triton-on-CUDA cases skip.
Without triton installed, every Triton case skips and says why.

Inputs are drawn on CPU from seeded generators and then moved, so every device sees the same numbers, and the
expected values come from the fp32 reference on CPU (kernel_checks.py).
"""

import pytest

from llmstack.kernels import KernelPlan


@pytest.fixture
def triton_on(device):
    """Skip unless the Triton kernels can run on `device` tensors in this process."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'llmstack[kernels]')")
    from llmstack.kernels import backend

    if backend.triton_runs_on(device):
        return
    if device == "cpu":
        pytest.skip("Triton on cpu needs its interpreter, which is off in this process because CUDA is present "
                    "(the kernels compile for the cuda cases); set TRITON_INTERPRET=1 to run these instead")
    pytest.skip("Triton on cuda: TRITON_INTERPRET is set, so the kernels are interpreted, not compiled; unset it "
                "to test the compiled kernels")


@pytest.fixture
def plan_for(request, device):
    """For tests parametrised over the path an op takes: the resolved plan that forces it on `device` (the
    Triton one skips where it cannot run, see `triton_on`)."""
    def plan(path: str) -> KernelPlan:
        if path == "triton":
            request.getfixturevalue("triton_on")
        return KernelPlan("fused", device, path, swap_modules=path == "triton")
    return plan
