"""RMSNorm, as Hugging Face's Llama, Mistral, Qwen2 and Qwen3 compute it (`LlamaRMSNorm.forward`).

Shape legend: N rows, D the normalised (last) dimension; any leading dimensions are rows.

    y = w * to_input_dtype(x_fp32 * rsqrt(mean(x_fp32^2) + eps))        (dtype: promote(x, w))

Paths: `reference` (plain torch, the spec); `llmstack::rms_norm_fwd` / `llmstack::rms_norm_bwd`, real
`torch.library` ops backed by Triton (plain torch when Triton cannot run on the tensors' device, logged), with
fake and autograd registrations so torch.compile and FSDP treat them as ordinary ops; `rms_norm` dispatches;
`FusedRMSNorm` is the drop-in module that `apply_kernels` puts in place of a model's norms. The op saves x
and one fp32 rstd per row for the backward, where autograd keeps x, the fp32 copy and the normalised row.
"""

from __future__ import annotations

import torch
from torch import nn

from llmstack.kernels import backend
from llmstack.kernels.backend import KernelPlan


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's math, verbatim (transformers 5.23, LlamaRMSNorm)."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(input_dtype)


def _torch_forward(x_ND, weight_D, eps):
    x32 = x_ND.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
    return weight_D * (x32 * rstd[:, None]).to(x_ND.dtype), rstd


def _torch_backward(dy_ND, x_ND, weight_D, rstd_N):
    normed = x_ND.float() * rstd_N[:, None]
    dw = (dy_ND.float() * normed.to(x_ND.dtype).float()).sum(0).to(weight_D.dtype)
    g = (dy_ND.float() * weight_D.float()).to(x_ND.dtype).float()
    dx = rstd_N[:, None] * (g - normed * (g * normed).mean(-1, keepdim=True))
    return dx.to(x_ND.dtype), dw


@torch.library.custom_op("llmstack::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y shaped like x, rstd [N] fp32)."""
    x_ND = x.reshape(-1, x.shape[-1]).contiguous()
    if backend.triton_runs_on(x.device):
        y, rstd = backend.triton_module("rms_norm").forward(x_ND, weight.contiguous(), eps)
    else:
        backend.fallback_notice("rms_norm", x.device)
        y, rstd = _torch_forward(x_ND, weight, eps)
    return y.view(x.shape), rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("llmstack::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx shaped like x, dw shaped like weight)."""
    dy_ND = dy.reshape(-1, dy.shape[-1]).contiguous()
    x_ND = x.reshape(-1, x.shape[-1]).contiguous()
    if backend.triton_runs_on(x.device):
        dx, dw = backend.triton_module("rms_norm").backward(dy_ND, x_ND, weight.contiguous(), rstd)
    else:
        dx, dw = _torch_backward(dy_ND, x_ND, weight, rstd)
    return dx.view(x.shape), dw


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: KernelPlan | str) -> torch.Tensor:
    """The op where `kernels` resolves to the Triton path on x's device, the plain-torch reference elsewhere."""
    if backend.path_on(kernels, x.device) != "triton":
        return reference(x, weight, eps)
    return rms_norm_fwd(x, weight, eps)[0]


class FusedRMSNorm(nn.Module):
    """Drop-in for a Hugging Face RMSNorm that holds the *same* `weight` Parameter, so the state dict keys,
    shapes and storage are unchanged and the stock module can be put back at any time."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    @classmethod
    def from_module(cls, module: nn.Module) -> FusedRMSNorm:
        return cls(module.weight, module.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm_fwd(hidden_states, self.weight, self.variance_epsilon)[0]

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"
