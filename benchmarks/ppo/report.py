"""The results file: for every model, a speed table (median over repeats of each run's median over its
measured steps, with the spread over repeats) and the behaviour step by step."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

PHASES = ("step_s", "step_cpu_s", "generation_s", "scoring_s", "update_s")


@dataclass
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))

    def show(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def run_summary(run: dict, warmup: int) -> dict[str, float]:
    """One run: the median of each phase over the steps after `warmup`, generation time per generated token
    (ms), and reward and KL averaged over every step."""
    if len(run["step_s"]) <= warmup:
        raise ValueError(f"{len(run['step_s'])} timed steps leave none after a warm-up of {warmup}; run more steps")
    out = {phase: statistics.median(run[phase][warmup:]) for phase in PHASES}
    out["ms_per_token"] = statistics.median(1000 * g / n for g, n in zip(run["generation_s"][warmup:],
                                                                         run["generated_tokens"][warmup:]))
    out["response_length"] = statistics.mean(run["response_length"])
    out["reward"], out["kl"] = statistics.mean(run["reward"]), statistics.mean(run["kl"])
    out["peak_rss_mib"] = run["peak_rss_mib"]
    out["load"] = run["load"]
    return out


def contender_summary(runs: list[dict], warmup: int) -> dict[str, Spread]:
    """Every number of `run_summary` as its median and range over the repeats."""
    summaries = [run_summary(run, warmup) for run in runs]
    return {key: Spread.of([s[key] for s in summaries]) for key in summaries[0]}


def speed_table(results: dict[str, list[dict]], warmup: int, baseline: str) -> list[str]:
    summary = {name: contender_summary(runs, warmup) for name, runs in results.items()}
    base = summary.get(baseline)
    lines = [f"| contender | step (s) | vs {baseline} | step CPU (s) | generation (s) | scoring (s) | update (s) | "
             "generation (ms / token) | peak RSS (MiB) | response tokens | reward | KL | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        ratio = f"{s['step_s'].median / base['step_s'].median:.2f}x" if base else "-"
        lines.append(f"| {name} | {s['step_s'].show()} | {ratio} | {s['step_cpu_s'].show()} | "
                     f"{s['generation_s'].show()} | {s['scoring_s'].show()} | {s['update_s'].show()} | "
                     f"{s['ms_per_token'].show(1)} | "
                     f"{s['peak_rss_mib'].median:,.0f} | {s['response_length'].median:.1f} | "
                     f"{s['reward'].median:.4f} | {s['kl'].median:.4f} | {s['load'].show(1)} |")
    return lines


def behaviour_table(results: dict[str, list[dict]]) -> list[str]:
    """Mean reward-model score and KL per step, each the median over repeats."""
    names = list(results)
    steps = min(len(run["reward"]) for runs in results.values() for run in runs)
    lines = ["| step | " + " | ".join(f"{n} reward" for n in names) + " | " + " | ".join(f"{n} KL" for n in names)
             + " |", "|---" * (1 + 2 * len(names)) + "|"]
    for i in range(steps):
        cells = [statistics.median(run[key][i] for run in results[n]) for key in ("reward", "kl") for n in names]
        lines.append(f"| {i + 1} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return lines


def target_line(results: dict[str, list[dict]], warmup: int, contender: str, baseline: str,
                target: float) -> str:
    if contender not in results or baseline not in results:
        return ""
    ours = contender_summary(results[contender], warmup)["step_s"].median
    theirs = contender_summary(results[baseline], warmup)["step_s"].median
    verdict = "met" if ours / theirs <= target else "missed"
    return (f"Step time {contender} / {baseline}: {ours:.2f} s / {theirs:.2f} s = {ours / theirs:.2f} "
            f"(target <= {target}: {verdict}).")
