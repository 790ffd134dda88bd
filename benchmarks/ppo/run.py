"""llmstack's PPO stage against TRL 1.12's PPO trainer, side by side, on the same work.

    python -m benchmarks.ppo [--models tiny,smollm2] [--steps N] [--repeats N] ...

Each contender runs in its own process (TRL in its own virtual environment, made on first use: see
venv.py), `--repeats` times, interleaved, from the same policy, reference, value and reward weights, on the
same prompts in the same order, with the same rollout sizes and hyper-parameters (spec.py), in fp32.
llmstack runs once per rollout engine asked for (`llmstack`: the default, `auto`; `llmstack-hf`,
`llmstack-static`), so the step time of each engine stands beside the others and TRL's.
Models: `tiny` (an llmstack preset with fresh weights and a tokenizer trained on real text) and `smollm2`
(the pretrained SmolLM2-135M-Instruct). Results go to benchmarks/results/ppo.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import smollm2
from benchmarks.ppo import prepare
from benchmarks.ppo.report import behaviour_table, speed_table, target_line
from benchmarks.ppo.spec import Work
from benchmarks.ppo.venv import TRL_VERSION, ensure_trl_venv, trl_environment
from benchmarks.run import SHARED_DATA, machine

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = SHARED_DATA / "gutenberg"  # three novels: enough text for a full 32k-token vocabulary
DEFAULT_PROMPTS = SHARED_DATA / "oasst_en100" / "prompt_lottery_en_250_text.jsonl"
LLMSTACK, TRL = "llmstack", "trl-1.12"
# llmstack contenders by the rollout engine they generate with: `llmstack` is what a run gets by default
ENGINES = {LLMSTACK: "auto", "llmstack-hf": "hf", "llmstack-static": "static"}
TARGET = 0.5  # llmstack's step time as a fraction of TRL's
LOAD_EVERY_S = 2
MAX_POSITIONS = 256  # of the tiny model: room for a prompt plus a response at every size used here

NOTES = """\
## What differs by design (not aligned)

- Old log-probabilities: TRL takes them from the scores `generate` returns (the policy's logits during
  sampling, [B, R, V] kept in memory); llmstack recomputes them with one more no-grad forward pass of the
  policy over prompt + response. TRL's scoring therefore runs three forward passes (reference, value,
  reward), llmstack's four (policy, reference, value, reward).
- Logits: TRL's forward passes compute the vocabulary projection at every position, prompt included, and
  the update's entropy from the full [B, T, V] logits; llmstack (`kernels: auto`, the chunked CPU path)
  projects only the response positions, in chunks, and never holds the [B, R, V] logits.
- Optimisers: TRL trains the policy and the value model with one AdamW over both (loss = policy loss +
  `vf_coef` x value loss, `vf_coef` = 0.1, its default) and the transformers default `adamw_torch_fused`;
  llmstack uses two fused `torch.optim.AdamW` (policy, value), each with its own backward, and the value loss
  unscaled. Both at the same learning rate; Adam's update barely depends on a loss's scale.
- Where the score lands: TRL adds the reward-model score one position after the response's EOS token (when
  the response ends before the length limit) and runs GAE over the padded length; llmstack adds it on the
  last real token and stops GAE there. The value loss covers one extra position in TRL.
- TRL samples at temperature + 1e-7 and divides logits by the same; llmstack uses the temperature as given.
- Sampling: llmstack draws each response from noise seeded by (run seed, step, prompt) (Gumbel-max over
  the tempered logits, so its repeats sample the same responses), TRL from torch's global generator. The
  responses differ between contenders (the models and prompts do not), so rewards and KL agree in
  distribution, not token by token.

## What is aligned

Policy, reference (a second copy of the SFT weights, frozen), value-model start and reward model: the
same saved weights, loaded by each process; dropout off on both sides. Prompts: the same token rows
(llmstack's chat template, truncated to their last tokens and left-padded to one length), in the order
llmstack's sampler deals them (TRL's loader is replaced by a sequential one over those rows, each prompt
used once). One rollout per step, sampled with top-p 1 and no top-k, stopping at the EOS token; the
same PPO epochs and minibatches (one optimiser step per minibatch, no accumulation); learning rate
(constant, no warm-up), AdamW betas and weight decay; no gradient clipping (TRL's PPO loop never clips);
KL penalty in the per-token reward with the k1 estimator and a fixed coefficient (llmstack's adaptive
controller off); clip ranges, gamma, lambda; advantages whitened over the rollout, rewards not
normalised, whitened or clipped, no missing-EOS penalty; fp32, no gradient checkpointing, no extra
evaluation sampling (TRL's `num_sample_generations` = 0).

## Where the time goes

`py-spy record -r 50 -f raw` around each worker on the tiny model (5 steps, 2 threads, 2026-12-01), samples
per step by the innermost phase named on the stack (loading the four models counts as other):

| phase | llmstack (s / step) | TRL 1.12 (s / step) |
|---|---|---|
| generation | 0.66 | 0.75 |
| model forward passes (scoring and update) | 0.86 | 0.98 |
| backward | 1.04 | 1.27 |
| optimiser steps | 0.34 | 0.28 |

Both trainers run the same transformers model code over the same tokens, and its forward and backward
passes are three quarters of either's step, so the step time can only differ by what the trainers add:
llmstack projects only the response positions onto the vocabulary, in chunks (smaller forward and backward),
and does not collect garbage every step; it runs two optimisers (policy and value, 8 fused AdamW steps per
PPO step) where TRL runs one over both models, and one extra no-grad policy forward in scoring. With a
135M-parameter model the vocabulary projection is a smaller share of the work, and the two come out even.
A step at half of TRL's time would need less model computation than the same PPO algorithm requires on
these tokens.
"""


def _args(argv):
    work = Work()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2")
    parser.add_argument("--preset", default="llama-25m", help="llmstack preset of the tiny model")
    parser.add_argument("--vocab", type=int, default=32000, help="tokenizer size of the tiny model")
    parser.add_argument("--text", default=str(DEFAULT_TEXT),
                        help="text file or folder the tiny model's tokenizer learns")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                        help="JSONL of prompts: one JSON string or {\"prompt\": text} per line")
    parser.add_argument("--rollout", type=int, default=work.rollout, help="prompts per PPO step")
    parser.add_argument("--minibatch", type=int, default=work.minibatch)
    parser.add_argument("--epochs", type=int, default=work.epochs)
    parser.add_argument("--new-tokens", type=int, default=work.new_tokens)
    parser.add_argument("--steps", type=int, default=work.steps,
                        help="PPO steps per run; the last has no end mark and is not timed")
    parser.add_argument("--warmup", type=int, default=1, help="timed steps left out of the medians")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads per contender (default: torch's, one per "
                        "core); 1 keeps timings steadier while other work shares the cores")
    parser.add_argument("--contenders", default=f"{LLMSTACK},llmstack-static,{TRL}",
                        help=f"comma-separated, from {', '.join([*ENGINES, TRL])}")
    parser.add_argument("--work", default="runs/benchmarks")
    parser.add_argument("--trl-venv", default="runs/benchmarks/trl112-venv")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ppo.md"))
    args = parser.parse_args(argv)
    args.spec = Work(rollout=args.rollout, minibatch=args.minibatch, epochs=args.epochs,
                     new_tokens=args.new_tokens, steps=args.steps)
    return args


def size(model_dir: Path) -> str:
    """Parameters and vocabulary of a saved model, read from its files without building it."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return f"{params / 1e6:.1f}M parameters, vocabulary {vocab:,}"


def set_up(model: str, args, root: Path) -> tuple[Path, str]:
    """(setup directory, a description of the model) after building what it lacks."""
    work: Work = args.spec
    if model == "tiny":
        setup = root / f"{args.preset}-v{args.vocab}-{Path(args.text).stem}"
        prepare.preset_models(setup, args.preset, args.vocab, Path(args.text), MAX_POSITIONS, work.seed)
        label = (f"`{args.preset}` preset with fresh weights ({size(setup / 'policy')}), a byte-level BPE "
                 f"trained on `{Path(args.text).name}` (asked for {args.vocab:,} tokens)")
    elif model == "smollm2":
        setup = root / "smollm2-135m-instruct"
        prepare.smollm2_models(setup, Path(args.work).resolve() / "smollm2-pkg", work.seed)
        label = f"{smollm2.LABEL}, {size(setup / 'policy')}"
    else:
        raise SystemExit(f"unknown model {model!r}; choose from tiny, smollm2")
    prepare.prompt_rows(work, setup, prepare.need(args.prompts, "the prompts file"))
    return setup, label


def run_contender(name: str, setup: Path, out: Path, trl_python: Path | None, threads: int | None) -> dict:
    if out.exists():
        shutil.rmtree(out)  # llmstack would resume a run directory left from before
    command = ([str(trl_python), "-m", "benchmarks.ppo.trl_worker", str(setup), str(out)] if name == TRL
               else [sys.executable, "-m", "benchmarks.ppo.llmstack_worker", str(setup), str(out), ENGINES[name]])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env, cwd=REPO)
        # other work on the machine slows both contenders unevenly: the load beside each run goes in the table
        load = []
        while proc.poll() is None:
            load.append(os.getloadavg()[0])
            time.sleep(LOAD_EVERY_S)
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"contender {name} failed:\n{stderr.read()[-3000:]}")
        result = {**json.loads(stdout.read().strip().splitlines()[-1]), "load": sum(load) / len(load)}
    # its checkpoints of four models (about 3.5 GB for SmolLM2) are not part of the comparison; a run of every
    # contender and repeat would otherwise fill tens of GB
    shutil.rmtree(out, ignore_errors=True)
    return result


def section(model_label: str, args, results: dict[str, list[dict]]) -> list[str]:
    w: Work = args.spec
    measured = w.steps - 1 - args.warmup
    threads = f"{args.threads} torch thread{'s' if args.threads > 1 else ''}" if args.threads else \
        "torch's default number of threads"
    targets = [target_line(results, args.warmup, name, TRL, TARGET) for name in results if name in ENGINES]
    return [f"## {model_label}", "",
            f"Work per step: {w.rollout} prompts (at most {w.max_prompt_tokens} tokens) -> at most {w.new_tokens} "
            f"new tokens each at temperature {w.temperature}; {w.epochs} PPO epochs in minibatches of "
            f"{w.minibatch}; lr {w.lr} (policy and value), KL coefficient {w.kl_coef} ({w.kl_estimator}, fixed); "
            f"{threads} per contender. "
            f"{w.steps} steps per run: the first {args.warmup} left out as warm-up, the last untimed, so each "
            f"run's times are the median over {measured} steps; {args.repeats} repeats, interleaved. Cells: "
            "median over repeats (min-max).", "",
            *speed_table(results, args.warmup, TRL), "",
            *[line for target in targets if target for line in (target, "")],
            "Behaviour, step by step (mean reward-model score and KL of each rollout, median over repeats):", "",
            *behaviour_table(results), ""]


def write(path: Path, command: str, minutes: float, sections: list[str], trl_side: str) -> str:
    text = "\n".join([
        f"# ppo: llmstack vs TRL {TRL_VERSION.rstrip('.*')} PPO, side by side", "",
        f"Machine: {machine()}", "", trl_side, "", f"Command: `{command}` (took {minutes:.1f} min, {time.strftime('%Y-%m-%d')})",
        "", "Contenders: `llmstack` generates with the rollout engine a run gets by default (`rollout.engine: auto`: "
        "`hf` on CPU, `static` on CUDA where the architecture supports a static cache), `llmstack-hf` and "
        "`llmstack-static` with that engine by name; everything else about the llmstack runs is the same.", "",
        "Step: from the start of one rollout's generation to the start of the next (so everything a trainer "
        "does per step counts). Generation: sampling the responses. Scoring: the no-grad forward passes for "
        "log-probabilities, reference log-probabilities, values and reward scores, and the advantages. "
        "Update: the rest of the step (the PPO epochs' forward, backward and optimiser steps, and the step's "
        "bookkeeping). Generation per token: generation time over the token positions generated (rollout x "
        "response tensor length). Peak RSS: the process's resident-set high-water mark (four models and "
        "two optimisers' state included). Reward: the reward model's score; KL: the k1 estimate summed over a "
        "response's tokens; both averaged over a rollout and then over the run's steps. Step CPU: the "
        "process's CPU time per step, all threads. Load: the machine's 1-minute load average, sampled every "
        f"{LOAD_EVERY_S} s during the run and averaged (the contender itself adds about its thread count); "
        "where it is well above the core count, other work shared the cores and the times are inflated.", "",
        *sections, NOTES])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv=None) -> None:
    args = _args(argv)
    start = time.time()
    names = args.contenders.split(",")
    unknown = set(names) - {*ENGINES, TRL}
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; choose from {', '.join([*ENGINES, TRL])}")
    trl_python = ensure_trl_venv(Path(args.trl_venv)) if TRL in names else None
    root = Path(args.work) / "ppo"
    sections = []
    for model in args.models.split(","):
        setup, label = set_up(model, args, root)
        results = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names:  # interleaved, so drift in the machine's speed hits both contenders alike
                run = run_contender(name, setup, setup / f"{name}-{repeat}", trl_python, args.threads)
                results[name].append(run)
                print(f"[ppo] {model} {name} repeat {repeat}: steps {[round(s, 2) for s in run['step_s']]} s, "
                      f"reward {[round(r, 3) for r in run['reward']]}", file=sys.stderr, flush=True)
        sections += section(label, args, results)
    command = "python -m benchmarks.ppo " + shlex.join(argv if argv is not None else sys.argv[1:])
    trl_side = trl_environment(trl_python) if trl_python else "TRL not run."
    print(write(Path(args.out), command.strip(), (time.time() - start) / 60, sections, trl_side))
