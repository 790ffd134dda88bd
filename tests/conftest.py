"""Suite-wide set-up that must happen before anything imports llmstack, the `device` fixture, and one precision
for `auto` on every CPU.

Without a GPU, Triton kernels run only in Triton's interpreter, and only those defined after
TRITON_INTERPRET=1 is set; this file is imported before every test module, so the kernels tests
(tests/kernels) find them runnable whichever test first touched llmstack.kernels. With CUDA the interpreter
stays off (unless the caller set TRITON_INTERPRET), so the kernels compile and the `cuda` cases test them;
the interpreter is one switch per process, so then the Triton-on-CPU cases skip (tests/kernels/conftest.py).
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False); on a GPU machine: bash scripts/gpu-check.sh"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason=NO_CUDA))])
def device(request, monkeypatch):
    """For tests that run on every device: `cpu` always, `cuda` when torch sees a GPU (skipped, saying why,
    otherwise). A stage picks its device through accelerate, which takes CUDA whenever it exists, so the cpu
    case tells accelerate to stay on CPU; accelerate also keeps the device of its first state for the whole
    process, so each case starts from none and leaves none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if request.param == "cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
        yield "cpu"
    else:
        # the fp32 rows of the tolerance tables assume true fp32 matmuls; TF32 (off by default) keeps 10 bits
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield "cuda"
        torch.backends.cuda.matmul.allow_tf32 = tf32
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32_on_every_cpu(monkeypatch, tmp_path_factory):
    """`train.precision: auto` (the default) is bf16 on a CPU with AVX512-BF16 or AMX and fp32 on the rest, so
    the same test would run in another precision on another CI machine. Tests see a CPU without either;
    those about bf16 ask for it by name, and those about the CPU check pass their own flags."""
    from llmstack.trainers import base

    cpuinfo = tmp_path_factory.getbasetemp() / "cpuinfo-without-bf16"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.setattr(base, "CPUINFO", cpuinfo)


@pytest.fixture(autouse=True)
def _llmstack_logs_reach_caplog():
    """A stage run earlier in the session sets its own handler on the "llmstack" logger and stops propagation
    (so a run's lines are printed once); tests that read warnings with caplog need them propagated again."""
    logger = logging.getLogger("llmstack")
    propagate = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = propagate


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one state per process and refuses a later Accelerator with other settings; a test that
    builds its own Accelerator starts from none, whichever test ran before it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
