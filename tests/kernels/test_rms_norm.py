"""Triton RMSNorm op against the plain-torch reference (Hugging Face's math), forward and both gradients."""

import pytest
import torch
from kernel_checks import assert_close, fp32_copies, grads_of, leaf
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from llmstack.kernels import backend, rms_norm

# Model width rows; an odd shape; Qwen3's per-head norm over [B, T, heads, head_dim].
SHAPES = [(2, 16, 64), (5, 123, 123), (2, 5, 3, 8)]
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16-x-fp32-w": (torch.bfloat16, torch.float32)}


def _inputs(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(device), (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device)


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen3RMSNorm])
def test_reference_is_the_hugging_face_module(norm_class):
    x, w = _inputs((3, 7, 40))
    module = norm_class(40, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(w)
    for dtype in (torch.float32, torch.bfloat16):
        module.to(dtype)
        assert torch.equal(rms_norm.reference(x.to(dtype), module.weight, 1e-5), module(x.to(dtype)))


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_and_both_gradients_match_the_reference(shape, dtypes, device, triton_on):
    x_dtype, w_dtype = dtypes
    x0, w0 = _inputs(shape, device=device)
    x, w = leaf(x0, x_dtype), leaf(w0, w_dtype)
    y = rms_norm.rms_norm(x, w, 1e-6, kernels="fused")
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    got = grads_of(y, [x, w], upstream)
    x32, w32 = fp32_copies(x, w)
    expected_y = rms_norm.reference(x32, w32, 1e-6)
    expected = grads_of(expected_y, [x32, w32], upstream)
    assert y.dtype == torch.promote_types(x_dtype, w_dtype)
    assert_close(y, expected_y, x_dtype, "y")
    for name, a, e, p in zip("xw", got, expected, (x, w)):
        assert a.dtype == p.dtype
        assert_close(a, e, x_dtype, f"grad {name}")


def test_plain_torch_fallback_inside_the_op_matches_the_reference(monkeypatch):
    monkeypatch.setattr(backend, "triton_runs_on", lambda device: False)
    x0, w0 = _inputs((4, 9, 24))
    x, w = leaf(x0, torch.float32), leaf(w0, torch.float32)
    y = rms_norm.rms_norm(x, w, 1e-6, kernels="fused")
    got = grads_of(y, [x, w], torch.ones_like(y))
    x32, w32 = fp32_copies(x, w)
    expected_y = rms_norm.reference(x32, w32, 1e-6)
    expected = grads_of(expected_y, [x32, w32], torch.ones_like(y))
    assert_close(y, expected_y, torch.float32, "y")
    for a, e in zip(got, expected):
        assert_close(a, e, torch.float32, "grad")


def test_registered_op_passes_torch_library_opcheck(device, triton_on):
    x, w = _inputs((3, 5, 16), device=device)
    torch.library.opcheck(rms_norm.rms_norm_fwd, (x.requires_grad_(), w.requires_grad_(), 1e-6))


def test_fused_module_keeps_the_stock_parameter():
    stock = LlamaRMSNorm(16, eps=1e-5)
    fused = rms_norm.FusedRMSNorm.from_module(stock)
    assert fused.weight is stock.weight
    assert fused.state_dict().keys() == stock.state_dict().keys()
