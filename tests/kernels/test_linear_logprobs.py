"""Fused per-token log-probabilities and entropy against the plain-torch reference, forward and gradients."""

import math

import pytest
import torch
from kernel_checks import CHUNKED, assert_close, fp32_copies, grads_of, leaf

from llmstack.kernels import linear_logprobs as llp

SHAPES = [(32, 64, 1000), (123, 123, 123), (16, 32, 5003)]  # as in test_linear_cross_entropy


def _inputs(n, h, v, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / math.sqrt(h)  # logits of unit scale (sharper at T < 1)
    bias = torch.randn(v, generator=g) * 0.1
    tokens = torch.randint(0, v, (n,), generator=g)
    return tuple(t.to(device) for t in (hidden, weight, bias, tokens))


def test_reference_is_the_formula_by_hand():
    # One row, logits (0, ln 2, ln 5) at temperature 2: s = (0, ln 2 / 2, ln 5 / 2), token 2.
    s = [0.0, math.log(2) / 2, math.log(5) / 2]
    z = sum(math.exp(x) for x in s)
    p = [math.exp(x) / z for x in s]
    logp, entropy = llp.reference(torch.tensor([[0.0, math.log(2), math.log(5)]]), torch.eye(3),
                                  torch.tensor([2]), temperature=2.0)
    assert logp.item() == pytest.approx(math.log(p[2]), rel=1e-6)
    assert entropy.item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)


@pytest.mark.parametrize("path", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature,use_bias", [(1.0, False), (0.7, True)], ids=["t1", "t0.7+bias"])
def test_outputs_and_every_gradient_match_the_reference(path, dtype, shape, temperature, use_bias, device,
                                                         plan_for):
    hidden, weight, bias, tokens = _inputs(*shape, device=device)
    h, w, b = leaf(hidden, dtype), leaf(weight, dtype), leaf(bias, dtype) if use_bias else None
    params = [t for t in (h, w, b) if t is not None]
    g = torch.Generator().manual_seed(7)
    upstream = (torch.randn(shape[0], generator=g), torch.randn(shape[0], generator=g))  # PPO-like weights

    logp, entropy = llp.linear_logprobs(h, w, tokens, b, temperature=temperature, kernels=plan_for(path), chunk_rows=7)
    got = grads_of((logp, entropy), params, upstream)

    h32, w32, b32 = fp32_copies(h, w, b)
    ref_params = [t for t in (h32, w32, b32) if t is not None]
    ref_logp, ref_entropy = llp.reference(h32, w32, tokens.cpu(), b32, temperature)
    expected = grads_of((ref_logp, ref_entropy), ref_params, upstream)

    assert logp.dtype == entropy.dtype == torch.float32
    assert_close(logp, ref_logp, dtype, "logp")
    assert_close(entropy, ref_entropy, dtype, "entropy")
    for name, a, e, p in zip("hwb", got, expected, params):
        assert a.dtype == p.dtype
        assert_close(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("path", ["chunked", "triton"])
def test_gradient_of_logp_alone(path, device, plan_for):
    hidden, weight, _, tokens = _inputs(20, 16, 300, device=device)
    h, w = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    logp, entropy = llp.linear_logprobs(h, w, tokens, kernels=plan_for(path), with_entropy=False, chunk_rows=6)
    assert entropy is None
    got = grads_of(logp, [h, w])
    h32, w32 = fp32_copies(h, w)
    expected = grads_of(llp.reference(h32, w32, tokens.cpu())[0], [h32, w32])
    for a, e in zip(got, expected):
        assert_close(a, e, torch.float32, "grad")


def test_chunked_saves_nothing_of_vocabulary_size():
    n, h, v = 64, 8, 500
    hidden, weight, _, tokens = _inputs(n, h, v)
    hidden.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        llp.linear_logprobs(hidden, weight, tokens, kernels=CHUNKED, chunk_rows=8)
    assert saved and max(saved) <= max(n * h, v * h)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        llp.reference(hidden, weight, tokens)  # the probe does see the unfused path's [N, V] activations
    assert max(saved) >= n * v


def test_under_no_grad_nothing_is_kept():
    hidden, weight, _, tokens = _inputs(10, 8, 40)
    hidden.requires_grad_()
    with torch.no_grad():
        logp, entropy = llp.linear_logprobs(hidden, weight, tokens, kernels=CHUNKED, chunk_rows=3)
    assert logp.grad_fn is None and entropy.grad_fn is None
    ref_logp, ref_entropy = llp.reference(hidden.detach(), weight, tokens)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)


def test_leading_dimensions_are_kept():
    hidden, weight, _, tokens = _inputs(12, 8, 40)
    logp, entropy = llp.linear_logprobs(hidden.view(3, 4, 8), weight, tokens.view(3, 4), kernels=CHUNKED)
    assert logp.shape == entropy.shape == (3, 4)
    torch.testing.assert_close(logp.reshape(-1), llp.reference(hidden, weight, tokens)[0])


def test_bad_temperature_is_named():
    hidden, weight, _, tokens = _inputs(4, 8, 40)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        llp.linear_logprobs(hidden, weight, tokens, temperature=0.0, kernels=CHUNKED)


def test_token_outside_the_vocabulary_is_named():
    hidden, weight, _, tokens = _inputs(4, 8, 40)
    tokens[1] = 40
    with pytest.raises(ValueError, match=r"token 40 is not a class id in \[0, 40\)"):
        llp.linear_logprobs(hidden, weight, tokens, kernels=CHUNKED)
