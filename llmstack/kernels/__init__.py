"""Fused kernels for the hot path, one module per op; each starts with its plain-torch `reference` (the spec).

- `linear_cross_entropy`: the LM loss from hidden states and the head weight, never the [N, V] logits.
- `linear_logprobs`: per-token log p and entropy (PPO), same idea, with a backward for both.
- `rms_norm`, `rope`, `swiglu`: Triton ops registered with `torch.library`, with drop-in modules.
- `apply`: `apply_kernels(model, mode)` swaps those modules into one model, reversibly; helpers that give a
  stage the final hidden states and the head weight.

The package re-exports the entry points whose names do not clash with a module name; import the two loss
functions from their modules (`from llmstack.kernels.linear_logprobs import linear_logprobs`).

Importing this package defines the ops and nothing else: Triton's kernels are defined only when a Triton
path is first used (see `backend`).
"""

from llmstack.kernels.apply import (KernelHandle, apply_head, apply_kernels, final_hidden_states, lm_head_params,
                                    remove_kernels, through_head)
from llmstack.kernels.linear_cross_entropy import IGNORE_INDEX, causal_linear_cross_entropy

__all__ = ["IGNORE_INDEX", "KernelHandle", "apply_head", "apply_kernels", "causal_linear_cross_entropy", "final_hidden_states",
           "lm_head_params", "remove_kernels", "through_head"]
