"""SwiGLU feed-forward, as Hugging Face's Llama, Mistral, Qwen2 and Qwen3 MLPs compute it (`LlamaMLP` with
`hidden_act="silu"`): down_proj(silu(gate_proj(x)) * up_proj(x)).

Shape legend: N rows (any leading dimensions), H model width, I intermediate width.

Paths: `reference` (plain torch, the spec, for the elementwise core `silu(gate) * up`);
`llmstack::swiglu` / `llmstack::swiglu_bwd`, `torch.library` ops backed by Triton (plain torch where Triton
cannot run, logged) with fake and autograd registrations; `swiglu` dispatches; `FusedSwiGLUMLP` is the
drop-in MLP that keeps the stock `gate_proj`, `up_proj` and `down_proj` Linear modules (LoRA wrappers
included) and fuses only the elementwise core, which then saves gate and up for the backward instead of
gate, silu(gate) and up: one [N, I] tensor less per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmstack.kernels import backend
from llmstack.kernels.backend import KernelPlan

ACTIVATIONS = ("silu", "swish")  # the `hidden_act` names Hugging Face maps to SiLU


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@torch.library.custom_op("llmstack::swiglu", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if backend.triton_runs_on(gate.device):
        return backend.triton_module("swiglu").forward(gate, up)
    backend.fallback_notice("swiglu", gate.device)
    dtype = torch.promote_types(gate.dtype, up.dtype)
    return (F.silu(gate.float()) * up.float()).to(dtype)


@swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("llmstack::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if backend.triton_runs_on(gate.device):
        return backend.triton_module("swiglu").backward(dy, gate, up)
    a, b, g = gate.float(), up.float(), dy.float()
    sig = torch.sigmoid(a)
    return (g * b * sig * (1 + a * (1 - sig))).to(gate.dtype), (g * a * sig).to(up.dtype)


@swiglu_bwd.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dy, gate, up)


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernels: KernelPlan | str) -> torch.Tensor:
    """The op where `kernels` resolves to the Triton path on gate's device, the plain-torch reference elsewhere."""
    if backend.path_on(kernels, gate.device) != "triton":
        return reference(gate, up)
    return swiglu_fwd(gate, up)


class FusedSwiGLUMLP(nn.Module):
    """Drop-in for a Hugging Face gated-SiLU MLP holding the same three Linear modules (same state dict)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    @classmethod
    def from_module(cls, module: nn.Module) -> FusedSwiGLUMLP:
        return cls(module.gate_proj, module.up_proj, module.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_fwd(self.gate_proj(x), self.up_proj(x)))
