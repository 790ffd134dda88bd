"""GRPO (the RL loop with the group estimator) on a tiny model: reward functions see the decoded completions
and the prompt records' columns, no value model exists, the group-size rule, exact resume."""

import json
import math

import pytest
import torch

from llmstack.config import ConfigError, GRPOConfig, load_config
from llmstack.trainers.ppo import ppo

from helpers import metric_rows, stop_at_step, tiny_chat_policy  # noqa: E402  (tests/trainers)

SEEN = []


def echo_reward(prompts, completions, answer, **columns):
    """Records what it is given; scores by length so that groups differ."""
    SEEN.append({"prompts": prompts, "completions": completions, "answer": answer, "columns": columns})
    return [float(len(c) % 5) for c in completions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    policy, tokenizer = tiny_chat_policy(root)
    with open(root / "prompts.jsonl", "w") as fh:
        for i in range(16):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}: what is one plus {i}?"}],
                                 "answer": f"#### {i + 1}", "id": i}) + "\n")
    return root, policy, tokenizer


def config(root, name, *extra):
    return load_config(GRPOConfig, None, [
        f"output_dir={root / name}", f"model.name_or_path={root / 'policy'}", f"data.train={root / 'prompts.jsonl'}",
        "train.max_steps=4", "train.batch_size=8", "train.lr=1e-3", "train.save_every=2", "train.log_every=1",
        "rollout.batch_size=4", "rollout.max_new_tokens=8", "reward_funcs=[answer_format]", "samples_per_step=8",
        *extra])


def test_reward_functions_receive_decoded_completions_and_the_records_columns(setup):
    root, _, _ = setup
    SEEN.clear()
    ppo(config(root, "columns", "train.max_steps=1"), reward_funcs={"echo": echo_reward})
    call = SEEN[0]
    assert len(call["completions"]) == 16  # 4 prompts x 4 samples
    # every row's columns belong to its own prompt, and a group's 4 rows share one prompt
    for prompt, answer, row_id in zip(call["prompts"], call["answer"], call["columns"]["id"]):
        asked = int(prompt[0]["content"].split(":")[0].removeprefix("Question "))
        assert (asked, answer) == (row_id, f"#### {row_id + 1}")
    assert all(len({str(p) for p in call["prompts"][g:g + 4]}) == 1 for g in range(0, 16, 4))
    # the completions are the text the run decoded: the samples file holds the same strings
    samples = [json.loads(x) for x in (root / "columns" / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in samples] == call["completions"][:8]
    row = metric_rows(root / "columns")[0]
    assert row["reward/echo"] == pytest.approx(sum(len(c) % 5 for c in call["completions"]) / 16)
    assert row["reward"] == pytest.approx(row["reward/echo"] + row["reward/answer_format"])


def test_grpo_trains_without_a_value_model(setup, device):
    """On each device with the kernels' default (on CUDA: the Triton kernels compiled, the modules swapped)."""
    root, policy, _ = setup
    result = ppo(config(root, f"critic-free-{device}"))
    out = root / f"critic-free-{device}"
    assert not (out / "value_model").exists()
    rows = metric_rows(out)
    assert "value_loss" not in rows[0] and "explained_variance" not in rows[0]
    record = json.loads((out / "record.json").read_text())
    assert record["stage"] == "grpo"
    assert (record["kernels"]["device"], record["kernels"]["path"]) == \
        (device, "triton" if device == "cuda" else "chunked")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(not torch.equal(a.cpu(), b) for a, b in zip(result.model.state_dict().values(),
                                                            load_policy(policy).state_dict().values()))


def load_policy(path):
    from llmstack.models.causal_lm import load_causal_lm

    return load_causal_lm(str(path))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_one_sample_per_prompt_is_refused_for_group_estimators(setup, estimator):
    root, _, _ = setup
    kl = ["ppo.kl_in=loss"] if estimator == "grpo" else ["ppo.kl_in=reward"]
    cfg = config(root, f"g1-{estimator}", f"ppo.estimator={estimator}", "rollout.samples_per_prompt=1", *kl)
    with pytest.raises(ConfigError, match=f"{estimator} estimator needs a group size .* at least 2, got 1"):
        ppo(cfg)


def test_interrupted_grpo_resumes_to_the_same_policy(setup, monkeypatch):
    root, _, _ = setup
    whole = ppo(config(root, "whole"))
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        stopped = ppo(config(root, "split"))
    assert stopped.status == "interrupted" and stopped.state.step == 3
    resumed = ppo(config(root, "split"))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    keep = ("loss", "reward", "kl", "entropy")
    assert [{k: r[k] for k in keep} for r in metric_rows(root / "split")] == \
        [{k: r[k] for k in keep} for r in metric_rows(root / "whole")]
