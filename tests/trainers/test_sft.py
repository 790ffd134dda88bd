"""SFT on tiny models: packing changes nothing but speed, attention stays inside examples, LoRA, the stage."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmstack.config import SFTConfig, load_config
from llmstack.data.chat import DEFAULT_CHAT_TEMPLATE, block_causal_mask, build_rows, ensure_chat_template, tokenize_conversation
from llmstack.data.synthetic import corpus, instructions
from llmstack.data.text import train_tokenizer
from llmstack.kernels import resolve
from llmstack.losses import count_targets
from llmstack.models.causal_lm import build_from_preset, save_model
from llmstack.trainers.sft import _sft_loss_sum, sft

from helpers import assert_close_sums, metric_rows  # noqa: E402  (tests/trainers)

REFERENCE = resolve("reference", "cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A fresh tiny model with a chat-capable tokenizer, saved like a pretraining run's model/."""
    tokenizer = train_tokenizer(corpus(200) + [m["content"] for c in instructions(200) for m in c], 384)
    model = build_from_preset("llama-1m", tokenizer, 256, seed=0)
    path = tmp_path_factory.mktemp("base") / "model"
    save_model(model, tokenizer, path)
    ensure_chat_template(tokenizer)
    return path, model, tokenizer


def loss_and_grads(model, rows):
    model.zero_grad()
    batch = rows.rows(torch.arange(len(rows)))
    loss = _sft_loss_sum(model, batch, REFERENCE) / count_targets(batch["labels"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_and_unpacked_rows_give_the_same_loss_and_gradients(base):
    _, model, tokenizer = base
    examples = [tokenize_conversation(tokenizer, c) for c in instructions(12, seed=4)]
    packed = build_rows(examples, 96, tokenizer.pad_token_id, packing=True)
    unpacked = build_rows(examples, 96, tokenizer.pad_token_id, packing=False)
    assert len(packed) < len(unpacked) == 12
    loss_p, grads_p = loss_and_grads(model, packed)
    loss_u, grads_u = loss_and_grads(model, unpacked)
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_never_crosses_example_boundaries(base):
    _, model, tokenizer = base
    examples = [tokenize_conversation(tokenizer, c) for c in instructions(3, seed=9)]
    rows = build_rows(examples, 256, tokenizer.pad_token_id, packing=True)
    assert len(rows) == 1
    batch = rows.rows(torch.arange(1))
    seg = batch["segment_ids"][0]
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, seg == 1] = (changed["input_ids"][0, seg == 1] + 7) % 300
    def logits(b):
        mask = block_causal_mask(b["segment_ids"])
        return model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=mask).logits[0]

    with torch.no_grad():
        before, after = logits(batch), logits(changed)
    for segment in (0, 2):
        torch.testing.assert_close(before[seg == segment], after[seg == segment], rtol=0, atol=1e-6)
    assert not torch.allclose(before[seg == 1], after[seg == 1])


def config(tmp_path, name, base_path, *overrides):
    return load_config(SFTConfig, None, [
        f"output_dir={tmp_path / name}", f"model.name_or_path={base_path}", "data.train=synthetic:300",
        "data.max_length=96", "train.batch_size=4", "train.max_steps=30", "train.lr=3e-3", "train.warmup_steps=3",
        "train.eval_every=15", "train.eval_batches=4", "train.log_every=5", "sample_prompts=2",
        "sample_max_new_tokens=8", *overrides])


@pytest.mark.slow
def test_sft_stage_lowers_held_out_answer_loss_and_writes_samples(tmp_path, base):
    result = sft(config(tmp_path, "sft", base[0]))
    out = tmp_path / "sft"
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "finished" and record["data"]["chat_template"] == "llmstack default"
    assert record["metrics"]["final_eval_loss"] < 0.6 * record["metrics"]["initial_eval_loss"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 15, 15, 30, 30]
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == DEFAULT_CHAT_TEMPLATE
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)


def test_a_short_sft_run_with_the_kernels_follows_the_stock_one(tmp_path, base, device):
    """kernels=auto (on CUDA the compiled Triton kernels with the modules swapped, on CPU the chunked loss)
    against kernels=reference, from the same weights on the same device in fp32: every step's loss."""
    steps = ("train.max_steps=2", "train.log_every=1", "train.eval_every=0", "sample_prompts=0",
             "train.precision=fp32")
    for kernels in ("reference", "auto"):
        sft(config(tmp_path, kernels, base[0], *steps, f"kernels={kernels}"))
    record = json.loads((tmp_path / "auto/record.json").read_text())
    assert (record["kernels"]["device"], record["kernels"]["path"]) == \
        (device, "triton" if device == "cuda" else "chunked")
    fused, stock = ([r["loss"] for r in metric_rows(tmp_path / k)] for k in ("auto", "reference"))
    assert len(stock) == 2
    # a mean over up to 4 x 96 tokens, each through layers up to 384 wide (llama-1m's MLP)
    assert_close_sums(torch.tensor(fused), torch.tensor(stock), n_terms=4 * 96 * 384)


def test_lora_trains_only_adapters_and_the_merged_save_matches_them(tmp_path, base):
    peft = pytest.importorskip("peft")
    base_path, base_model, _ = base
    lora = ["lora.enabled=true", "lora.r=4", "train.max_steps=6", "train.eval_every=0", "sample_prompts=0"]
    adapters = sft(config(tmp_path, "adapters", base_path, *lora, "lora.merge=false"))
    trained = dict(adapters.model.named_parameters())
    for name, param in base_model.named_parameters():
        peft_name = next(n for n in trained if n.endswith(name.replace(".weight", ".base_layer.weight"))
                         or n.endswith(name))
        assert torch.equal(trained[peft_name], param), f"base weight {name} changed"
    assert any(not torch.all(p == 0) for n, p in trained.items() if "lora_B" in n), "adapters did not train"
    assert (tmp_path / "adapters/model/adapter_config.json").is_file()

    # gradient checkpointing recomputes the same activations, so it must not change the result either
    merged = sft(config(tmp_path, "merged", base_path, *lora, "lora.merge=true", "gradient_checkpointing=true"))
    assert not (tmp_path / "merged/model/adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged/model")
    with_adapters = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                                   tmp_path / "adapters/model")
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, with_adapters(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain(ids).logits, merged.model(ids).logits, rtol=1e-5, atol=1e-6)


def test_qlora_trains_adapters_over_a_4bit_base_and_saves_them(tmp_path, base):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    result = sft(config(tmp_path, "qlora", base[0], "lora.enabled=true", "lora.load_in_4bit=true", "lora.merge=false",
                        "lora.r=4", "train.max_steps=6", "train.eval_every=3", "sample_prompts=0"))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    q_proj = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit"
    record = json.loads((tmp_path / "qlora/record.json").read_text())
    assert record["metrics"]["final_eval_loss"] < record["metrics"]["initial_eval_loss"]
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base[0]), tmp_path / "qlora/model")
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())


def test_4bit_without_adapters_is_refused():
    from llmstack.config import ConfigError

    with pytest.raises(ConfigError, match="'lora.load_in_4bit' needs 'lora.enabled=true'"):
        load_config(SFTConfig, None, ["model.name_or_path=m", "lora.load_in_4bit=true"])


def test_a_batch_cut_to_its_longest_row_has_the_full_width_loss_and_gradients(base):
    _, model, tokenizer = base
    examples = [tokenize_conversation(tokenizer, c) for c in instructions(4, seed=5)]
    rows = build_rows(examples, 256, tokenizer.pad_token_id, packing=False)
    index = torch.arange(len(rows))
    full = {"input_ids": rows.input_ids, "labels": rows.labels, "position_ids": rows.position_ids,
            "segment_ids": rows.segment_ids}
    cut = rows.rows(index)
    assert cut["input_ids"].shape[1] == int(rows.lengths.max()) < 256

    def loss_and_grads_of(batch):
        model.zero_grad()
        loss = _sft_loss_sum(model, batch, REFERENCE)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_full, grads_full = loss_and_grads_of(full)
    loss_cut, grads_cut = loss_and_grads_of(cut)
    assert loss_cut == pytest.approx(loss_full, rel=1e-5)
    for a, e in zip(grads_cut, grads_full):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
