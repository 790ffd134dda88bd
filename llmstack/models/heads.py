"""Access to a Hugging Face model's last hidden states and its heads, for losses computed outside the head.

The fused losses (`llmstack.kernels`) take the last hidden states and the head's weight instead of the
logits; reward and value models read their score head at chosen positions only. Every function here runs
the model as given, wrappers included (DDP, FSDP2, DeepSpeed, peft, accelerate's autocast), because calling
an inner module directly would skip the wrapper's hooks: DDP's gradient synchronisation, ZeRO-3's parameter
gathering.
"""

from __future__ import annotations

import torch
from torch import nn


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


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 when it is in a narrower float type (bf16, fp16), else as it is: scores and losses are
    reduced in fp32 at least, and a model run in fp64 (for exact comparisons) keeps its precision."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def score_head(model: nn.Module) -> nn.Module:
    """The one-label `score` head of a reward or value model (`*ForSequenceClassification`), through any
    wrapper."""
    return unwrap(model).score
