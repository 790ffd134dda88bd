"""Put the fused kernels into one Hugging Face causal LM, reversibly, and route its losses around the logits.

`apply_kernels(model, mode)` swaps module *instances* inside that model for fused ones that hold the very same
parameters (state dict keys, shapes and storage unchanged, so checkpoints stay stock Hugging Face). Nothing
in transformers or torch is patched, so other models in the process are untouched. It returns a
`KernelHandle`: what was replaced, which `impl` the loss functions should take, and `remove()`.

What each mode does, by device:

    mode       CUDA with Triton                        CPU, or no Triton / no driver
    reference  nothing replaced; losses "reference"    nothing replaced; losses "reference"
    auto       RMSNorm, MLP and attention's RoPE ->    nothing replaced; losses "chunked" (Triton on CPU
               Triton ops; losses "triton"             is only the slow interpreter)
    fused      as auto                                 as auto, logged as a fallback; except under
                                                       TRITON_INTERPRET=1 on CPU: modules -> interpreted
                                                       Triton, losses "triton" (tests only: slow)

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
from llmstack.kernels.rms_norm import FusedRMSNorm
from llmstack.kernels.rope import rope_fwd
from llmstack.kernels.swiglu import ACTIVATIONS, FusedSwiGLUMLP

log = logging.getLogger(__name__)

MODES = ("auto", "reference", "fused")
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
    """What `apply_kernels` did to one model. `loss_impl` is the `impl` to pass to `linear_cross_entropy`,
    `causal_linear_cross_entropy` and `linear_logprobs`."""

    mode: str
    device: str
    loss_impl: str
    replaced: dict[str, str] = field(default_factory=dict)
    _swaps: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Put every stock module back (the same objects, so nothing is copied or re-initialised)."""
        for parent, name, stock in reversed(self._swaps):
            setattr(parent, name, stock)
        self._swaps.clear()
        self.replaced.clear()

    def summary(self) -> dict:
        """For logs and run records: mode, device, loss path and how many modules of each kind were swapped."""
        return {"mode": self.mode, "device": self.device, "loss_impl": self.loss_impl,
                "replaced": dict(Counter(self.replaced.values()))}


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _plan(mode: str, device: torch.device) -> tuple[bool, str]:
    """(swap modules for Triton ops?, loss impl)."""
    if mode == "reference":
        return False, "reference"
    runs = backend.triton_runs_on(device) if device.type == "cuda" or mode == "fused" else False
    if mode == "fused" and not runs:
        log.warning(f"kernels=fused: Triton cannot run on {device.type} here; modules stay stock, losses use "
                    "the chunked torch path")
    return runs, "triton" if runs else "chunked"


def apply_kernels(model: nn.Module, mode: str = "auto") -> KernelHandle:
    """Swap the fused modules into `model` as `mode` says (see the module docstring); log and return what
    was done. Raises if kernels are already applied to this model."""
    if mode not in MODES:
        raise ValueError(f"kernels={mode!r} is not one of {', '.join(MODES)}")
    if any(isinstance(m, (FusedRMSNorm, FusedSwiGLUMLP, RopeFusedAttention)) for m in model.modules()):
        raise ValueError("kernels are already applied to this model; call handle.remove() first")
    device = _device_of(model)
    swap, loss_impl = _plan(mode, device)
    handle = KernelHandle(mode, device.type, loss_impl)
    if swap:
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
            log.warning(f"kernels={mode}: no module of a supported family ({', '.join(FAMILIES)}) in "
                        f"{type(model).__name__}; only the loss path is fused")
    log.info(f"kernels={mode} on {device.type}: {handle.summary()}")
    return handle


def remove_kernels(handle: KernelHandle) -> None:
    """Same as `handle.remove()`."""
    handle.remove()


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / DeepSpeed (`.module`) and peft (`get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_embedding(model: nn.Module) -> nn.Module:
    head = unwrap(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embedding with a weight; the fused "
                         "losses need one (use kernels=reference)")
    if hasattr(head, "base_layer"):
        raise ValueError("the LM head is wrapped by an adapter (peft); the fused losses would ignore the "
                         "adapter: leave lm_head out of lora.target_modules or use kernels=reference")
    return head


def _weight_and_bias(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return head.weight, head.bias if isinstance(getattr(head, "bias", None), torch.Tensor) else None


def lm_head_params(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output embedding. With tied embeddings this *is* the input
    embedding's Parameter, so the fused loss's weight gradient lands on the shared tensor as usual."""
    return _weight_and_bias(_output_embedding(model))


def apply_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`head(hidden)` for a linear head applied outside its model's forward (a reward or value score at
    chosen positions). Under FSDP2 a forward without gradients leaves the root's parameters resharded, so
    the head's shards are gathered for this one product; elsewhere it is the module's own call."""
    if hasattr(head.weight, "full_tensor"):
        weight = head.weight.full_tensor()
        bias = head.bias.full_tensor() if isinstance(getattr(head, "bias", None), torch.Tensor) else None
        return torch.nn.functional.linear(hidden, weight, bias)
    return head(hidden)


def through_head(model: nn.Module, fn, *args):
    """`fn(weight, bias, *args)` with the output embedding's (weight, bias), run as that module's forward.

    Engines that shard parameters act through hooks on the module that owns them: DeepSpeed ZeRO-3 gathers
    the head's weight before the head's forward and again before its backward, and releases it after. A
    fused loss that read the weight outside such a call would see an empty shard. FSDP2 keeps the root's
    parameters (the head's among them) gathered from a training forward through its backward, but reshards
    them after a forward without gradients: there the head's shards are gathered here, once per call.
    Elsewhere this is a plain call (an extra module call inside an FSDP2 root crashes its backward, torch 2.13)."""
    head = _output_embedding(model)
    if not hasattr(head.weight, "ds_id"):
        whole = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in _weight_and_bias(head)]
        return fn(*whole, *args)
    head.forward = lambda *inputs: fn(*_weight_and_bias(head), *inputs)
    try:
        return head(*args)
    finally:
        del head.forward


def final_hidden_states(model: nn.Module, **inputs) -> torch.Tensor:
    """The last hidden states [B, T, H] (after the final norm), the LM head's input.

    Runs the model as given, wrappers included, so DDP, FSDP, DeepSpeed and accelerate's autocast see an
    ordinary forward (calling the inner decoder directly would skip DDP's gradient synchronisation). The
    head runs on the last position only (`logits_to_keep=1`); its output is discarded.
    """
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]
