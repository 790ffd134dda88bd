"""Reward models on tiny backbones: where the score is read, saving, and the stage end to end."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from llmstack.config import RewardConfig, load_config
from llmstack.data.chat import ensure_chat_template
from llmstack.data.preference import PreferenceGroup, build_preference_rows, render
from llmstack.losses import ranking_loss_sum
from llmstack.models.reward_model import load_reward_model, sequence_scores
from llmstack.trainers.reward import group_scores, reward

from helpers import assert_close_sums, reward_backbone  # noqa: E402  (tests/trainers)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return reward_backbone(tmp_path_factory.mktemp("backbone"))


def padded(seqs, pad_id, left: bool):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = torch.tensor(s), 1
    return ids, mask


def test_score_is_read_at_the_last_real_token_under_left_and_right_padding(backbone):
    path, tokenizer = backbone
    model = load_reward_model(str(path), tokenizer, seed=0).eval()
    seqs = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
            for t in ("The fox sees the owl.", "One plus two is three, said the old crow near the river.")]
    with torch.no_grad():
        alone = torch.cat([sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for s in seqs])
        right = sequence_scores(model, *padded(seqs, tokenizer.pad_token_id, left=False))
        left = sequence_scores(model, *padded(seqs, tokenizer.pad_token_id, left=True))
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-6)
    assert alone[0] != alone[1]


def test_one_shared_prompt_pass_scores_and_trains_like_each_response_alone(backbone):
    """The reference: every response scored as its own prompt + response sequence (sequence_scores), the
    ranking loss on those scores and its gradient; the shared-prompt rows must give the same, up to fp32
    round-off (`assert_close_sums`: the longest sums behind a gradient run over the batch's tokens times
    the MLP's width). A position or mask error moves them by orders of magnitude more."""
    path, tokenizer = backbone
    ensure_chat_template(tokenizer)
    groups = [PreferenceGroup("The fox and the owl. What is two plus two? ", ["Four.", "Nine, I think.", "Five"],
                              [0, 2, 1]),
              PreferenceGroup([{"role": "user", "content": "Where is the owl?"}], ["Near the river.", "Gone."],
                              [1, 0], margin=0.5),
              PreferenceGroup("", ["The crow sees the fox.", "The fox."], [0, 0])]
    rows = build_preference_rows(groups, tokenizer, max_length=64)
    batch = rows.rows(torch.arange(len(groups)))
    model = load_reward_model(str(path), tokenizer, seed=0)
    n_terms = int((batch["segment_ids"] >= 0).sum()) * model.config.intermediate_size

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    alone = torch.zeros(3, 3)
    for n, group in enumerate(groups):
        for k, response in enumerate(group.responses):
            ids = torch.tensor([render(tokenizer, group.prompt, response)])
            alone[n, k] = sequence_scores(model, ids, torch.ones_like(ids))[0]
    ranks = torch.tensor([[0, 2, 1], [1, 0, -1], [0, 0, -1]])
    reference_loss = ranking_loss_sum(alone, ranks, torch.tensor([0.0, 0.5, 0.0]))
    reference_grads = grads(reference_loss)

    shared = group_scores(model, batch)
    assert_close_sums(shared, alone, n_terms)
    loss = ranking_loss_sum(shared, batch["ranks"], batch["margins"])
    assert_close_sums(loss, reference_loss, n_terms)
    for got, expected in zip(grads(loss), reference_grads):
        assert_close_sums(got, expected, n_terms)
    assert rows.stats["sharing_factor"] > 1.3  # the first group's long prompt is computed once, not thrice


@pytest.mark.slow
def test_reward_stage_beats_chance_and_saves_a_reloadable_scorer(tmp_path, backbone):
    path, tokenizer = backbone
    cfg = load_config(RewardConfig, None, [
        f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={path}", "data.train=synthetic:250",
        "data.max_length=48", "train.batch_size=8", "train.max_steps=80", "train.lr=2e-3", "train.warmup_steps=5",
        "train.eval_every=40", "train.log_every=10"])
    result = reward(cfg)
    record = json.loads((tmp_path / "rm/record.json").read_text())
    assert record["status"] == "finished"
    assert record["annotators"]["annotators"].keys() == {"ann-a", "ann-b", "ann-c"}
    metrics = record["metrics"]
    assert metrics["final_eval_accuracy"] > 0.6 and metrics["final_eval_accuracy"] > metrics["initial_eval_accuracy"]
    assert metrics["final_eval_pairs"] >= 100

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm/model").eval()
    assert reloaded.config.reward_mean == pytest.approx(metrics["reward_mean"])
    assert reloaded.config.reward_std > 0
    seqs = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
            for t in ("Two plus two is four.", "Well, let me think. Two plus two is nine.")]
    ids, mask = padded(seqs, tokenizer.pad_token_id, left=False)
    with torch.no_grad():
        hf_scores = reloaded(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = sequence_scores(result.model.eval(), ids, mask)
    torch.testing.assert_close(hf_scores, ours, rtol=1e-5, atol=1e-5)
