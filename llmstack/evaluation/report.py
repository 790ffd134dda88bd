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


ROUTE_LABELS = {"ppo": "PPO on the reward model, KL penalty on", "ppo-no-kl": "PPO on the reward model, KL penalty off",
                "grpo": "GRPO on the reward model", "grpo-gold": "GRPO on the gold rubric",
                "dpo": "DPO on the annotators' rankings"}
RL_ROUTES = ("ppo", "ppo-no-kl", "grpo", "grpo-gold")


def _routes(root: Path, cfg) -> list[str]:
    return [route for route in cfg.routes if (root / route / "model").is_dir()]


def _readings(root: Path, cfg, questions) -> dict[str, PolicyReading]:
    """The SFT model (every route's reference and starting point) and each route's policy, read on the same
    questions with the same sampling."""
    r = cfg.ppo.rollout
    sampling = SamplingSettings(r.max_new_tokens, r.temperature, 1.0)
    read = lambda policy: read_policy(str(policy), str(root / "sft" / "model"), str(root / "reward" / "model"),  # noqa: E731
                                      questions, samples=SAMPLES, sampling=sampling, engine=r.engine, seed=cfg.seed)
    return {"sft": read(root / "sft" / "model"), **{route: read(root / route / "model") for route in _routes(root, cfg)}}


def _figures(root: Path, cfg, readings: dict[str, PolicyReading]) -> list[str]:
    """training.png (each supervised stage's held-out curve), rl.png (reward, gold and KL of every RL route
    over its steps) and routes.png (each route's policy: gold reward against KL, from the readings)."""
    if importlib.util.find_spec("matplotlib") is None:
        return ["(figures skipped: matplotlib is not installed; `pip install matplotlib` and re-run to draw them)"]
    rows = {name: read_metrics(root / name / "metrics.jsonl") for name in _stages(cfg)}
    panels = [("held-out answer loss", {"SFT": series(rows["sft"], "eval_loss")}),
              ("held-out pairwise accuracy", {"reward": series(rows["reward"], "eval_accuracy")})]
    if "pretrain" in rows:
        panels.insert(0, ("held-out perplexity", {"pretrain": series(rows["pretrain"], "eval_ppl")}))
    plot_panels(root / "training.png", panels, "Training stages on held-out data")
    runs = {route: read_metrics(root / route / "metrics.jsonl") for route in _routes(root, cfg) if route in RL_ROUTES}
    panels = [(label, {route: series(r, key, SMOOTH) for route, r in runs.items()})
              for label, key in (("reward (the route's own)", "reward"), ("gold reward", "gold_reward"),
                                 ("KL to reference (nats/answer)", "kl"))]
    plot_panels(root / "rl.png", panels, f"RL rollouts (trailing mean of {SMOOTH} steps)")
    points = {name: ([r.kl], [r.gold]) for name, r in readings.items()}
    plot_panels(root / "routes.png", [("gold reward", points)], "Each route's policy: gold reward against KL to "
                "the SFT model", xlabel="KL (nats per answer)", markers=True)
    return ["![training curves](training.png)", "", "![RL curves](rl.png)", "", "![routes](routes.png)"]


def _route_lines(root: Path, cfg, readings: dict[str, PolicyReading]) -> list[str]:
    rollout_cfg = cfg.ppo.rollout
    lines = ["## Routes from the SFT model", "",
             f"{SAMPLES} answers to each of the same {N_QUESTIONS} new questions per model, sampled at temperature "
             f"{rollout_cfg.temperature} as in training. Gold reward: 1.5 right / 0.5 wrong, +0.3 polite, -0.3 rude, "
             "-0.1 padded, 0 for text that is no answer. KL: mean over answers of log pi - log ref, ref the SFT "
             "model. Wall time: the route's training.", "",
             "| model | gold reward | reward-model score | KL | right | polite | rude | padded | not an answer "
             "| wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in readings.items():
        label = "SFT model (the start of every route)" if name == "sft" else ROUTE_LABELS[name]
        wall = "-" if name == "sft" else f"{_record(root / name)['wall_time_s']:.0f} s"
        lines.append(f"| {label} | {r.gold:.3f} | {r.reward_model:.3f} | {r.kl:.2f} | {r.right:.0%} | "
                     f"{r.polite:.0%} | {r.rude:.0%} | {r.padded:.0%} | {r.malformed:.0%} | {wall} |")
    for route in ("ppo", "grpo"):
        settings = getattr(cfg, route).ppo
        if route in readings and settings.kl_target is not None:
            rows = _metrics(root / route)
            lines += ["", f"{ROUTE_LABELS[route]}: adaptive KL controller, target {settings.kl_target} nats per "
                      f"answer; over the last 10 steps the rollouts' KL averaged {_mean_of_last(rows, 'kl'):.2f} "
                      f"with coefficient {_mean_of_last(rows, 'kl_coef'):.3f}."]
    return lines


def _cost_lines(root: Path, cfg) -> list[str]:
    """Each training run's steps, wall time (evaluations and checkpoints included) and memory high-water mark:
    tensors on the device on CUDA, the process's resident memory on CPU."""
    lines = ["", "## Cost", "", "Wall time includes evaluations and checkpoints. Peak memory: the most tensor memory "
             "on the device (CUDA), or the process's resident memory (CPU).", "",
             "| run | steps | wall time | seconds per step | peak memory (MiB) |", "|---|---|---|---|---|"]
    for name in (*_stages(cfg), *_routes(root, cfg)):
        record = _record(root / name)
        steps, wall = record["metrics"].get("steps"), record["wall_time_s"]
        compute = record.get("compute", {})
        peak = compute.get("peak_cuda_allocated_mib", compute.get("peak_rss_mib"))
        per_step = f"{wall / steps:.2f}" if steps else "-"
        lines.append(f"| {name} | {steps or '-'} | {wall:.0f} s | {per_step} | "
                     f"{'-' if peak is None else f'{peak:,.0f}'} |")
    return lines


def _stages(cfg) -> tuple[str, ...]:
    """The training stages before the routes that this pipeline ran."""
    return ("sft", "reward") if cfg.start == "sft" else ("pretrain", "sft", "reward")


def write_report(root: Path, cfg) -> str:
    sft, rm = root / "sft", root / "reward"
    sm, rmm = _record(sft)["metrics"], _record(rm)["metrics"]
    questions = synthetic.rl_prompts(N_QUESTIONS, seed=cfg.seed + 104729)
    if cfg.start == "sft":  # the checkpoint SFT started from
        acc_before = answer_accuracy(cfg.sft.model.name_or_path, questions, gguf_file=cfg.sft.model.gguf_file)
    else:
        acc_before = answer_accuracy(root / "pretrain" / "model", questions)
    acc_after = answer_accuracy(sft / "model", questions)
    rm_gold, annotator_gold = gold_agreement(rm, N_QUESTIONS, cfg.seed)
    alpha = _record(rm)["annotators"]["krippendorff_alpha"]
    readings = _readings(root, cfg, questions)
    lines = ["# Pipeline report", "", "Each stage's folder holds its `record.json` and model card; "
             "`llmstack report <folder>` draws its lineage with the chain's time and energy.",
             "", "| stage | measure | before → after |", "|---|---|---|"]
    if cfg.start == "curate":
        cm, pm = _record(root / "curate")["data"], _record(root / "pretrain")["metrics"]
        lines += [f"| curate | documents (words) | {cm['documents_in']:,} ({cm['words_in']:,}) → "
                  f"{cm['documents_out']:,} ({cm['words_out']:,}) |",
                  f"| pretrain | held-out perplexity | {pm['initial_eval_ppl']:.2f} → {pm['final_eval_ppl']:.2f} |"]
    else:
        lines += [f"| start | the pretrained checkpoint | {cfg.sft.model.name_or_path} |"]
    lines += [f"| SFT | held-out answer loss | {sm['initial_eval_loss']:.3f} → {sm['final_eval_loss']:.3f} |",
             f"| SFT | right answers to {N_QUESTIONS} new questions (greedy) | {acc_before:.1%} → {acc_after:.1%} |",
             f"| reward | held-out pairwise accuracy vs the annotators | {rmm['initial_eval_accuracy']:.1%} → "
             f"{rmm['final_eval_accuracy']:.1%} |"]
    before = readings["sft"]
    lines += [f"| {ROUTE_LABELS[route]} | gold reward / KL to the SFT model | {before.gold:.3f} → {r.gold:.3f} / "
              f"{r.kl:.2f} |" for route, r in readings.items() if route != "sft"]
    if cfg.start == "curate":
        lines += ["", "## Curation", "",
                  "Documents removed, by the first rule (in order) that removed them: "
                  + ", ".join(f"{rule} {n}" for rule, n in cm["removed_by_rule"].items())
                  + ". Reasons and samples: [curate/CURATION.md](curate/CURATION.md)."]
    lines += ["", "## Reward model and the gold rubric", "",
              f"On fresh built-in rankings, the reward model orders {rm_gold:.1%} of the gold-ordered answer pairs "
              f"as the rubric does; the simulated annotators it learned from order {annotator_gold:.1%} of them so "
              f"(their Krippendorff's alpha with each other: {alpha if alpha is None else round(alpha, 3)}).", ""]
    lines += _route_lines(root, cfg, readings)
    lines += _cost_lines(root, cfg)
    lines += ["", "## Curves", ""] + _figures(root, cfg, readings)
    text = "\n".join(lines) + "\n"
    (root / "REPORT.md").write_text(text)
    return text
