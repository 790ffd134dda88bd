"""PPO in bf16 against PPO in fp32 on the built-in task: does the cheaper precision reach the same policy?

    python -m benchmarks.rl_precision [--pipeline runs/pipeline] [--seeds 0 1 2] [--route ppo]

Starts from a finished main job (`make run`: its SFT and reward models) and trains the pipeline's PPO route
(configs/tiny/pipeline.yaml, unchanged but for `train.precision` and the seed) once per seed in each
precision, interleaved, each in its own process. Every trained policy is then read the way REPORT.md reads the
routes (llmstack.evaluation.report): the same fresh questions, the same samples per question, in fp32, so the
two precisions differ only by the training. Also recorded per run: the noise floor logged at step 1 (KL between
the identical policy and reference, and the gap between rollout-time and update-time log-probabilities), the
KL the controller saw over the last steps, wall time and peak memory. Writes
`benchmarks/results/rl-precision.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAST = 20  # steps averaged for the training-time KL and reward


def _run_one(spec: dict) -> None:
    """Child process: one PPO run, then its reading; prints one JSON line."""
    import torch

    from llmstack.config import PipelineConfig, load_config
    from llmstack.data import synthetic
    from llmstack.evaluation import report
    from llmstack.evaluation.policy import read_policy
    from llmstack.pipeline import _wired, route_config
    from llmstack.rl.rollout import SamplingSettings
    from llmstack.tracking.record import peak_memory
    from llmstack.trainers.ppo import ppo

    torch.set_num_threads(spec["threads"])
    cfg = load_config(PipelineConfig, spec["config"])
    root = Path(spec["pipeline"])
    _, stage_cfg = route_config(cfg, spec["route"])
    r = stage_cfg.rollout
    questions = synthetic.rl_prompts(report.N_QUESTIONS, seed=cfg.seed + 104729)
    read = lambda policy: dataclasses.asdict(read_policy(  # noqa: E731
        str(policy), str(root / "sft" / "model"), str(root / "reward" / "model"), questions, samples=report.SAMPLES,
        sampling=SamplingSettings(r.max_new_tokens, r.temperature, 1.0), engine="hf", seed=cfg.seed))
    if spec["precision"] is None:  # the starting point, read the same way
        print(json.dumps({"reading": read(root / "sft" / "model")}))
        return
    run_cfg = _wired(stage_cfg, root, spec["route"], spec["seed"])
    run_cfg = dataclasses.replace(run_cfg, output_dir=spec["out"], overwrite_output_dir=True,
                                  train=dataclasses.replace(run_cfg.train, precision=spec["precision"]))
    start = time.perf_counter()
    ppo(run_cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in Path(spec["out"], "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "kl" in r]
    last = rows[-LAST:]
    reading = read(Path(spec["out"]) / "model")
    record = json.loads(Path(spec["out"], "record.json").read_text())
    print(json.dumps({
        "precision": spec["precision"], "seed": spec["seed"], "wall_s": wall,
        "peak_rss_mib": peak_memory()["peak_rss_mib"],
        "kl_identical": rows[0].get("health/kl_identical"), "logprob_gap": rows[0].get("health/logprob_gap"),
        "train_kl": statistics.fmean(x["kl"] for x in last),
        "train_gold": statistics.fmean(x["gold_reward"] for x in last if "gold_reward" in x),
        "weights": record["precision"]["weights"], "compute": record["precision"]["compute"],
        "reading": reading}))


def _table(results: list[dict], args, sft_reading: dict | None) -> str:
    from llmstack.tracking.record import cpu_model

    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    lines = [f"# PPO in bf16 against fp32 on the built-in task ({args.route} route)", "",
             f"Machine: {machine}. Command: `python -m benchmarks.rl_precision --seeds "
             f"{' '.join(map(str, args.seeds))} --route {args.route}` ({time.strftime('%Y-%m-%d')}), from the SFT and "
             "reward models of a finished `make run`.", "",
             "Each run is the pipeline's route with `train.precision` set; the policy is then read like REPORT.md "
             "reads the routes: the same fresh questions and samples for every run, scored in fp32 (gold reward, "
             "KL to the SFT model per answer). 'step-1 KL' and 'step-1 gap' are the noise floor logged before any "
             f"update (KL between identical policy and reference; rollout vs update log-probabilities); 'train KL' "
             f"is the mean KL the controller saw over the last {LAST} steps.", "",
             "| precision | seed | gold reward | KL (read) | right | not an answer | step-1 KL | step-1 gap | train KL "
             "| wall (s) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    if sft_reading:
        lines.append(f"| SFT model (start) | - | {sft_reading['gold']:.3f} | 0 | {sft_reading['right']:.0%} | "
                     f"{sft_reading['malformed']:.0%} | - | - | - | - | - |")
    for r in sorted(results, key=lambda r: (r["precision"] != "fp32", r["seed"])):
        x = r["reading"]
        lines.append(f"| {r['precision']} | {r['seed']} | {x['gold']:.3f} | {x['kl']:.2f} | {x['right']:.0%} | "
                     f"{x['malformed']:.0%} | {r['kl_identical']:.3g} | {r['logprob_gap']:.3g} | {r['train_kl']:.2f} | "
                     f"{r['wall_s']:.0f} | {r['peak_rss_mib']:,.0f} |")
    lines += ["", "| precision | gold reward, mean ± sd over seeds | KL (read), mean ± sd | wall (s), mean |",
              "|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        group = [r for r in results if r["precision"] == precision]
        if not group:
            continue
        gold = [r["reading"]["gold"] for r in group]
        kl = [r["reading"]["kl"] for r in group]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
        lines.append(f"| {precision} | {statistics.fmean(gold):.3f} ± {sd(gold):.3f} | "
                     f"{statistics.fmean(kl):.2f} ± {sd(kl):.2f} | {statistics.fmean(r['wall_s'] for r in group):.0f} |")
    weights = {r["precision"]: r["weights"] for r in results}
    lines += ["", "Weights as loaded (record.json): " + "; ".join(f"{p}: {w}" for p, w in weights.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="runs/pipeline", help="a finished main job's directory")
    parser.add_argument("--config", default=str(ROOT / "configs/tiny/pipeline.yaml"))
    parser.add_argument("--route", default="ppo", choices=["ppo", "grpo", "grpo-gold"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/benchmarks/rl-precision")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/rl-precision.md"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        _run_one(json.loads(args.one))
        return 0
    root = Path(args.pipeline)
    for needed in ("sft/model", "reward/model"):
        if not (root / needed / "config.json").is_file():
            print(f"{root / needed}: missing; run the main job first (make run), or point --pipeline at a finished "
                  "pipeline directory", file=sys.stderr)
            return 2
    def child(precision: str | None, seed: int) -> dict:
        spec = {"precision": precision, "seed": seed, "route": args.route, "config": args.config,
                "pipeline": str(root.resolve()), "threads": args.threads,
                "out": str((Path(args.work) / f"{args.route}-{precision}-seed{seed}").resolve())}
        print(f"rl_precision: {args.route} {precision or 'SFT reading'} seed {seed} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.rl_precision", "--one", json.dumps(spec)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"rl_precision: the {precision} seed {seed} run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    sft = child(None, args.seeds[0])["reading"]
    results = []
    for seed in args.seeds:
        for precision in ("fp32", "bf16"):
            results.append(child(precision, seed))
            r = results[-1]
            print(f"  gold {r['reading']['gold']:.3f}  KL {r['reading']['kl']:.2f}  wall {r['wall_s']:.0f}s", flush=True)
    text = _table(results, args, sft)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
