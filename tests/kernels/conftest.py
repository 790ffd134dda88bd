"""Kernel tests run the Triton kernels on CPU through Triton's interpreter, which tests/conftest.py switches
on before anything is imported. If the kernels were nevertheless defined in compiled mode, or triton is not
installed, the Triton tests skip and say why.
"""

import pytest

from llmstack.kernels import KernelPlan


@pytest.fixture
def triton_cpu():
    """Skip unless the Triton kernels can run on CPU tensors in this process."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'llmstack[kernels]')")
    from llmstack.kernels import backend

    if not backend.triton_runs_on("cpu"):
        pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set; they cannot run on CPU")


@pytest.fixture
def plan_for(request):
    """For tests parametrised over the path an op takes: the resolved plan that forces it (the Triton one
    needs the interpreter, see `triton_cpu`)."""
    def plan(path: str) -> KernelPlan:
        if path == "triton":
            request.getfixturevalue("triton_cpu")
        return KernelPlan("fused", "cpu", path, swap_modules=path == "triton")
    return plan
