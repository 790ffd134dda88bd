"""Rotary position embedding on q or k laid out [B, heads, T, D] (any strides, last dim contiguous), with
cos/sin [B or 1, T, D] as Hugging Face's rotary module returns them. Rotating the two halves:

    forward   y1 = x1 c1 - x2 s1      y2 = x2 c2 + x1 s2       (x * cos + rotate_half(x) * sin)
    backward  dx1 = g1 c1 + g2 s2     dx2 = g2 c2 - g1 s1      (the transpose of that rotation)

One program per (batch, position): cos/sin are read once and applied to every head.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, T, H, HALF, sx_b, sx_h, sx_t, so_b, so_h, so_t,
                 sc_b, sc_t, ss_b, ss_t, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    c_base = cos_ptr + b * sc_b + t * sc_t
    s_base = sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(c_base + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_base + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_base + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_base + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h[:, None] < H) & d_ok[None, :]
        src = x_ptr + b * sx_b + t * sx_t + h[:, None] * sx_h + d[None, :]
        dst = out_ptr + b * so_b + t * so_t + h[:, None] * so_h + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


def rotate(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor, out_dtype: torch.dtype,
           backward: bool) -> torch.Tensor:
    """The rotation of `x` (or its transpose, for the gradient) into a new tensor of `out_dtype`."""
    if x_BHTD.stride(-1) != 1:
        x_BHTD = x_BHTD.contiguous()
    batch, heads, seq, dim = x_BHTD.shape
    cos_BTD = cos_BTD.expand(batch, seq, dim)
    sin_BTD = sin_BTD.expand(batch, seq, dim)
    out = torch.empty_like(x_BHTD, dtype=out_dtype)
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_half))
    _rope_kernel[(batch * seq,)](x_BHTD, out, cos_BTD, sin_BTD, seq, heads, half,
                                 x_BHTD.stride(0), x_BHTD.stride(1), x_BHTD.stride(2),
                                 out.stride(0), out.stride(1), out.stride(2),
                                 cos_BTD.stride(0), cos_BTD.stride(1), sin_BTD.stride(0), sin_BTD.stride(1),
                                 BLOCK_H=block_h, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=4)
    return out
