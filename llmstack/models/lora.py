"""The memory switches: low-rank adapters (peft) and activation checkpointing on a Hugging Face model, AdamW
with 8-bit states (bitsandbytes), and the adapter-disabled reference that lets RL keep one copy of the weights
for the policy and the frozen reference."""

from __future__ import annotations

import contextlib


def prepare_for_training(model, lora, gradient_checkpointing: bool):
    """`model` with activation checkpointing (recompute in the backward pass) when asked, and wrapped in
    LoRA adapters when `lora.enabled` (a `llmstack.config.LoraConfig`); QLoRA's 4-bit base is prepared for
    training first. On a reward or value model (`*ForSequenceClassification`) the adapters go on the
    backbone and the new score head trains whole (peft keeps a trainable copy of `score` and saves it with
    the adapters)."""
    if gradient_checkpointing:
        checkpoint_activations(model)
    if not lora.enabled:
        return model
    try:
        import peft
    except ImportError as err:
        raise ImportError("lora.enabled needs peft (and lora.load_in_4bit bitsandbytes): "
                          "pip install 'llmstack[lora]'") from err
    if lora.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    task = "SEQ_CLS" if is_classifier(model) else "CAUSAL_LM"
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type=task)
    return peft.get_peft_model(model, config)


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def checkpoint_activations(model):
    """`model` recomputing each decoder layer's activations in the backward pass instead of keeping them
    (Hugging Face's gradient checkpointing, non-reentrant: it works with frozen inputs and keyword
    arguments). In training mode only; without dropout the recomputation gives the same values."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def adamw_8bit(groups: list[dict], lr: float, betas: tuple[float, float]):
    """bitsandbytes' AdamW with blockwise 8-bit moment estimates (Dettmers et al. 2022): 2 bytes of state per
    parameter instead of 8; tensors under 4096 elements keep fp32 states."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'llmstack[lora]'") from err
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)


def adapters_disabled(model) -> contextlib.AbstractContextManager:
    """Inside the block, the LoRA model computes as its frozen base: the reference policy, with no second
    copy of the weights. `model` may be wrapped (DDP, a DeepSpeed engine)."""
    inner = model
    while not hasattr(inner, "disable_adapter") and hasattr(inner, "module"):
        inner = inner.module
    if not hasattr(inner, "disable_adapter"):
        raise ValueError(f"{type(inner).__name__} has no adapters to disable: the reference needs a LoRA policy")
    return inner.disable_adapter()


def has_adapters(model) -> bool:
    return hasattr(model, "merge_and_unload")


def merged(model):
    """A plain Hugging Face model with the adapters added into the base weights (for saving)."""
    return model.merge_and_unload()
