"""Triton SwiGLU op against the plain-torch reference (Hugging Face's LlamaMLP math), forward and gradients."""

import pytest
import torch
from kernel_checks import assert_close, fp32_copies, grads_of, leaf
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from llmstack.kernels import backend, swiglu

SHAPES = [(2, 16, 64), (5, 123, 123)]


def _inputs(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(device), torch.randn(shape, generator=g).to(device)


def test_reference_is_the_hugging_face_activation():
    gate, up = _inputs((4, 33))
    assert torch.equal(swiglu.reference(gate, up), ACT2FN["silu"](gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_and_both_gradients_match_the_reference(shape, dtype, device, triton_on):
    gate0, up0 = _inputs(shape, device=device)
    gate, up = leaf(gate0, dtype), leaf(up0, dtype)
    y = swiglu.swiglu(gate, up, kernels="fused")
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    got = grads_of(y, [gate, up], upstream)
    gate32, up32 = fp32_copies(gate, up)
    expected_y = swiglu.reference(gate32, up32)
    expected = grads_of(expected_y, [gate32, up32], upstream)
    assert y.dtype == dtype
    assert_close(y, expected_y, dtype, "y")
    for name, a, e in zip(["gate", "up"], got, expected):
        assert a.dtype == dtype
        assert_close(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch-fallback"])
def test_fused_mlp_equals_the_stock_module_with_the_same_weights(use_triton, device, request, monkeypatch):
    if use_triton:
        request.getfixturevalue("triton_on")
    else:
        monkeypatch.setattr(backend, "triton_runs_on", lambda device: False)
    torch.manual_seed(0)
    stock = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4, mlp_bias=True))
    stock.to(device)
    fused = swiglu.FusedSwiGLUMLP.from_module(stock)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    assert all(a is b for a, b in zip(fused.parameters(), stock.parameters()))
    x = torch.randn(3, 7, 24).to(device)
    y_fused = fused(x)
    got = torch.autograd.grad(y_fused.square().sum(), list(stock.parameters()))
    y_stock = stock(x)
    expected = torch.autograd.grad(y_stock.square().sum(), list(stock.parameters()))
    assert_close(y_fused, y_stock, torch.float32, "y")
    for a, e in zip(got, expected):
        assert_close(a, e, torch.float32, "grad")


def test_registered_op_passes_torch_library_opcheck(device, triton_on):
    gate, up = _inputs((3, 20), device=device)
    torch.library.opcheck(swiglu.swiglu_fwd, (gate.requires_grad_(), up.requires_grad_()))
