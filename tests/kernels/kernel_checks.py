"""Shared by the kernel tests (imported by name): the one tolerance table, and gradient helpers.

An element passes when |actual - expected| <= atol * max|expected| + rtol * |expected|: the absolute part is
relative to the tensor's own scale, so the table holds for any shape and input size (a weight gradient
summed over 600 rows is 25 times larger than one summed over one row, and so are its rounding errors).

Low-precision results are always compared with the fp32 reference run on the same (bf16-exact) inputs, so
the bf16 row is set by what bf16 itself does to these ops: the LM head's logits are rounded to bf16 before
the fp32 loss (as in the unfused bf16 path, whose error against the fp32 reference measured the same), and
RMSNorm rounds the normalised row to bf16 before the weight, as Hugging Face does. A wrong term in a
formula (a missing temperature or smoothing term, a dropped chunk, a wrong sign) is off by far more; the
tests were checked to fail on such mutations.

On CUDA the same table applies, and the expected values still come from the fp32 reference on CPU. What
differs there is the order of the fp32 sums (cuBLAS and Triton reduce in other orders than the CPU's BLAS)
and Triton's approximate exp/log (a few ulp): round-off of K terms grows like eps * sqrt(K), 4e-6 of the
tensor's scale at the largest reduction here (K = 5003, a vocabulary), under the fp32 row; bf16 results are
rounded to bf16 on both devices alike. Matmuls must be true fp32, so the cuda `device` fixture keeps TF32 off.
"""

import torch

from llmstack.kernels import KernelPlan

# the torch chunked path forced, whatever the device would resolve to (tests of the chunk loop itself)
CHUNKED = KernelPlan("fused", "cpu", "chunked", swap_modules=False)

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """`actual` (from inputs of `dtype`) against the fp32 `expected`, with `dtype`'s tolerances."""
    tol = TOLERANCES[dtype]
    expected = expected.detach().float().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().float().cpu(), expected, rtol=tol["rtol"],
                               atol=tol["atol"] * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


def grads_of(output, inputs, upstream=None) -> list:
    """Gradients of sum(upstream * output) (a scalar output: upstream scales it) w.r.t. each input; an upstream
    tensor is moved to its output's device."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    ups = upstream if isinstance(upstream, (tuple, list)) else (upstream,) * len(outputs)
    total = sum((o * (u.to(o.device) if isinstance(u, torch.Tensor) else 1.0 if u is None else u)).sum()
                for o, u in zip(outputs, ups) if o is not None)
    return list(torch.autograd.grad(total, inputs, allow_unused=True))


def fp32_copies(*tensors):
    """fp32 leaves on CPU holding exactly the values of `tensors` (bf16 values are exact in fp32), for the
    reference: whatever device the fast path ran on, the expectation is the CPU's."""
    return [leaf(t.cpu(), torch.float32) if t is not None else None for t in tensors]
