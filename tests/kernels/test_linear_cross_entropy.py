"""Fused linear cross-entropy against its plain-torch reference, forward and every gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import CHUNKED, assert_close, fp32_copies, grads_of, leaf
from torch.utils._python_dispatch import TorchDispatchMode

from llmstack import losses
from llmstack.kernels import linear_cross_entropy as lce

# (rows N, hidden H, vocab V): a few realistic-looking rows; an odd shape; a vocabulary spanning two
# Triton blocks (4096 + a partial one) so the online log-sum-exp has to rescale.
SHAPES = [(32, 64, 1000), (123, 123, 123), (16, 32, 5003)]
OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3, bias=True)]


def _inputs(n, h, v, seed=0, ignore_every=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / math.sqrt(h)  # logits of unit scale, as at initialisation
    bias = torch.randn(v, generator=g) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = lce.IGNORE_INDEX
    return tuple(t.to(device) for t in (hidden, weight, bias, labels))


def test_ignore_index_is_the_losses_one():
    assert lce.IGNORE_INDEX == losses.IGNORE_INDEX


def test_reference_is_the_formula_by_hand():
    # Two rows over three classes; the second is ignored. z = (1, 2, 4), label 0, eps = 0.3, c = 0.01.
    hidden = torch.tensor([[1.0, 2.0, 4.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, lce.IGNORE_INDEX])
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(4))
    expected = 0.7 * (lse - 1.0) + 0.3 * (lse - 7.0 / 3.0) + 0.01 * lse ** 2
    got = lce.reference(hidden, torch.eye(3), labels, label_smoothing=0.3, z_loss=0.01)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("path", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smooth+zloss+bias"])
def test_loss_and_every_gradient_match_the_reference(path, dtype, shape, options, device, plan_for):
    options = dict(options)
    use_bias = options.pop("bias", False)
    hidden, weight, bias, labels = _inputs(*shape, device=device)
    h, w, b = leaf(hidden, dtype), leaf(weight, dtype), leaf(bias, dtype) if use_bias else None
    params = [t for t in (h, w, b) if t is not None]
    # An odd chunk size: several chunks, the last one partial.
    loss = lce.linear_cross_entropy(h, w, labels, b, kernels=plan_for(path), chunk_rows=7, **options)
    got = grads_of(loss, params, upstream=0.37)

    h32, w32, b32 = fp32_copies(h, w, b)
    ref_params = [t for t in (h32, w32, b32) if t is not None]
    expected_loss = lce.reference(h32, w32, labels.cpu(), b32, options.get("label_smoothing", 0.0),
                                  options.get("z_loss", 0.0))
    expected = grads_of(expected_loss, ref_params, upstream=0.37)

    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss, dtype, "loss")
    for name, g, e, p in zip("hwb", got, expected, params):
        assert g.dtype == p.dtype
        assert_close(g, e, dtype, f"grad {name}")


@pytest.mark.parametrize("path", ["chunked", "triton"])
def test_causal_form_equals_causal_lm_loss_sum(path, device, plan_for):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, 16, generator=g).to(device).requires_grad_()
    weight = (torch.randn(50, 16, generator=g) / 4).to(device).requires_grad_()
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = losses.IGNORE_INDEX  # a masked prompt
    labels = labels.to(device)
    got = lce.causal_linear_cross_entropy(hidden, weight, labels, kernels=plan_for(path))
    expected = losses.causal_lm_loss_sum(hidden @ weight.T, labels)
    assert_close(got, expected, torch.float32, "loss")
    for a, e in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
        assert_close(a, e, torch.float32, "grad")


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_holds_more_than_one_chunk_of_logits():
    n, h, v, rows = 512, 8, 1000, 16
    hidden, weight, _, labels = _inputs(n, h, v)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _LargestTensor() as probe:
        loss = lce.linear_cross_entropy(hidden, weight, labels, kernels=CHUNKED, chunk_rows=rows)
        loss.backward()
    assert probe.largest <= max(rows * v, v * h, n * h)
    with _LargestTensor() as unfused:  # the probe does see a full [N, V] tensor when one exists
        lce.reference(hidden, weight, labels).backward()
    assert unfused.largest >= n * v


def test_under_no_grad_only_the_loss_is_computed():
    hidden, weight, _, labels = _inputs(20, 8, 30)
    hidden.requires_grad_()
    with torch.no_grad():
        loss = lce.linear_cross_entropy(hidden, weight, labels, kernels=CHUNKED, chunk_rows=6)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, lce.reference(hidden, weight, labels).detach())


def test_under_bf16_autocast_matmuls_follow_autocast_and_gradients_keep_param_dtype():
    hidden, weight, _, labels = _inputs(24, 16, 40)
    h, w = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lce.linear_cross_entropy(h, w, labels, kernels=CHUNKED, chunk_rows=5)
    got = grads_of(loss, [h, w])
    h32, w32 = fp32_copies(h, w)
    expected_loss = lce.reference(h32, w32, labels)
    expected = grads_of(expected_loss, [h32, w32])
    assert_close(loss, expected_loss, torch.bfloat16, "loss")
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert_close(g, e, torch.bfloat16, "grad")
    # The head did run in bf16: the loss differs from the fp32 one by more than fp32 rounding.
    assert not torch.allclose(loss, expected_loss, rtol=1e-6, atol=0)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _, labels = _inputs(6, 4, 9)
    hidden.requires_grad_()
    labels[:] = lce.IGNORE_INDEX
    loss = lce.linear_cross_entropy(hidden, weight, labels, kernels=CHUNKED)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0


def test_a_second_backward_through_the_same_graph_fails_loudly():
    hidden, weight, _, labels = _inputs(6, 4, 9)
    hidden.requires_grad_()
    loss = lce.linear_cross_entropy(hidden, weight, labels, kernels=CHUNKED)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_label_is_named():
    hidden, weight, _, labels = _inputs(6, 4, 9)
    labels[2] = 9
    with pytest.raises(ValueError, match=r"label 9 is neither -100 \(ignored\) nor a class id in \[0, 9\)"):
        lce.linear_cross_entropy(hidden, weight, labels, kernels=CHUNKED)


def test_chunk_rule_as_documented():
    assert [lce.chunk_rows_for(10**6, v) for v in (32768, 131072, 262144, 2**20)] == [2048, 1024, 1024, 1024]
    assert lce.chunk_rows_for(100, 32768) == 100


def test_reference_impl_is_plain_cross_entropy():
    hidden, weight, _, labels = _inputs(10, 4, 7)
    got = lce.linear_cross_entropy(hidden, weight, labels, kernels="reference")
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got, expected)
