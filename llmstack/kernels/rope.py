"""Rotary position embedding, as Hugging Face's Llama, Mistral, Qwen2 and Qwen3 apply it
(`apply_rotary_pos_emb` with the default `unsqueeze_dim=1`): x * cos + rotate_half(x) * sin.

Shape legend: B batch, Hq / Hk query / key heads, T positions, D head dim; cos and sin are [B or 1, T, D]
as the model's rotary module returns them (any RoPE scaling is already inside cos and sin).

Paths: `reference` (plain torch, the spec); `llmstack::rope` / `llmstack::rope_bwd`, `torch.library` ops
backed by Triton (plain torch where Triton cannot run, logged) with fake and autograd registrations;
`apply_rope` dispatches. The outputs have dtype promote(x, cos), as in the reference (fp32 under autocast,
where cos is fp32 and q is bf16). The models compute cos and sin without gradient; should they need one,
it is computed in plain torch from the saved q and k.
"""

from __future__ import annotations

import torch

from llmstack.kernels import backend
from llmstack.kernels.backend import KernelPlan


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference(q_BHTD, k_BHTD, cos_BTD, sin_BTD):
    """Hugging Face's math, verbatim (transformers 5.23, apply_rotary_pos_emb, unsqueeze_dim=1)."""
    cos, sin = cos_BTD.unsqueeze(1), sin_BTD.unsqueeze(1)
    return q_BHTD * cos + rotate_half(q_BHTD) * sin, k_BHTD * cos + rotate_half(k_BHTD) * sin


def _torch_rotate(x, cos, sin, dtype, backward: bool):
    x, cos, sin = x.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    if backward:  # the transpose of the rotation: rotate_half^T = -rotate_half
        return (x * cos - rotate_half(x * sin)).to(dtype)
    return (x * cos + rotate_half(x) * sin).to(dtype)


def _rotate(x, cos, sin, dtype, backward: bool):
    if backend.triton_runs_on(x.device):
        return backend.triton_module("rope").rotate(x, cos.contiguous(), sin.contiguous(), dtype, backward)
    if not backward:
        backend.fallback_notice("rope", x.device)
    return _torch_rotate(x, cos, sin, dtype, backward)


@torch.library.custom_op("llmstack::rope", mutates_args=())
def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (_rotate(q, cos, sin, torch.promote_types(q.dtype, cos.dtype), backward=False),
            _rotate(k, cos, sin, torch.promote_types(k.dtype, cos.dtype), backward=False))


@rope_fwd.register_fake
def _(q, k, cos, sin):
    return (torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype)),
            torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype)))


@torch.library.custom_op("llmstack::rope_bwd", mutates_args=())
def rope_bwd(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (_rotate(grad_q, cos, sin, q_dtype, backward=True),
            _rotate(grad_k, cos, sin, k_dtype, backward=True))


@rope_bwd.register_fake
def _(grad_q, grad_k, cos, sin, q_dtype, k_dtype):
    return torch.empty_like(grad_q, dtype=q_dtype), torch.empty_like(grad_k, dtype=k_dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.dtypes = (q.dtype, k.dtype)
    ctx.out_shapes = (output[0].shape, output[1].shape)
    ctx.cos_sin_need_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.cos_sin_need_grad else ()))


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.sum(0, keepdim=True).to(like.dtype) if like.shape[0] == 1 else grad.to(like.dtype)


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors[:2]
    # An output that took no part in the loss may come back as None.
    grad_q = grad_q if grad_q is not None else cos.new_zeros(ctx.out_shapes[0])
    grad_k = grad_k if grad_k is not None else cos.new_zeros(ctx.out_shapes[1])
    dq, dk = rope_bwd(grad_q, grad_k, cos, sin, *ctx.dtypes)
    if not ctx.cos_sin_need_grad:
        return dq, dk, None, None
    q, k = (t.float() for t in ctx.saved_tensors[2:])
    gq, gk = grad_q.float(), grad_k.float()
    dcos = (gq * q).sum(1) + (gk * k).sum(1)
    dsin = (gq * rotate_half(q)).sum(1) + (gk * rotate_half(k)).sum(1)
    return dq, dk, _sum_to(dcos, cos), _sum_to(dsin, sin)


rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def apply_rope(q_BHTD, k_BHTD, cos_BTD, sin_BTD, kernels: KernelPlan | str):
    """(q, k) rotated: the op where `kernels` resolves to the Triton path on q's device, the plain-torch
    reference elsewhere."""
    dim = q_BHTD.shape[-1]
    if (cos_BTD.dim() != 3 or cos_BTD.shape[-1] != dim or dim % 2 or k_BHTD.shape[-1] != dim
            or sin_BTD.shape != cos_BTD.shape):
        raise ValueError(f"rope expects q, k [B, heads, T, D] with D even and cos, sin [B or 1, T, D]; got "
                         f"q {tuple(q_BHTD.shape)}, k {tuple(k_BHTD.shape)}, cos {tuple(cos_BTD.shape)}, "
                         f"sin {tuple(sin_BTD.shape)}")
    if backend.path_on(kernels, q_BHTD.device) != "triton":
        return reference(q_BHTD, k_BHTD, cos_BTD, sin_BTD)
    return rope_fwd(q_BHTD, k_BHTD, cos_BTD, sin_BTD)
