"""RMSNorm over the last dimension, Hugging Face Llama math: y = w * to_input_dtype(x * rsqrt(mean(x^2) + eps)).

Each program normalises ROWS rows at once (several short rows per program for head-dim norms, one long row
for the model width). The backward splits the rows into a few contiguous ranges, one per program, each
summing its part of dw in fp32 into its own row of a [programs, D] buffer that the launcher reduces: no
atomics, and a result that does not depend on scheduling.
"""

import torch
import triton
import triton.language as tl

ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, D, eps, ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    # Hugging Face rounds the normalised row to the input dtype before scaling by the weight.
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (normed * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, D, rows_per_program,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), tl.float32)
    for first in range(start, end, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        normed = x * rstd[:, None]
        dw += tl.sum(dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32), 0)
        # Autograd rounds d loss / d normed to the input dtype on its way back through the cast.
        g = (dy * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        dot = tl.sum(g * normed, 1) / D
        dx = rstd[:, None] * (g - normed * dot[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * D + cols, dw, mask=col_ok)


def _tiles(dim: int) -> tuple[int, int]:
    block = triton.next_power_of_2(dim)
    return max(1, min(64, ELEMENTS_PER_PROGRAM // block)), block


def _parallel_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one after another: fewer is faster


def forward(x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float):
    """(y [N, D] in promote(x, w) dtype, rstd [N] fp32) for a contiguous x."""
    n_rows, dim = x_ND.shape
    y = torch.empty(x_ND.shape, dtype=torch.promote_types(x_ND.dtype, weight_D.dtype), device=x_ND.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x_ND.device)
    rows, block = _tiles(dim)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](x_ND, weight_D, y, rstd, n_rows, dim, float(eps),
                                                       ROWS=rows, BLOCK_D=block, num_warps=4 if block <= 1024 else 8)
    return y, rstd


def backward(dy_ND: torch.Tensor, x_ND: torch.Tensor, weight_D: torch.Tensor, rstd_N: torch.Tensor):
    """(dx [N, D] in x's dtype, dw [D] in w's dtype)."""
    n_rows, dim = x_ND.shape
    rows, block = _tiles(dim)
    programs = max(1, min(triton.cdiv(n_rows, rows), _parallel_programs(x_ND.device)))
    per_program = triton.cdiv(n_rows, programs)
    dx = torch.empty_like(x_ND)
    dw_partial = torch.empty(programs, dim, dtype=torch.float32, device=x_ND.device)
    _rms_norm_bwd_kernel[(programs,)](dy_ND, x_ND, weight_D, rstd_N, dx, dw_partial, n_rows, dim, per_program,
                                      ROWS=rows, BLOCK_D=block, num_warps=4 if block <= 1024 else 8)
    return dx, dw_partial.sum(0).to(weight_D.dtype)
