"""log p(token) and entropy of the LM head's next-token distribution, without the full [N, V] logits.

Shape legend: N rows (tokens; any leading dimensions), H hidden width, V vocabulary, C rows in one chunk.

With s = (h W^T + b) / temperature in fp32 and p = softmax(s), per row:

    logp = s_token - logsumexp(s)          entropy = -sum_j p_j log p_j

This is what PPO needs from the policy (and the reference model): the sampled tokens' log-probabilities at
the sampling temperature, and the entropy for an entropy bonus or for monitoring.

Paths (chosen by the `kernels` argument through `backend.resolve`, as for `linear_cross_entropy`; `auto` is
`triton` on CUDA when Triton runs there, `chunked` elsewhere):
- `reference`: full logits, log_softmax, gather. The spec.
- `chunked`: a torch.autograd.Function over chunks of rows. The forward keeps only the inputs and two fp32
  numbers per row (log-sum-exp, entropy); the backward recomputes each chunk's logits and turns the
  incoming gradients of both outputs into gradients w.r.t. hidden, weight and bias:
      d logp / ds_j = [j == token] - p_j        d entropy / ds_j = -p_j (log p_j + entropy)
  One more head matmul than the unfused path, for O(N) instead of O(N V) saved memory.
- `triton`: the same loop; Triton kernels do each chunk's reductions and gradient in place.

Under torch.no_grad (old-policy and reference passes) nothing is saved at all. Chunk size, compute dtype and
fp32 accumulation of the weight gradient follow `linear_cross_entropy`; as there, token ids are checked to
lie in [0, V) (one host synchronisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstack.kernels import backend
from llmstack.kernels.backend import KernelPlan
from llmstack.kernels.linear_cross_entropy import WeightGradAccumulator, chunk_rows_for, compute_dtype


def reference(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, tokens_N: torch.Tensor,
              bias_V: torch.Tensor | None = None, temperature: float = 1.0):
    """The spec: (logp [...], entropy [...]) from full fp32 logits."""
    logits = F.linear(hidden_NH, weight_VH, bias_V).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens_N.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


# The chunk functions work in place on `logits_CV`'s fp32 copy, or on `logits_CV` itself when it is fp32:
# it is always the chunk loop's own temporary.

def _torch_forward_chunk(logits_CV, tokens_C, temperature, with_entropy):
    s = logits_CV.float()
    if temperature != 1.0:
        s.mul_(1.0 / temperature)
    s_token = s.gather(1, tokens_C[:, None]).squeeze(1)
    row_max = s.amax(-1)
    shifted = s.sub_(row_max[:, None])
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    lse = row_max + sum_exp.log()
    if not with_entropy:
        return s_token - lse, None, lse
    # entropy = log sum e - sum e (s - m) / sum e, with every term relative to the row maximum m
    entropy = sum_exp.log() - exp.mul_(shifted).sum(-1) / sum_exp
    return s_token - lse, entropy, lse


def _torch_backward_chunk(logits_CV, tokens_C, temperature, lse_C, entropy_C, g_logp_C, g_entropy_C):
    """d/d logits of sum(g_logp logp + g_H H) = -(p (g_logp + g_H (log p + H)) - g_logp [j == token]) / T."""
    logp_all = logits_CV.float()
    if temperature != 1.0:
        logp_all.mul_(1.0 / temperature)
    logp_all.sub_(lse_C[:, None])
    grad = logp_all.exp()
    if g_entropy_C is not None:
        grad.mul_(logp_all.add_(entropy_C[:, None]).mul_(g_entropy_C[:, None]).add_(g_logp_C[:, None]))
    else:
        grad.mul_(g_logp_C[:, None])
    grad.scatter_add_(1, tokens_C[:, None], -g_logp_C[:, None])
    grad.mul_(-1.0 / temperature)
    return grad if grad is logits_CV else logits_CV.copy_(grad)


def _triton_forward_chunk(logits_CV, tokens_C, temperature, with_entropy):
    logp, entropy, lse = backend.triton_module("logprobs").forward(logits_CV, tokens_C, temperature)
    return logp, entropy if with_entropy else None, lse


def _triton_backward_chunk(logits_CV, tokens_C, temperature, lse_C, entropy_C, g_logp_C, g_entropy_C):
    # Without an entropy gradient its term is zero, whatever the entropy value passed.
    g_entropy_C = g_entropy_C if g_entropy_C is not None else torch.zeros_like(g_logp_C)
    entropy_C = entropy_C if entropy_C is not None else torch.zeros_like(lse_C)
    backend.triton_module("logprobs").backward_(logits_CV, tokens_C, temperature, lse_C, entropy_C, g_logp_C,
                                                g_entropy_C)
    return logits_CV


def _forward(hidden_NH, weight_VH, bias_V, tokens_N, temperature, rows, forward_chunk, with_entropy):
    dtype = compute_dtype(hidden_NH, weight_VH)
    weight = weight_VH.to(dtype)
    bias = bias_V.to(dtype) if bias_V is not None else None
    logp_N, entropy_N, lse_N = (torch.empty(hidden_NH.shape[0], dtype=torch.float32, device=hidden_NH.device)
                                for _ in range(3))
    with torch.autocast(hidden_NH.device.type, enabled=False):
        for start in range(0, hidden_NH.shape[0], rows):
            stop = start + rows
            logits = F.linear(hidden_NH[start:stop].to(dtype), weight, bias)
            logp, entropy, lse = forward_chunk(logits, tokens_N[start:stop], temperature, with_entropy)
            logp_N[start:stop], lse_N[start:stop] = logp, lse
            if entropy is not None:
                entropy_N[start:stop] = entropy
            del logits  # before the next chunk's logits exist
    return logp_N, entropy_N if with_entropy else None, lse_N, dtype


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, tokens_N, temperature, rows, paths, with_entropy):
        logp, entropy, lse, dtype = _forward(hidden_NH, weight_VH, bias_V, tokens_N, temperature, rows,
                                             paths[0], with_entropy)
        entropy = entropy if with_entropy else lse.new_zeros(0)
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, tokens_N, lse, entropy)
        ctx.settings = (temperature, rows, paths[1], with_entropy, dtype)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp_N, g_entropy_N):
        hidden_NH, weight_VH, bias_V, tokens_N, lse, entropy = ctx.saved_tensors
        temperature, rows, backward_chunk, with_entropy, dtype = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_logp_N = g_logp_N.float() if g_logp_N is not None else torch.zeros_like(lse)
        g_entropy_N = g_entropy_N.float() if with_entropy and g_entropy_N is not None else None
        weight = weight_VH.to(dtype)
        bias = bias_V.to(dtype) if bias_V is not None else None
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        grad_w = WeightGradAccumulator(weight_VH, dtype) if need_w else None
        grad_b = torch.zeros(weight_VH.shape[0], dtype=torch.float32, device=weight_VH.device) if need_b else None
        with torch.autocast(hidden_NH.device.type, enabled=False):
            for start in range(0, hidden_NH.shape[0], rows):
                stop = start + rows
                h_CH = hidden_NH[start:stop].to(dtype)
                grad_CV = backward_chunk(F.linear(h_CH, weight, bias), tokens_N[start:stop], temperature,
                                         lse[start:stop], entropy[start:stop] if with_entropy else None,
                                         g_logp_N[start:stop],
                                         g_entropy_N[start:stop] if g_entropy_N is not None else None)
                if grad_h is not None:
                    grad_h[start:stop] = grad_CV @ weight
                if grad_w is not None:
                    grad_w.add(grad_CV, h_CH)
                if grad_b is not None:
                    grad_b += grad_CV.float().sum(0)
                del grad_CV  # before the next chunk's logits exist
        return (grad_h, None if grad_w is None else grad_w.result(weight_VH.dtype),
                None if grad_b is None else grad_b.to(bias_V.dtype), None, None, None, None, None)


@torch.compiler.disable  # a Python chunk loop around an autograd.Function: compile would break here anyway
def linear_logprobs(hidden: torch.Tensor, weight_VH: torch.Tensor, tokens: torch.Tensor,
                    bias_V: torch.Tensor | None = None, *, temperature: float = 1.0, with_entropy: bool = True,
                    kernels: KernelPlan | str, chunk_rows: int | None = None):
    """(logp [...], entropy [...] or None), fp32, for hidden [..., H] and tokens [...].

    Both outputs are differentiable w.r.t. hidden, weight and bias. `kernels`: a `KernelPlan` or auto |
    reference | fused (see the module docstring); `chunk_rows` overrides the chunk-size rule.
    """
    if hidden.shape[-1] != weight_VH.shape[1] or hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight_VH.shape)} and tokens "
                         f"{tuple(tokens.shape)} do not fit [..., H], [V, H], [...]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = (tokens < 0) | (tokens >= weight_VH.shape[0])
    if bad.any():
        raise ValueError(f"token {int(tokens[bad][0])} is not a class id in [0, {weight_VH.shape[0]})")
    path = backend.path_on(kernels, hidden.device)
    if path == "reference":
        logp, entropy = reference(hidden, weight_VH, tokens, bias_V, temperature)
        return logp, entropy if with_entropy else None
    lead = tokens.shape
    hidden_NH, tokens_N = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    rows = chunk_rows or chunk_rows_for(hidden_NH.shape[0], weight_VH.shape[0])
    paths = ((_triton_forward_chunk, _triton_backward_chunk) if path == "triton"
             else (_torch_forward_chunk, _torch_backward_chunk))
    grad_on = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight_VH, bias_V))
    if grad_on:
        logp, entropy = _LinearLogprobs.apply(hidden_NH, weight_VH, bias_V, tokens_N, float(temperature), rows,
                                              paths, with_entropy)
    else:
        logp, entropy = _forward(hidden_NH, weight_VH, bias_V, tokens_N, temperature, rows, paths[0],
                                 with_entropy)[:2]
    return logp.view(lead), entropy.view(lead) if with_entropy else None
