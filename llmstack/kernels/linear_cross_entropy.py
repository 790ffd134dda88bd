"""Cross-entropy of the LM head's output, computed from the hidden states without the full [N, V] logits.

Shape legend: N rows (tokens), H hidden width, V vocabulary, C rows in one chunk; B batch, T positions.

With z = h W^T + b in fp32, lse_i = logsumexp_j z_ij, eps the label smoothing and c the z-loss coefficient
(PaLM, Chowdhery et al. 2022, section 5), the loss is a *sum* over rows whose label is not IGNORE_INDEX, like
every loss in `llmstack.losses` (the training loop divides by the global target count):

    loss = sum_i  (1 - eps) (lse_i - z_i,y_i) + eps (lse_i - mean_j z_ij) + c lse_i^2

which is F.cross_entropy(z, y, label_smoothing=eps, ignore_index=-100, reduction="sum") plus the z-loss.

Paths (chosen by the `kernels` argument through `backend.resolve`: a config word, auto | reference | fused, or
the `KernelPlan` a stage resolved once; `auto` is `triton` on CUDA when Triton runs there, `chunked` elsewhere):
- `reference`: full logits, then F.cross_entropy. The spec.
- `chunked`: a torch.autograd.Function that walks the rows in chunks and, in its forward, computes each
  chunk's loss *and* its gradient w.r.t. hidden, weight and bias; a chunk's logits are freed before the
  next chunk's exist, and the backward only scales the stored gradients by the incoming scalar. Works on
  any device.
- `triton`: the same loop; a Triton kernel does each chunk's elementwise work in two passes, writing the
  gradient over the logits in place (no second [C, V] buffer).

Design decisions:
- Rows labelled IGNORE_INDEX are dropped before any matmul, so SFT's prompt tokens cost nothing. That, and
  checking the labels, needs the host to read two small results: two synchronisations per call.
- Chunk size (`chunk_rows_for`): as many rows as keep one chunk's fp32 logits within 256 MiB, in multiples
  of 64, but never fewer than 1024 rows: each chunk's matmuls re-read the whole [V, H] weight, and thin
  ones starve. Measured on the 2-core AMD EPYC (Zen 5) CPU this was written on, bf16 [M, 512] x [512, 128k]:
  250 GFLOP/s at M = 512, 515 at M = 1024; on a GPU the weight re-read argues the same way. Rows per chunk:
  V = 32k: 2048; 128k and above: 1024 (512 MiB of fp32 logits at 128k, 1 GiB at 256k).
- Precision: the matmuls run in the compute dtype (autocast's when autocast is on, else the inputs'), as
  the LM head they replace would; reductions are fp32; the weight gradient is accumulated across chunks
  in fp32 (one extra [V, H] fp32 buffer when the weight is not fp32).
- The gradients are computed under the forward's grad mode: under torch.no_grad only the loss is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstack.kernels import backend
from llmstack.kernels.backend import KernelPlan

IGNORE_INDEX = -100  # llmstack.losses takes it from here (kernels sit below losses)

LOGITS_CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 1024


def reference(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor,
              bias_V: torch.Tensor | None = None, label_smoothing: float = 0.0,
              z_loss: float = 0.0) -> torch.Tensor:
    """The spec: full fp32 logits, F.cross_entropy summed over non-ignored rows, plus c * sum lse^2."""
    logits = F.linear(hidden_NH, weight_VH, bias_V).float().reshape(-1, weight_VH.shape[0])
    labels = labels_N.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * (logits.logsumexp(-1).square() * (labels != IGNORE_INDEX)).sum()
    return loss


def chunk_rows_for(n_rows: int, vocab: int) -> int:
    """Rows per chunk: see the module docstring."""
    rows = max(MIN_CHUNK_ROWS, LOGITS_CHUNK_BYTES // (4 * vocab) // 64 * 64)
    return max(1, min(n_rows, rows))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's if on for the device, else the promoted input dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _torch_chunk(logits_CV, labels_C, smoothing, z_coef, need_grad):
    """(loss per row fp32 [C], d loss / d logits in the logits' dtype or None). Works in place on the logits'
    fp32 copy (on `logits_CV` itself when fp32: the chunk loop's own temporary): logits -> exp(logits - max)
    -> gradient, one exp per element."""
    z = logits_CV.float()
    loss = -(1.0 - smoothing) * z.gather(1, labels_C[:, None]).squeeze(1)
    if smoothing:
        loss -= smoothing * z.mean(-1)
    row_max = z.amax(-1)
    exp = z.sub_(row_max[:, None]).exp_()
    sum_exp = exp.sum(-1)
    lse = row_max + sum_exp.log()
    loss += lse + z_coef * lse.square() if z_coef else lse
    if not need_grad:
        return loss, None
    grad = exp.mul_(((1.0 + 2.0 * z_coef * lse) / sum_exp)[:, None])
    if smoothing:
        grad.sub_(smoothing / grad.shape[1])
    grad.scatter_add_(1, labels_C[:, None], grad.new_full((grad.shape[0], 1), -(1.0 - smoothing)))
    return loss, grad if grad is logits_CV else logits_CV.copy_(grad)


def _triton_chunk(logits_CV, labels_C, smoothing, z_coef, need_grad):
    kernel = backend.triton_module("cross_entropy")
    loss = kernel.loss_and_grad_(logits_CV, labels_C, smoothing, z_coef, need_grad)
    return loss, logits_CV if need_grad else None


class WeightGradAccumulator:
    """grad_W = sum over chunks of grad_CV^T h_CH, accumulated in fp32. A low-precision chunk's product goes
    through one reused buffer of the weight's shape, so no chunk allocates a new [V, H] tensor."""

    def __init__(self, weight_VH: torch.Tensor, compute_dtype: torch.dtype):
        self.total = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device)
        self.partial = None if compute_dtype == torch.float32 else torch.empty_like(weight_VH, dtype=compute_dtype)

    def add(self, grad_CV: torch.Tensor, h_CH: torch.Tensor) -> None:
        if self.partial is None:
            self.total.addmm_(grad_CV.t(), h_CH)
        else:
            self.total.add_(torch.mm(grad_CV.t(), h_CH, out=self.partial))

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        self.partial = None
        return self.total.to(dtype)


def _loss_and_grads(hidden_NH, weight_VH, bias_V, labels_N, smoothing, z_coef, rows, chunk_fn, needs):
    """The chunk loop. `needs` = (hidden, weight, bias) gradient wanted; returns (loss, dh, dW, db)."""
    vocab = weight_VH.shape[0]
    dtype = compute_dtype(hidden_NH, weight_VH)
    keep = (labels_N != IGNORE_INDEX).nonzero().squeeze(1)
    rows = rows or chunk_rows_for(keep.numel(), vocab)
    weight = weight_VH.to(dtype)
    bias = bias_V.to(dtype) if bias_V is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden_NH.device)
    grad_h = torch.zeros_like(hidden_NH) if needs[0] else None
    grad_w = WeightGradAccumulator(weight_VH, dtype) if needs[1] else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight_VH.device) if needs[2] else None
    with torch.autocast(hidden_NH.device.type, enabled=False):
        for start in range(0, keep.numel(), rows):
            idx = keep[start:start + rows]
            h_CH = hidden_NH.index_select(0, idx).to(dtype)
            logits = F.linear(h_CH, weight, bias)
            loss_C, grad_CV = chunk_fn(logits, labels_N.index_select(0, idx), smoothing, z_coef, any(needs))
            loss += loss_C.sum()
            if grad_h is not None:
                grad_h.index_copy_(0, idx, (grad_CV @ weight).to(grad_h.dtype))
            if grad_w is not None:
                grad_w.add(grad_CV, h_CH)
            if grad_b is not None:
                grad_b += grad_CV.float().sum(0)
            # Free this chunk's [C, V] buffer now, not when the next chunk's name rebinds it.
            del logits, grad_CV
    return (loss, grad_h, None if grad_w is None else grad_w.result(weight_VH.dtype),
            None if grad_b is None else grad_b.to(bias_V.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, labels_N, smoothing, z_coef, rows, chunk_fn, needs):
        loss, *grads = _loss_and_grads(hidden_NH, weight_VH, bias_V, labels_N, smoothing, z_coef, rows,
                                       chunk_fn, needs)
        ctx.present = [g is not None for g in grads]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: a second backward through the same graph then fails loudly (saved tensor modified).
        saved = iter(g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        return (*grads, None, None, None, None, None, None)


def _check(hidden, weight, labels, bias):
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} does not match the head weight {tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not match the head weight {tuple(weight.shape)}")
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= weight.shape[0])
    if bad.any():
        value = int(labels[bad][0])
        raise ValueError(f"label {value} is neither {IGNORE_INDEX} (ignored) nor a class id in "
                         f"[0, {weight.shape[0]})")


@torch.compiler.disable  # data-dependent row selection and a Python chunk loop: compile would break here anyway
def linear_cross_entropy(hidden: torch.Tensor, weight_VH: torch.Tensor, labels: torch.Tensor,
                         bias_V: torch.Tensor | None = None, *, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, kernels: KernelPlan | str, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T + bias` against `labels` (fp32 scalar).

    hidden [..., H] and labels [...] share their leading dimensions; IGNORE_INDEX labels count 0.
    `kernels`: a `KernelPlan` or auto | reference | fused (see the module docstring); `chunk_rows` overrides
    the chunk-size rule.
    """
    _check(hidden, weight_VH, labels, bias_V)
    path = backend.path_on(kernels, hidden.device)
    if path == "reference":
        return reference(hidden, weight_VH, labels, bias_V, label_smoothing, z_loss)
    hidden_NH, labels_N = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk_fn = _triton_chunk if path == "triton" else _torch_chunk
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight_VH, bias_V))
    if not any(needs):
        return _loss_and_grads(hidden_NH, weight_VH, bias_V, labels_N, label_smoothing, z_loss, chunk_rows,
                               chunk_fn, needs)[0]
    return _LinearCrossEntropy.apply(hidden_NH, weight_VH, bias_V, labels_N, float(label_smoothing),
                                     float(z_loss), chunk_rows, chunk_fn, needs)


def causal_linear_cross_entropy(hidden_BTH: torch.Tensor, weight_VH: torch.Tensor, labels_BT: torch.Tensor,
                                bias_V: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Next-token loss: position t predicts labels[:, t + 1]. Equals
    `llmstack.losses.causal_lm_loss_sum(hidden @ weight.T + bias, labels)` without the logits; keyword
    arguments as `linear_cross_entropy`."""
    shifted_BT = F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)
    return linear_cross_entropy(hidden_BTH, weight_VH, shifted_BT, bias_V, **kwargs)
