"""REPORT.md for a pipeline on the built-in task: does each stage improve on the previous one?

Numbers come from the stages' records and metrics, plus three measurements only the built-in task allows,
because it has a gold rubric: answer accuracy before and after SFT, the reward model's agreement with the
rubric next to the annotators' own, and the gold reward under PPO with and without the KL penalty.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from llmstack.data import synthetic
from llmstack.evaluation.builtin_task import answer_accuracy, gold_agreement
from llmstack.evaluation.plots import plot_panels, read_metrics, series
from llmstack.evaluation.policy import PolicyReading, read_policy
from llmstack.rl.rollout import SamplingSettings

N_QUESTIONS = 100
SAMPLES = 4  # answers per question when a policy is read
SMOOTH = 5


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _mean_of_last(rows: list[dict], key: str, n: int = 10) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None][-n:]
    return sum(values) / len(values) if values else None


def _readings(root: Path, cfg, questions) -> dict[str, PolicyReading]:
    """The SFT model (PPO's reference and starting point) and each PPO policy, read on the same questions."""
    r = cfg.ppo.rollout
    sampling = SamplingSettings(r.max_new_tokens, r.temperature, 1.0)
    read = lambda policy: read_policy(str(policy), str(root / "sft" / "model"), str(root / "reward" / "model"),  # noqa: E731
                                      questions, samples=SAMPLES, sampling=sampling, engine=r.engine, seed=cfg.seed)
    out = {"SFT model (before PPO)": read(root / "sft" / "model"), "PPO, KL penalty on": read(root / "ppo" / "model")}
    if (root / "ppo-no-kl" / "model").is_dir():
        out["PPO, KL penalty off"] = read(root / "ppo-no-kl" / "model")
    return out


def _figures(root: Path) -> list[str]:
    """training.png (each supervised stage's held-out curve) and ppo.png (proxy vs gold vs KL, KL on/off)."""
    if importlib.util.find_spec("matplotlib") is None:
        return ["(figures skipped: matplotlib is not installed; `pip install matplotlib` and re-run to draw them)"]
    rows = {name: read_metrics(root / name / "metrics.jsonl") for name in ("pretrain", "sft", "reward", "ppo")}
    plot_panels(root / "training.png", [
        ("held-out perplexity", {"pretrain": series(rows["pretrain"], "eval_ppl")}),
        ("held-out answer loss", {"SFT": series(rows["sft"], "eval_loss")}),
        ("held-out pairwise accuracy", {"reward": series(rows["reward"], "eval_accuracy")})],
        "Pretraining, SFT and reward model on held-out data")
    runs = {"KL penalty on": rows["ppo"]}
    if (root / "ppo-no-kl" / "metrics.jsonl").is_file():
        runs["KL penalty off"] = read_metrics(root / "ppo-no-kl" / "metrics.jsonl")
    panels = [(label, {run: series(r, key, SMOOTH) for run, r in runs.items()})
              for label, key in (("reward-model score", "reward"), ("gold reward", "gold_reward"),
                                 ("KL to reference (nats/answer)", "kl"))]
    plot_panels(root / "ppo.png", panels, f"PPO rollouts (trailing mean of {SMOOTH} steps)")
    return ["![training curves](training.png)", "", "![PPO curves](ppo.png)"]


def write_report(root: Path, cfg) -> str:
    pre, sft, rm = (root / n for n in ("pretrain", "sft", "reward"))
    pm, sm, rmm = _record(pre)["metrics"], _record(sft)["metrics"], _record(rm)["metrics"]
    cm = _record(root / "curate")["data"]
    questions = synthetic.rl_prompts(N_QUESTIONS, seed=cfg.seed + 104729)
    acc_before, acc_after = answer_accuracy(pre / "model", questions), answer_accuracy(sft / "model", questions)
    rm_gold, annotator_gold = gold_agreement(rm, N_QUESTIONS, cfg.seed)
    alpha = _record(rm)["annotators"]["krippendorff_alpha"]
    readings = _readings(root, cfg, questions)
    before, after = readings["SFT model (before PPO)"], readings["PPO, KL penalty on"]
    p, rollout_cfg = cfg.ppo.ppo, cfg.ppo.rollout
    lines = ["# Pipeline report", "", f"Pipeline directory `{root}`; every stage's lineage is in its `record.json`.",
             "", "| stage | measure | before → after |", "|---|---|---|",
             f"| curate | documents (words) | {cm['documents_in']:,} ({cm['words_in']:,}) → {cm['documents_out']:,} "
             f"({cm['words_out']:,}) |",
             f"| pretrain | held-out perplexity | {pm['initial_eval_ppl']:.2f} → {pm['final_eval_ppl']:.2f} |",
             f"| SFT | held-out answer loss | {sm['initial_eval_loss']:.3f} → {sm['final_eval_loss']:.3f} |",
             f"| SFT | right answers to {N_QUESTIONS} new questions (greedy) | {acc_before:.1%} → {acc_after:.1%} |",
             f"| reward | held-out pairwise accuracy vs the annotators | {rmm['initial_eval_accuracy']:.1%} → "
             f"{rmm['final_eval_accuracy']:.1%} |",
             f"| PPO | gold reward (sampled answers) | {before.gold:.3f} → {after.gold:.3f} |",
             f"| PPO | reward-model score | {before.reward_model:.3f} → {after.reward_model:.3f} |",
             f"| PPO | KL to the SFT model (nats per answer) | {before.kl:.3f} → {after.kl:.3f} |", "",
             "## Curation", "",
             "Documents removed, by the first rule (in order) that removed them: "
             + ", ".join(f"{rule} {n}" for rule, n in cm["removed_by_rule"].items())
             + ". Reasons and samples: [curate/CURATION.md](curate/CURATION.md).", "",
             "## Reward model and the gold rubric", "",
             f"On fresh built-in rankings, the reward model orders {rm_gold:.1%} of the gold-ordered answer pairs "
             f"as the rubric does; the simulated annotators it learned from order {annotator_gold:.1%} of them so "
             f"(their Krippendorff's alpha with each other: {alpha if alpha is None else round(alpha, 3)}).", "",
             "## PPO, with and without the KL penalty", "",
             f"{SAMPLES} answers to each of the same {N_QUESTIONS} new questions per model, sampled at temperature "
             f"{rollout_cfg.temperature} as in training. Gold reward: 1.5 right / 0.5 wrong, +0.3 polite, -0.3 rude, "
             "-0.1 padded, 0 for text that is no answer. KL: mean over answers of log pi - log ref.", "",
             "| model | gold reward | reward-model score | KL | right | polite | rude | padded | not an answer |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r.gold:.3f} | {r.reward_model:.3f} | {r.kl:.2f} | {r.right:.0%} | {r.polite:.0%} | "
              f"{r.rude:.0%} | {r.padded:.0%} | {r.malformed:.0%} |" for name, r in readings.items()]
    ppo_rows = _metrics(root / "ppo")
    if p.kl_target is not None:
        lines += ["", f"Adaptive KL controller: target {p.kl_target} nats per answer; over the last 10 PPO steps the "
                  f"rollouts' KL averaged {_mean_of_last(ppo_rows, 'kl'):.2f} with coefficient "
                  f"{_mean_of_last(ppo_rows, 'kl_coef'):.3f}."]
    lines += ["", "## Curves", ""] + _figures(root)
    text = "\n".join(lines) + "\n"
    (root / "REPORT.md").write_text(text)
    return text
