"""Fused kernels for the hot path, one module per op; each starts with its plain-torch `reference` (the spec).

- `linear_cross_entropy`: the LM loss from hidden states and the head weight, never the [N, V] logits.
- `linear_logprobs`: per-token log p and entropy (RL), same idea, with a backward for both.
- `rms_norm`, `rope`, `swiglu`: Triton ops registered with `torch.library`, with drop-in modules.
- `backend`: `resolve(kernels, device)`, the one decision of what runs where, as a `KernelPlan`.

Every op takes `kernels`, the config's word (auto | reference | fused) or the `KernelPlan` a stage resolved
once. Putting the drop-in modules into a Hugging Face model is `llmstack.models.fused.apply_kernels`: this
package knows nothing of Hugging Face.

Importing this package defines the ops and nothing else: Triton's kernels are defined only when a Triton
path is first used (see `backend`).
"""

from llmstack.kernels.backend import KERNELS, KernelPlan, resolve
from llmstack.kernels.linear_cross_entropy import IGNORE_INDEX, causal_linear_cross_entropy

__all__ = ["IGNORE_INDEX", "KERNELS", "KernelPlan", "causal_linear_cross_entropy", "resolve"]
