"""DPO on a tiny model: a response's log-probability read from the shared-prompt row equals the one it has
alone, policy == reference gives ln 2 and zero margins (also under LoRA), exact resume."""

import math

import pytest
import torch

from llmstack.config import DPOConfig, load_config
from llmstack.data.preference import PreferenceGroup, build_preference_rows, render
from llmstack.data.prompts import left_padded
from llmstack.kernels import resolve
from llmstack.models.causal_lm import load_causal_lm
from llmstack.models.forward import token_logprobs
from llmstack.trainers.dpo import dpo, response_logprobs

from helpers import assert_close_sums, metric_rows, stop_at_step, tiny_chat_policy  # noqa: E402  (tests/trainers)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return (root, *tiny_chat_policy(root))


def config(root, name, *extra):
    return load_config(DPOConfig, None, [
        f"output_dir={root / name}", f"model.name_or_path={root / 'policy'}", "data.train=synthetic:40",
        "data.max_length=64", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=1",
        "train.log_every=1", "train.eval_every=2", "train.save_every=2", "dpo.kl_prompts=2",
        "dpo.kl_max_new_tokens=8", *extra])


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_a_shared_row_gives_each_response_its_log_probability_alone(setup, kernels):
    """Reference: prompt + response as its own sequence, log p of the response's tokens (EOS included)."""
    _, path, tokenizer = setup
    groups = [PreferenceGroup([{"role": "user", "content": "What is two plus two?"}],
                              ["Four.", "Five, I think.", "It is four."], [0, 2, 1]),
              PreferenceGroup("The owl and the fox. ", ["Near the river.", "Gone."], [1, 0])]
    rows = build_preference_rows(groups, tokenizer, max_length=64)
    batch = rows.rows(torch.arange(len(groups)))
    model = load_causal_lm(str(path))
    plan = resolve(kernels, "cpu")
    shared = response_logprobs(model, batch, plan)
    alone = torch.zeros_like(shared)
    for n, group in enumerate(groups):
        prompt = left_padded(tokenizer, [group.prompt])
        for k, response in enumerate(group.responses):
            ids = torch.tensor([render(tokenizer, group.prompt, response)[prompt.input_ids.shape[1]:]])
            logp, _ = token_logprobs(model, prompt.input_ids, prompt.attention_mask, ids, torch.ones_like(ids), 1.0,
                                     plan)
            alone[n, k] = logp.sum()
    n_terms = int((batch["segment_ids"] >= 0).sum()) * model.config.intermediate_size
    assert_close_sums(shared, alone.detach(), n_terms)
    assert shared[1, 2] == 0  # the second ranking has two responses: the third slot is padding


@pytest.mark.parametrize("lora", [False, True], ids=["separate reference", "lora"])
def test_policy_equal_to_reference_gives_ln2_and_no_margin(setup, lora):
    root, _, _ = setup
    name = f"start-{lora}"
    dpo(config(root, name, "train.max_steps=1", "train.warmup_steps=0", f"lora.enabled={str(lora).lower()}", "lora.r=4",
               "train.eval_every=1"))
    row = metric_rows(root / name)[0]
    # the first update's loss is computed before any update: every implicit reward is exactly 0
    assert row["loss"] == pytest.approx(math.log(2), abs=torch.finfo(torch.float32).eps)
    record = (root / name / "record.json").read_text()
    assert '"initial_eval_margin": 0.0' in record and '"initial_eval_kl": 0.0' in record


def test_interrupted_dpo_resumes_to_the_same_policy(setup, monkeypatch):
    root, _, _ = setup
    whole = dpo(config(root, "whole"))
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        stopped = dpo(config(root, "split"))
    assert stopped.status == "interrupted"
    resumed = dpo(config(root, "split"))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r["loss"] for r in metric_rows(root / "split")] == [r["loss"] for r in metric_rows(root / "whole")]
