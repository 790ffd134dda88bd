"""Side-by-side comparisons: each contender in its own process, on the same initial weights, data, shapes,
precision and step count; steady-state tokens/s, peak memory and the quality reached, written as a table.

    python -m benchmarks pretrain [--data FILE] [--steps N] [--repeats N] ...

Comparisons written so far: `pretrain` (llmstack's pretraining stage vs a plain `transformers.Trainer`
causal-LM run). Results go to benchmarks/results/<comparison>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=["pretrain"])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a text file (default: tinyshakespeare)")
    parser.add_argument("--preset", default="llama-25m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the tokens/s median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contenders", default="llmstack,hf-trainer")
    parser.add_argument("--work", default="runs/benchmarks")
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args(argv)


def prepare(args, work: Path) -> None:
    """Once for all contenders: the tokenizer and the initial weights, saved where each process loads them."""
    from llmstack.data import sources, text
    from llmstack.models.causal_lm import build_from_preset, save_model

    if (work / "init" / "config.json").is_file():
        return
    tokenizer = text.train_tokenizer(sources.iter_documents(args.data), args.vocab)
    save_model(build_from_preset(args.preset, tokenizer, args.seq, seed=0), tokenizer, work / "init")


def run_contender(name: str, args, work: Path, repeat: int) -> dict:
    out = work / f"{name}-{repeat}"
    cmd = [sys.executable, "-m", "benchmarks.contenders", name, str(work / "init"), args.data, str(out),
           str(args.seq), str(args.batch), str(args.steps), str(args.warmup)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"contender {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), transformers {transformers.__version__}, Python {platform.python_version()}")


def write_table(args, results: dict[str, list[dict]], path: Path, command: str) -> str:
    base = statistics.median(r["tokens_per_s"] for r in results[next(iter(results))])
    lines = [f"# {args.comparison}: side by side", "", f"Machine: {machine()}", "", f"Command: `{command}`",
             f"({time.strftime('%Y-%m-%d')})", "",
             f"Work: preset {args.preset}, vocabulary {args.vocab}, {args.batch} x {args.seq} tokens per step, "
             f"{args.steps} steps (tokens/s is the median over steps after the first {args.warmup}), fp32, "
             f"{args.repeats} repeats each, every contender in its own process from the same initial weights "
             "and the same packed blocks. Peak memory: the process's resident-set high-water mark. Quality: "
             "mean next-token loss on the same held-out blocks after training.", "",
             f"| contender | tokens/s (median, min-max) | speed vs {next(iter(results))} | peak RSS (MiB) | "
             "first loss | held-out loss |",
             "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        speed = [r["tokens_per_s"] for r in runs]
        med = statistics.median(speed)
        lines.append(f"| {name} | {med:,.0f} ({min(speed):,.0f}-{max(speed):,.0f}) | {med / base:.2f}x | "
                     f"{statistics.median(r['peak_rss_mib'] for r in runs):,.0f} | "
                     f"{statistics.median(r['first_loss'] for r in runs):.4f} | "
                     f"{statistics.median(r['held_out_loss'] for r in runs):.4f} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv=None) -> None:
    args = _args(argv)
    work = Path(args.work) / args.comparison
    work.mkdir(parents=True, exist_ok=True)
    prepare(args, work)
    names = args.contenders.split(",")
    results = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:  # interleaved, so drift in the machine's speed hits every contender alike
            results[name].append(run_contender(name, args, work, repeat))
            print(f"[bench] {name} repeat {repeat}: {results[name][-1]}", file=sys.stderr)
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_table(args, results, Path(args.out) / f"{args.comparison}.md", command))
