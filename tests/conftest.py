"""Suite-wide set-up that must happen before anything imports llmstack.

Without a GPU, Triton kernels run only in Triton's interpreter, and only those defined after
TRITON_INTERPRET=1 is set; this file is imported before every test module, so the kernels tests
(tests/kernels) find them runnable whichever test first touched llmstack.kernels.
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
