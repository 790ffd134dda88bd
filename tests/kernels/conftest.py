"""Kernel tests run the Triton kernels on CPU through Triton's interpreter, which tests/conftest.py switches
on before anything is imported. If the kernels were nevertheless defined in compiled mode, or triton is not
installed, the Triton tests skip and say why.
"""

import pytest


@pytest.fixture
def triton_cpu():
    """Skip unless the Triton kernels can run on CPU tensors in this process."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'llmstack[kernels]')")
    from llmstack.kernels import backend

    if not backend.triton_runs_on("cpu"):
        pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set; they cannot run on CPU")


@pytest.fixture
def impl_ready(request):
    """For tests parametrised over `impl`: the Triton ones need the interpreter (see `triton_cpu`)."""
    def check(impl: str) -> None:
        if impl == "triton":
            request.getfixturevalue("triton_cpu")
    return check
