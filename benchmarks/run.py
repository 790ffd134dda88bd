"""Side-by-side comparisons: each contender in its own process, on the same initial weights, data, shapes,
precision and step count; steady-state throughput, peak memory and the quality reached, written as a table.

    python -m benchmarks pretrain [--data FILE] [--steps N] [--repeats N] ...
    python -m benchmarks sft [--data FILE] ...
    python -m benchmarks reward [--data FILE] ...
    python -m benchmarks dpo [--data FILE] ...
    python -m benchmarks grpo [--data FILE] --seq NEW_TOKENS --batch PROMPTS ...
    python -m benchmarks precision [--data FILE] ...

Comparisons: `pretrain` (llmstack's pretraining stage vs a plain `transformers.Trainer` causal-LM run), `sft`
(llmstack's SFT stage vs TRL's `SFTTrainer`, packing off and on), `reward` (llmstack's reward stage vs TRL's
`RewardTrainer`), `dpo` (llmstack's DPO stage vs TRL's `DPOTrainer`), `grpo` (llmstack's GRPO vs TRL's `GRPOTrainer`),
all in `--precision` (fp32, or bf16 on both sides); `precision` (every llmstack stage in fp32 and in bf16). Results
go to benchmarks/results/<comparison>.md (<comparison>-bf16.md for `--precision bf16`; `precision` also draws the
loss curves in precision.png).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[1] / "shared" / "data"


@dataclass
class Column:
    """One table column: the median over repeats of result `key`, with its min-max spread (`spread`), as a
    ratio to the base contender's median (`relative`) or as its relative difference from it (`difference`);
    `{base}` in the header names the base. A result without `key` leaves its cell empty."""

    header: str
    key: str
    fmt: str
    spread: bool = False
    relative: bool = False
    difference: bool = False


@dataclass
class Comparison:
    """`module` runs one contender (python -m MODULE NAME INIT DATA OUT SEQ BATCH STEPS WARMUP PRECISION) and defines
    `prepare(args, work)`, which writes what every contender loads and returns {"data": what they read, ...facts
    for the table's description}, `DESCRIPTION`, the work paragraph of the table, and optionally `NOTES`, what
    profiles showed, written under it."""

    module: str
    contenders: str
    data: Path
    columns: list[Column]
    pairs: tuple[tuple[str, str], ...] = ()  # (llmstack's, the other's): ratios written under the table
    mfu: bool = False  # a causal LM: each contender's MFU from its tokens/s against the measured matmul peak
    real_models: bool = False  # `--model smollm2` can stand in for the fresh preset
    # each contender's base for relative columns (default: the first contender) and how headers name it
    baseline: Callable[[str], str] | None = None
    base_label: str | None = None
    peers: bool = True  # llmstack against another trainer, in the one precision `--precision` names

    def load(self):
        return importlib.import_module(self.module)


def _with_losses(*quality: Column) -> list[Column]:
    return [Column("peak RSS (MiB)", "peak_rss_mib", ",.0f"), Column("first loss", "first_loss", ".4f"), *quality]


def _speed(key: str) -> Column:
    return Column("speed vs {base}", key, ".2f", relative=True)


MEMORY = Column("memory vs {base}", "peak_rss_mib", ".2f", relative=True)
LOAD = Column("load (1-min average at the end)", "load", ".1f", spread=True)
HELD_OUT_LOSS = Column("held-out loss", "held_out_loss", ".4f")
MFU = Column("MFU", "mfu", ".1%")
COMPARISONS = {
    "pretrain": Comparison(
        "benchmarks.contenders", "llmstack,hf-trainer", SHARED_DATA / "gutenberg",
        [Column("tokens/s (median, min-max)", "tokens_per_s", ",.0f", spread=True),
         _speed("tokens_per_s"), MFU, *_with_losses(HELD_OUT_LOSS), LOAD], mfu=True),
    "sft": Comparison(
        "benchmarks.sft_contenders", "llmstack,trl,llmstack-packed,trl-packed",
        SHARED_DATA / "oasst_en100" / "en_100_tree.jsonl",
        [Column("real tokens/s (median, min-max)", "tokens_per_s", ",.0f", spread=True),
         _speed("tokens_per_s"), MFU, Column("real tokens/step", "tokens_per_step", ",.0f"),
         Column("padding share", "padding_share", ".0%"), MEMORY, *_with_losses(HELD_OUT_LOSS), LOAD],
        pairs=(("llmstack", "trl"), ("llmstack-packed", "trl-packed")), mfu=True),
    "reward": Comparison(
        "benchmarks.reward_contenders", "llmstack,trl", SHARED_DATA / "hh_rlhf_harmless_base" / "test.jsonl.gz",
        [Column("pairs/s (median, min-max)", "items_per_s", ",.2f", spread=True),
         Column("scored tokens/s (median, min-max)", "tokens_per_s", ",.0f", spread=True),
         _speed("items_per_s"), Column("positions run / step", "positions_per_step", ",.0f"),
         MEMORY, *_with_losses(HELD_OUT_LOSS, Column("held-out accuracy", "held_out_accuracy", ".3f")), LOAD],
        pairs=(("llmstack", "trl"),), real_models=True),
    "dpo": Comparison(
        "benchmarks.dpo_contenders", "llmstack,trl", SHARED_DATA / "hh_rlhf_harmless_base" / "test.jsonl.gz",
        [Column("pairs/s (median, min-max)", "items_per_s", ",.2f", spread=True),
         Column("scored tokens/s (median, min-max)", "tokens_per_s", ",.0f", spread=True),
         _speed("items_per_s"), Column("whole run (s)", "run_s", ",.1f", spread=True),
         MEMORY, *_with_losses(HELD_OUT_LOSS, Column("held-out reward accuracy", "held_out_accuracy", ".3f")),
         LOAD],
        pairs=(("llmstack", "trl"),)),
    "grpo": Comparison(
        "benchmarks.grpo_contenders", "llmstack,llmstack-static,trl", SHARED_DATA / "gsm8k" / "train.jsonl",
        [Column("answers/s (median, min-max)", "items_per_s", ",.2f", spread=True),
         Column("generated tokens/s (median, min-max)", "tokens_per_s", ",.0f", spread=True),
         _speed("items_per_s"), Column("generation (s / step)", "generation_s", ",.2f", spread=True),
         Column("generated tokens/step", "tokens_per_step", ",.0f"), MEMORY,
         Column("peak RSS (MiB)", "peak_rss_mib", ",.0f"), LOAD],
        pairs=(("llmstack", "trl"), ("llmstack-static", "trl"), ("llmstack-static", "llmstack"))),
    "precision": Comparison(
        "benchmarks.precision_contenders",
        "pretrain-fp32,pretrain-bf16,sft-fp32,sft-bf16,reward-fp32,reward-bf16,dpo-fp32,dpo-bf16,ppo-fp32,ppo-bf16,"
        "ppo-bf16-fp32weights", SHARED_DATA / "gutenberg",
        [Column("tokens/s (median, min-max)", "tokens_per_s", ",.0f", spread=True),
         Column("speed vs {base}", "tokens_per_s", ".2f", relative=True), Column("peak RSS (MiB)", "peak_rss_mib",
         ",.0f"), MEMORY, Column("first loss", "first_loss", ".4f"), Column("last loss", "last_loss", ".4f"),
         HELD_OUT_LOSS, Column("held-out loss vs {base}", "held_out_loss", "+.2%", difference=True), LOAD],
        pairs=(("pretrain-bf16", "pretrain-fp32"), ("sft-bf16", "sft-fp32"), ("reward-bf16", "reward-fp32"),
               ("dpo-bf16", "dpo-fp32"), ("ppo-bf16", "ppo-fp32"), ("ppo-bf16", "ppo-bf16-fp32weights")),
        baseline=lambda name: f"{name.split('-')[0]}-fp32", base_label="fp32", peers=False),
}


def _args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=list(COMPARISONS))
    parser.add_argument("--data", help="pretrain: a text file or folder (default: the gutenberg novels, enough text "
                        "for a 32k vocabulary); sft: OASST message "
                        "trees or llmstack chat JSONL (default: oasst_en100); reward: Anthropic HH pairs "
                        "(default: hh_rlhf_harmless_base)")
    parser.add_argument("--model", choices=["fresh", "smollm2"], default="fresh",
                        help="fresh: the --preset with fresh weights and a --vocab tokenizer trained on the data; "
                        "smollm2 (reward only): the pretrained SmolLM2-135M-Instruct with its own tokenizer, "
                        "written to results/<comparison>-smollm2.md")
    parser.add_argument("--preset", default="llama-25m")
    parser.add_argument("--tokenizer-text", default=str(SHARED_DATA / "gutenberg"),
                        help="sft, reward: text the tokenizer also learns from, so that it reaches --vocab "
                        "(default: the gutenberg novels; '' for the comparison's own data alone)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (pretrain, packed SFT) or the "
                        "longest conversation or prompt + response")
    parser.add_argument("--batch", type=int, default=8, help="rows, conversations or pairs per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the throughput median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="every contender's precision: fp32 (default), or bf16 autocast over fp32 weights "
                        "(llmstack's train.precision=bf16, the Trainer's and TRL's bf16=True), written to "
                        "results/<comparison>-bf16.md; `precision` runs both itself")
    parser.add_argument("--contenders", help="comma-separated subset, in table order (default: all)")
    parser.add_argument("--work", default="runs/benchmarks")
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args(argv)


def prepare(comparison: Comparison, args, work: Path) -> dict:
    """Once for all contenders and kept for later runs with the same settings: what they load and read."""
    settings = {k: getattr(args, k) for k in ("data", "model", "preset", "vocab", "tokenizer_text", "seq")}
    done = work / "prepared.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved["settings"] == settings:
            return saved["facts"]
    facts = comparison.load().prepare(args, work)
    done.write_text(json.dumps({"settings": settings, "facts": facts}))
    return facts


def throughput_facts(work: Path, seq: int, precision: str = "fp32") -> dict:
    """The initial model's training FLOPs per token at `seq` and this machine's matmul peak in `precision`,
    measured now (not kept with the prepared files: the peak is the machine's at the time of the run)."""
    import torch

    from llmstack.models.causal_lm import load_causal_lm, matmul_params
    from llmstack.tracking.mfu import measure_gemm_flops, transformer_flops_per_token

    model = load_causal_lm(str(work / "init"))
    flops = transformer_flops_per_token(matmul_params(model), model.config.num_hidden_layers,
                                        model.config.hidden_size, seq)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    peak = measure_gemm_flops(torch.device("cpu"), dtype, seconds=2.0)
    return {"flops_per_token": flops, "peak_gflops": peak / 1e9, "threads": torch.get_num_threads()}


def run_contender(comparison: Comparison, name: str, args, work: Path, data: str, repeat: int) -> dict:
    out = work / f"{name}-{repeat}"
    # llmstack reports a finished run directory instead of training again, so every run starts from none
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", comparison.module, name, str(work / "init"), data, str(out),
           str(args.seq), str(args.batch), str(args.steps), str(args.warmup), args.precision or "fp32"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"contender {name} failed:\n{proc.stderr[-3000:]}")
    # the saved model and checkpoints have given their numbers; kept, every contender and repeat adds its own
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        import trl

        others = f", trl {trl.__version__}"
    except ImportError:
        others = ""
    return (f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), transformers {transformers.__version__}{others}, Python {platform.python_version()}")


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _cell(column: Column, runs: list[dict], base: list[dict]) -> str:
    if not all(column.key in r for r in runs + base):
        return ""
    if column.relative:
        return f"{_median(runs, column.key) / _median(base, column.key):{column.fmt}}x"
    if column.difference:
        return f"{_median(runs, column.key) / _median(base, column.key) - 1:{column.fmt}}"
    values = [r[column.key] for r in runs]
    cell = f"{statistics.median(values):{column.fmt}}"
    return f"{cell} ({min(values):{column.fmt}}-{max(values):{column.fmt}})" if column.spread else cell


def _ratios(comparison: Comparison, results: dict[str, list[dict]]) -> list[str]:
    speed = next(c.key for c in comparison.columns if c.header.startswith("speed"))
    ratio = lambda ours, theirs, key: _median(results[ours], key) / _median(results[theirs], key)  # noqa: E731
    lines = [f"- {ours} / {theirs}: speed {ratio(ours, theirs, speed):.2f}x, peak memory "
             f"{ratio(ours, theirs, 'peak_rss_mib'):.2f}x" for ours, theirs in comparison.pairs
             if ours in results and theirs in results]
    return [""] + lines if lines else []


def write_table(args, comparison: Comparison, results: dict[str, list[dict]], facts: dict, path: Path,
                command: str) -> str:
    first = next(iter(results))
    base = comparison.baseline or (lambda name: first)
    headers = [c.header.format(base=comparison.base_label or first) for c in comparison.columns]
    description = comparison.load().DESCRIPTION.format(
        **{**vars(args), "precision": getattr(args, "precision", None) or "fp32", **facts})
    lines = [f"# {args.comparison}: side by side", "", f"Machine: {machine()}", "", f"Command: `{command}`",
             f"({time.strftime('%Y-%m-%d')})", "", description, "",
             "| contender | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(c, runs, results[base(name)]) for c in comparison.columns) + " |")
    notes = getattr(comparison.load(), "NOTES", "")
    text = "\n".join(lines + _ratios(comparison, results) + (["", notes.strip()] if notes else [])) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv=None) -> None:
    args = _args(argv)
    comparison = COMPARISONS[args.comparison]
    args.data = args.data or str(comparison.data)
    if not Path(args.data).exists():
        raise SystemExit(f"python -m benchmarks {args.comparison}: data file not found: {args.data} "
                         "(pass --data FILE; see benchmarks/README.md)")
    own_text = args.comparison in ("pretrain", "precision")  # their tokenizer learns from --data
    if not own_text and args.tokenizer_text and not Path(args.tokenizer_text).exists():
        raise SystemExit(f"python -m benchmarks {args.comparison}: tokenizer text not found: {args.tokenizer_text} "
                         "(pass --tokenizer-text PATH, or '' to train the tokenizer on the data alone)")
    if args.model != "fresh" and not comparison.real_models:
        raise SystemExit(f"python -m benchmarks {args.comparison}: --model {args.model} is for "
                         f"{', '.join(n for n, c in COMPARISONS.items() if c.real_models)} only")
    if args.precision and not comparison.peers:
        raise SystemExit(f"python -m benchmarks {args.comparison}: --precision is for the comparisons with other "
                         "trainers; this one runs fp32 and bf16 itself")
    table = args.comparison if args.model == "fresh" else f"{args.comparison}-{args.model}"
    work = Path(args.work) / table
    if args.precision == "bf16":
        table += "-bf16"  # the fp32 table stays
    work.mkdir(parents=True, exist_ok=True)
    facts = prepare(comparison, args, work)
    if comparison.mfu:
        facts.update(throughput_facts(work, args.seq, args.precision or "fp32"))
    names = (args.contenders or comparison.contenders).split(",")
    results = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:  # interleaved, so drift in the machine's speed hits every contender alike
            result = run_contender(comparison, name, args, work, facts["data"], repeat)
            if comparison.mfu:
                result["mfu"] = result["tokens_per_s"] * facts["flops_per_token"] / (facts["peak_gflops"] * 1e9)
            results[name].append(result)
            print(f"[bench] {name} repeat {repeat}: {results[name][-1]}", file=sys.stderr)
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(write_table(args, comparison, results, facts, Path(args.out) / f"{table}.md", command))
    if hasattr(comparison.load(), "plot"):
        comparison.load().plot(results, Path(args.out) / f"{table}.png")
