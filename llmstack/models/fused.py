"""Put the fused kernels into one Hugging Face causal LM, reversibly.

`apply_kernels(model, kernels)` resolves the choice for the model's device (`llmstack.kernels.backend.resolve`,
the one place that decides) and, where the plan says so (Triton runs there), swaps module *instances* inside
that model for fused ones that hold the very same parameters (state dict keys, shapes and storage unchanged,
so checkpoints stay stock Hugging Face). Nothing in transformers or torch is patched, so other models in the
process are untouched. It returns a `KernelHandle`: the resolved `KernelPlan` that stages pass down to the
fused losses, what was replaced, and `remove()`.

This lives in `models/` because it matches and rebuilds Hugging Face module classes; `kernels/` holds only
the ops, which know nothing of Hugging Face.

Supported families (matched by class name, the layout checked): Llama, Mistral, Qwen2, Qwen3. Other models
get no module swapped (logged), and the loss path still applies to any causal LM with an output embedding.
Apply before accelerate.prepare / DDP / FSDP / DeepSpeed wrap the model; peft may come before or after.

The attention swap re-implements the four families' attention forward of transformers 5.23 around
`llmstack::rope`; it keeps the stock projections and attributes but is a different class, so
`output_attentions` does not record from it. The tests compare every family's logits with the stock model.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from llmstack.kernels import backend
from llmstack.kernels.backend import KernelPlan
from llmstack.kernels.rms_norm import FusedRMSNorm
from llmstack.kernels.rope import rope_fwd
from llmstack.kernels.swiglu import ACTIVATIONS, FusedSwiGLUMLP

log = logging.getLogger(__name__)

FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
NORMS = {f"{f}RMSNorm" for f in FAMILIES}
MLPS = {f"{f}MLP" for f in FAMILIES}
ATTENTIONS = {f"{f}Attention" for f in FAMILIES}


class RopeFusedAttention(nn.Module):
    """The stock attention's forward with the rotary embedding through `llmstack::rope`. It adopts the stock
    module's children (q/k/v/o projections; Qwen3's per-head q/k norms) and plain attributes."""

    def __init__(self, stock: nn.Module):
        super().__init__()
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for name, child in stock.named_children():
            self.add_module(name, child)
        for key, value in vars(stock).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.train(stock.training)
        self._functions = ALL_ATTENTION_FUNCTIONS
        self._eager = sys.modules[type(stock).__module__].eager_attention_forward
        self._stock_name = type(stock).__name__
        # Llama passes no sliding window; Mistral reads it from the config; Qwen2/3 per layer.
        if self._stock_name == "LlamaAttention":
            self._window = {}
        else:
            self._window = {"sliding_window": getattr(stock, "sliding_window", getattr(stock.config,
                                                                                       "sliding_window", None))}

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        # transformers 5.24 passes the KV cache as `cache`; earlier releases as `past_key_values`
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = rope_fwd(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = self._functions.get_interface(self.config._attn_implementation, self._eager)
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 **self._window, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _swap_for(module: nn.Module):
    """The fused replacement for a stock module of a supported family, or None."""
    name = type(module).__name__
    if name in NORMS and hasattr(module, "variance_epsilon"):
        return FusedRMSNorm.from_module(module)
    if name in MLPS and getattr(module.config, "hidden_act", None) in ACTIVATIONS:
        return FusedSwiGLUMLP.from_module(module)
    if name in ATTENTIONS and getattr(module.config, "partial_rotary_factor", 1.0) == 1.0:
        return RopeFusedAttention(module)
    return None


@dataclass
class KernelHandle:
    """What `apply_kernels` did to one model: the resolved `plan` (pass it to the fused losses), the modules
    it replaced, and `remove()` to put the stock ones back."""

    plan: KernelPlan
    replaced: dict[str, str] = field(default_factory=dict)
    _swaps: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Put every stock module back (the same objects, so nothing is copied or re-initialised)."""
        for parent, name, stock in reversed(self._swaps):
            setattr(parent, name, stock)
        self._swaps.clear()
        self.replaced.clear()

    def summary(self) -> dict:
        """For logs and run records: the choice, the device, the path that runs and how many modules of each
        kind were swapped."""
        return {**self.plan.summary(), "replaced": dict(Counter(self.replaced.values()))}


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def apply_kernels(model: nn.Module, kernels: str, device: torch.device | str | None = None) -> KernelHandle:
    """Resolve `kernels` (auto | reference | fused) for the device `model` is on (moved to `device` first when
    given: what `auto` picks depends on where the model will train) and swap the fused modules in where the
    plan says so; log and return what was done. Raises if kernels are already applied to it."""
    if device is not None:
        model.to(device)
    if any(isinstance(m, (FusedRMSNorm, FusedSwiGLUMLP, RopeFusedAttention)) for m in model.modules()):
        raise ValueError("kernels are already applied to this model; call handle.remove() first")
    handle = KernelHandle(backend.resolve(kernels, _device_of(model)))
    if handle.plan.swap_modules:
        targets = [(path, m) for path, m in model.named_modules() if type(m).__name__ in NORMS | MLPS]
        # Attention last: it adopts its (possibly already fused) q/k norms as children.
        targets += [(path, m) for path, m in model.named_modules() if type(m).__name__ in ATTENTIONS]
        for path, module in targets:
            fused = _swap_for(module)
            if fused is None:
                continue
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            handle._swaps.append((parent, name, module))
            setattr(parent, name, fused)
            handle.replaced[path] = type(module).__name__
        if not handle.replaced:
            log.warning(f"kernels={kernels}: no module of a supported family ({', '.join(FAMILIES)}) in "
                        f"{type(model).__name__}; only the loss path is fused")
    log.info(f"kernels={kernels} on {handle.plan.device}: {handle.summary()}")
    return handle
