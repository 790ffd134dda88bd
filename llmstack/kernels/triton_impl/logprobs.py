"""log p(token) and entropy of softmax(logits / temperature) per row, and their gradient w.r.t. the logits.

The forward keeps three running sums per row over blocks of the vocabulary, all relative to the running
maximum m: d = sum exp(s - m) and w = sum exp(s - m) (s - m). Then lse = m + log d and the entropy is
log d - w / d, which never subtracts two large numbers (lse - E[s] would, for peaked distributions).
"""

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096


@triton.jit
def _logprobs_fwd_kernel(logits_ptr, stride_row, tokens_ptr, logp_ptr, entropy_ptr, lse_ptr, V, inv_temp,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    token = tl.load(tokens_ptr + row).to(tl.int64)

    # The first block sets the reference point m; later blocks rescale the sums when the maximum grows.
    offs = tl.arange(0, BLOCK_V)
    s = tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
    m = tl.max(s, 0)
    e = tl.exp(s - m)
    d = tl.sum(e, 0)
    w = tl.sum(e * tl.where(offs < V, s - m, 0.0), 0)
    for start in range(BLOCK_V, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        s = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        new_m = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - new_m)
        # Moving the reference point from m to new_m adds (m - new_m) to every earlier (s - m).
        w = alpha * (w + (m - new_m) * d)
        e = tl.exp(s - new_m)
        w += tl.sum(e * tl.where(mask, s - new_m, 0.0), 0)
        d = d * alpha + tl.sum(e, 0)
        m = new_m
    lse = m + tl.log(d)
    s_token = tl.load(ptr + token).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, s_token - lse)
    tl.store(entropy_ptr + row, tl.log(d) - w / d)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(logits_ptr, stride_row, tokens_ptr, lse_ptr, entropy_ptr, grad_logp_ptr,
                         grad_entropy_ptr, V, inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    token = tl.load(tokens_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        logp = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        # d logp_token / ds_j = [j == token] - p_j;  d H / ds_j = -p_j (log p_j + H);  ds/dz = 1 / T
        grad = -g_logp * p - g_entropy * p * (logp + entropy)
        grad = tl.where(offs == token, grad + g_logp, grad) * inv_temp
        tl.store(ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), MAX_BLOCK_V)


def forward(logits_CV: torch.Tensor, tokens_C: torch.Tensor, temperature: float):
    """(log p(token) [C], entropy [C], log-sum-exp [C]) of softmax(logits / temperature), all fp32."""
    n_rows, vocab = logits_CV.shape
    out = torch.empty(3, n_rows, dtype=torch.float32, device=logits_CV.device)
    _logprobs_fwd_kernel[(n_rows,)](logits_CV, logits_CV.stride(0), tokens_C, out[0], out[1], out[2], vocab,
                                    1.0 / temperature, BLOCK_V=_block(vocab), num_warps=8)
    return out[0], out[1], out[2]


def backward_(logits_CV: torch.Tensor, tokens_C: torch.Tensor, temperature: float, lse_C: torch.Tensor,
              entropy_C: torch.Tensor, grad_logp_C: torch.Tensor, grad_entropy_C: torch.Tensor) -> None:
    """Overwrite `logits_CV` with d(sum g_logp logp + sum g_H H) / d logits."""
    n_rows, vocab = logits_CV.shape
    _logprobs_bwd_kernel[(n_rows,)](logits_CV, logits_CV.stride(0), tokens_C, lse_C, entropy_C,
                                    grad_logp_C.float().contiguous(), grad_entropy_C.float().contiguous(),
                                    vocab, 1.0 / temperature, BLOCK_V=_block(vocab), num_warps=8)
