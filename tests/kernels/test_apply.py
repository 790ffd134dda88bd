"""apply_kernels on tiny models of every supported family, the fused loss paths through a whole model, and a
mini-model trained with and without the kernels."""

import copy
import logging
import subprocess
import sys

import pytest
import torch
from kernel_checks import CHUNKED, assert_close
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from llmstack import losses
from llmstack.kernels import backend, causal_linear_cross_entropy, resolve
from llmstack.kernels.linear_logprobs import linear_logprobs
from llmstack.models.forward import token_logprobs
from llmstack.models.fused import apply_kernels
from llmstack.models.heads import final_hidden_states, lm_head_params
from llmstack.rl.experience import join

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
           "qwen3": lambda **kw: Qwen3Config(head_dim=8, **kw)}


def _tiny(family="llama", tie=False, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family](**COMMON, tie_word_embeddings=tie)).to(device)


def _batch(seed=0, batch=2, length=12, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :5] = losses.IGNORE_INDEX  # a masked prompt
    return ids.to(device), labels.to(device)


def _loss_and_grads(model, ids, labels):
    loss = losses.causal_lm_loss_sum(model(input_ids=ids).logits, labels)
    return loss, torch.autograd.grad(loss, [p for p in model.parameters()])


@pytest.mark.parametrize("family", CONFIGS)
def test_fused_model_matches_the_stock_one_and_removal_restores_it(family, device, triton_on):
    model = _tiny(family, device=device)
    ids, labels = _batch(device=device)
    stock_state = model.state_dict()
    stock_mlp = model.model.layers[0].mlp
    stock_loss, stock_grads = _loss_and_grads(model, ids, labels)
    stock_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)

    handle = apply_kernels(model, "fused")
    per_layer_norms = 4 if family == "qwen3" else 2  # Qwen3 also normalises q and k per head
    counts = handle.summary()["replaced"]
    prefix = type(model).__name__.removesuffix("ForCausalLM")
    assert counts == {f"{prefix}RMSNorm": 2 * per_layer_norms + 1, f"{prefix}MLP": 2, f"{prefix}Attention": 2}
    assert (handle.plan.path, handle.plan.device) == ("triton", device)
    fused_state = model.state_dict()
    assert fused_state.keys() == stock_state.keys()
    assert all(fused_state[k].data_ptr() == stock_state[k].data_ptr() for k in stock_state)
    fused_loss, fused_grads = _loss_and_grads(model, ids, labels)
    assert_close(fused_loss, stock_loss, torch.float32, "loss")
    for (name, _), a, e in zip(model.named_parameters(), fused_grads, stock_grads):
        assert_close(a, e, torch.float32, f"grad {name}")
    fused_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(fused_tokens, stock_tokens)  # KV-cache decoding through the fused attention

    handle.remove()
    assert model.model.layers[0].mlp is stock_mlp
    assert torch.equal(_loss_and_grads(model, ids, labels)[0], stock_loss)


def test_a_checkpoint_saved_while_fused_loads_into_a_stock_model(tmp_path, device, triton_on):
    model = _tiny("qwen3", device=device)
    ids, _ = _batch(device=device)
    expected = model(input_ids=ids).logits
    apply_kernels(model, "fused")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device)
    assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_modes_on_cpu_without_the_interpreter_choice():
    model = _tiny()
    reference = apply_kernels(model, "reference")
    assert (reference.replaced, reference.plan.path) == ({}, "reference")
    auto = apply_kernels(model, "auto")  # CPU: the interpreter is never chosen automatically
    assert (auto.replaced, auto.plan.path) == ({}, "chunked")


def test_fused_falls_back_to_torch_when_triton_cannot_run(monkeypatch, caplog):
    monkeypatch.setattr(backend, "triton_runs_on", lambda device: False)
    model = _tiny()
    with caplog.at_level(logging.WARNING, logger="llmstack.kernels.backend"):
        handle = apply_kernels(model, "fused")
    assert (handle.replaced, handle.plan.path) == ({}, "chunked")
    assert "Triton cannot run on cpu" in caplog.text


def test_applying_twice_and_unknown_modes_are_refused(device, triton_on):
    model = _tiny(device=device)
    with pytest.raises(ValueError, match="kernels='fast' is not one of auto, reference, fused"):
        apply_kernels(model, "fast")
    apply_kernels(model, "fused")
    with pytest.raises(ValueError, match="already applied"):
        apply_kernels(model, "fused")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_loss_from_hidden_states_equals_the_logits_loss_with_every_gradient(tie):
    model = _tiny("llama", tie=tie)
    weight, bias = lm_head_params(model)
    assert bias is None
    assert (weight is model.get_input_embeddings().weight) == tie
    ids, labels = _batch()
    stock_loss, stock_grads = _loss_and_grads(model, ids, labels)
    hidden = final_hidden_states(model, input_ids=ids)
    loss = causal_linear_cross_entropy(hidden, weight, labels, kernels=CHUNKED)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, stock_loss, torch.float32, "loss")
    for (name, _), a, e in zip(model.named_parameters(), grads, stock_grads):
        assert_close(a, e, torch.float32, f"grad {name}")


def test_logprobs_from_hidden_states_equal_the_rollout_ones():
    model = _tiny("qwen2")
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # left padding
    response = torch.randint(0, VOCAB, (2, 4), generator=g)
    response_mask = torch.ones_like(response)
    expected = token_logprobs(model, prompt, prompt_mask, response, response_mask, 0.7, resolve("reference", "cpu"),
                              with_entropy=True)

    ids, mask, positions = join(prompt, prompt_mask, response, response_mask)
    hidden = final_hidden_states(model, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    start = prompt.shape[1] - 1  # the position that predicts the first response token
    weight, _ = lm_head_params(model)
    got = linear_logprobs(hidden[:, start:start + response.shape[1]], weight, response, temperature=0.7,
                          kernels=CHUNKED)
    for name, a, e in zip(["logp", "entropy"], got, expected):
        assert_close(a, e, torch.float32, name)


def test_lm_head_behind_an_adapter_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="wrapped by an adapter"):
        lm_head_params(model)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_training_with_kernels_follows_training_without_them_step_by_step(mode, device, request):
    """The same tiny model from the same weights, 8 AdamW steps on the same batches: every step's loss."""
    if mode == "fused":
        request.getfixturevalue("triton_on")
    stock = _tiny("llama", tie=True, device=device)
    fused = copy.deepcopy(stock)
    handle = apply_kernels(fused, mode)

    def stock_loss(batch):
        ids, labels = batch
        return losses.causal_lm_loss_sum(stock(input_ids=ids).logits, labels)

    def fused_loss(batch):
        ids, labels = batch
        weight, _ = lm_head_params(fused)
        return causal_linear_cross_entropy(final_hidden_states(fused, input_ids=ids), weight, labels,
                                           kernels=handle.plan)

    curves = []
    for model, loss_fn in ((stock, stock_loss), (fused, fused_loss)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for step in range(8):
            batch = _batch(seed=step % 3, batch=4, length=16, device=device)
            loss = loss_fn(batch) / losses.count_targets(batch[1])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    assert curves[0][-1] < curves[0][0] - 0.1  # it did train
    assert_close(curves[1], curves[0], torch.float32, "loss per step")


BLOCK_TRITON = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'", name="triton")
sys.meta_path.insert(0, NoTriton())
import torch
from llmstack.kernels import linear_cross_entropy as lce, rms_norm
hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4)
labels = torch.tensor([1, 2, -100, 3, 4, 5])
loss = lce.linear_cross_entropy(hidden, weight, labels, kernels="fused")  # falls back to chunked
torch.testing.assert_close(loss, lce.reference(hidden, weight, labels))
x, w = torch.randn(3, 8), torch.rand(8)
torch.testing.assert_close(rms_norm.rms_norm(x, w, 1e-6, kernels="fused"), rms_norm.reference(x, w, 1e-6))
assert "triton" not in sys.modules
print("ok")
"""


def test_everything_imports_and_falls_back_without_triton():
    proc = subprocess.run([sys.executable, "-c", BLOCK_TRITON], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "triton is not installed" in proc.stderr
