"""Suite-wide set-up that must happen before anything imports llmstack.

Without a GPU, Triton kernels run only in Triton's interpreter, and only those defined after
TRITON_INTERPRET=1 is set; this file is imported before every test module, so the kernels tests
(tests/kernels) find them runnable whichever test first touched llmstack.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
