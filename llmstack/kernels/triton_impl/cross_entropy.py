"""Cross-entropy over one chunk of logits rows: the loss per row and, in place, its gradient w.r.t. the logits.

One program per row, two passes over the vocabulary: an online log-sum-exp (and the row sum, for label
smoothing), then the gradient written over the logits, so the chunk needs no second [C, V] buffer.
Every label is a valid class id: the caller drops ignored rows before the logits exist.
"""

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096


@triton.jit
def _ce_fwd_bwd_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, V, smoothing, z_coef,
                       BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)

    running_max = tl.full((), float("-inf"), tl.float32)
    sum_exp = tl.zeros((), tl.float32)
    row_sum = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
        if HAS_SMOOTHING:
            row_sum += tl.sum(tl.where(mask, x, 0.0), 0)
    lse = running_max + tl.log(sum_exp)

    x_label = tl.load(ptr + label).to(tl.float32)
    loss = lse - (1.0 - smoothing) * x_label
    if HAS_SMOOTHING:
        loss -= smoothing * row_sum / V
    loss += z_coef * lse * lse
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # d/dx_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == label]
        scale = 1.0 + 2.0 * z_coef * lse
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * scale - smoothing / V
            grad = tl.where(offs == label, grad - (1.0 - smoothing), grad)
            tl.store(ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def loss_and_grad_(logits_CV: torch.Tensor, labels_C: torch.Tensor, smoothing: float, z_coef: float,
                   compute_grad: bool) -> torch.Tensor:
    """Loss per row [C] (fp32); with `compute_grad`, `logits_CV` is overwritten by d loss / d logits."""
    n_rows, vocab = logits_CV.shape
    if logits_CV.stride(1) != 1:
        raise ValueError("the logits chunk must be contiguous along the vocabulary")
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits_CV.device)
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    _ce_fwd_bwd_kernel[(n_rows,)](logits_CV, logits_CV.stride(0), labels_C, loss, vocab, float(smoothing),
                                  float(z_coef), BLOCK_V=block, HAS_SMOOTHING=smoothing > 0,
                                  COMPUTE_GRAD=compute_grad, num_warps=8)
    return loss
