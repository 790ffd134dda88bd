"""Triton RoPE op against the plain-torch reference (Hugging Face's math), forward and every gradient."""

import pytest
import torch
from kernel_checks import assert_close, fp32_copies, grads_of, leaf
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llmstack.kernels import backend, rope

# (B, query heads, key heads, T, head dim): grouped-query attention; an odd one.
SHAPES = [(2, 4, 2, 16, 32), (1, 3, 1, 37, 18)]
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16-qk-fp32-cos": (torch.bfloat16, torch.float32)}  # the dtypes under autocast


def _inputs(b, hq, hk, t, d, seed=0, device="cpu"):
    """q, k laid out as the attention module makes them ([B, T, heads, D] viewed as [B, heads, T, D]) and the
    model's own cos/sin for shuffled positions, on `device`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).transpose(1, 2)
    k = torch.randn(b, t, hk, d, generator=g).transpose(1, 2)
    config = LlamaConfig(hidden_size=d * hq, num_attention_heads=hq, max_position_embeddings=128)
    positions = torch.stack([torch.randperm(t, generator=g) for _ in range(b)])
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    return tuple(x.to(device) for x in (q, k, cos, sin))


def test_reference_is_the_hugging_face_function():
    q, k, cos, sin = _inputs(*SHAPES[0])
    for got, expected in zip(rope.reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_outputs_and_gradients_match_the_reference(shape, dtypes, device, triton_on):
    qk_dtype, cos_dtype = dtypes
    q0, k0, cos0, sin0 = _inputs(*shape, device=device)
    q, k = leaf(q0, qk_dtype), leaf(k0, qk_dtype)
    cos, sin = cos0.to(cos_dtype), sin0.to(cos_dtype)
    out = rope.apply_rope(q, k, cos, sin, kernels="fused")
    g = torch.Generator().manual_seed(3)
    upstream = (torch.randn(out[0].shape, generator=g), torch.randn(out[1].shape, generator=g))
    got = grads_of(out, [q, k], upstream)
    q32, k32 = fp32_copies(q, k)
    expected_out = rope.reference(q32, k32, cos.float().cpu(), sin.float().cpu())
    expected = grads_of(expected_out, [q32, k32], upstream)
    for name, a, e, dtype in zip("qk", out, expected_out, (q.dtype, k.dtype)):
        assert a.dtype == torch.promote_types(dtype, cos_dtype)
        assert a.stride() == q.stride() if name == "q" else True  # same layout as the input view
        assert_close(a, e, qk_dtype, name)
    for name, a, e, p in zip("qk", got, expected, (q, k)):
        assert a.dtype == p.dtype
        assert_close(a, e, qk_dtype, f"grad {name}")


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch-fallback"])
def test_cos_and_sin_gradients_when_asked(use_triton, device, request, monkeypatch):
    if use_triton:
        request.getfixturevalue("triton_on")
    else:
        monkeypatch.setattr(backend, "triton_runs_on", lambda device: False)
    q0, k0, cos0, sin0 = _inputs(*SHAPES[1], device=device)
    q, k, cos, sin = (leaf(t, torch.float32) for t in (q0, k0, cos0, sin0))
    # the registered op itself: with Triton unable to run, its plain-torch body and backward
    got = grads_of(rope.rope_fwd(q, k, cos, sin), [q, k, cos, sin], torch.ones(()))
    q32, k32, cos32, sin32 = fp32_copies(q, k, cos, sin)
    expected = grads_of(rope.reference(q32, k32, cos32, sin32), [q32, k32, cos32, sin32], torch.ones(()))
    for name, a, e in zip(["q", "k", "cos", "sin"], got, expected):
        assert_close(a, e, torch.float32, f"grad {name}")


def test_registered_op_passes_torch_library_opcheck(device, triton_on):
    q, k, cos, sin = _inputs(1, 2, 1, 4, 8, device=device)
    torch.library.opcheck(rope.rope_fwd, (q.requires_grad_(), k.requires_grad_(), cos, sin))


def test_bad_shapes_are_named():
    q, k, cos, sin = _inputs(*SHAPES[0])
    with pytest.raises(ValueError, match=r"cos, sin \[B or 1, T, D\]"):
        rope.apply_rope(q, k, cos[..., :8], sin[..., :8], kernels="fused")
