"""Fused kernels against their references and the unfused Hugging Face path: time and peak memory.

    python -m benchmarks.kernels [--quick] [--only ce,logprobs,elementwise,train] [--out FILE]

`--quick` is the smoke size (one batch of 512 tokens, V up to 128k, one repeat; what scripts/gpu-check.sh
runs); without it, the full grid. The exit status is non-zero when any case failed.

Every case runs in a fresh process (`worker.py`), so each peak-memory number is that case's alone. Results
go to `benchmarks/results/kernels.md` with the machine, the exact command and the tables.

Cases:
- ce: the summed next-token loss, forward and backward, from bf16 [B, T, H] hidden states and a bf16 [V, H]
  head, over sequence length and vocabulary (32k, 128k, 256k). Paths: hf-unfused (the model's lm_head then
  `transformers`' ForCausalLMLoss), reference (full logits, then `llmstack.losses.causal_lm_loss_sum`),
  chunked, and triton where it runs (CUDA).
- logprobs: PPO's per-token logp and entropy, both used in a loss, forward and backward; same grid.
- elementwise: RMSNorm, RoPE, SwiGLU, Triton op against the reference (CUDA only: on CPU the Triton kernels
  exist only as the interpreter, whose timings mean nothing).
- train: one SFT-like step (forward, backward, AdamW) of the ~26M-parameter `llama-25m` preset at vocabulary
  32000, sequence 512: stock modules and full logits against `apply_kernels(model, "auto")` and the fused
  loss, with a masked prompt (SFT) and with every position a target (pretraining).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kernels.md"
VOCABS = (32768, 131072, 262144)
KINDS = ("ce", "logprobs", "elementwise", "train")


def _triton_on_device() -> bool:
    if not torch.cuda.is_available():
        return False
    from llmstack.kernels import backend
    return backend.triton_runs_on("cuda")


def cases(quick: bool, only: set[str]) -> list[dict]:
    gpu = torch.cuda.is_available()
    head_paths = ["hf-unfused", "reference", "chunked"] + (["triton"] if _triton_on_device() else [])
    repeats = 1 if quick else 2
    # B x T tokens: sized so the unfused path's [N, V] fp32 tensors fit in ~20 GB at V = 256k (CPU).
    grid = [(2, 512), (2, 2048)] if not quick else [(1, 512)]
    vocabs = VOCABS if not quick else (32768, 131072)
    width = 4096 if gpu else 512
    out = []
    for kind in ("ce", "logprobs"):
        if kind not in only:
            continue
        for (b, t) in grid:
            for v in vocabs:
                for path in head_paths:
                    if kind == "logprobs" and path == "hf-unfused":
                        continue  # its unfused path is the reference (full logits, log_softmax, gather)
                    out.append(dict(kind=kind, path=path, B=b, T=t, H=width, V=v, dtype="bf16", repeats=repeats))
    if "elementwise" in only and _triton_on_device():
        for op in ("rms_norm", "rope", "swiglu"):
            for path in ("reference", "triton"):
                out.append(dict(kind="elementwise", op=op, path=path, B=4 if not quick else 1, T=4096, H=4096,
                                dtype="bf16", repeats=5 if not quick else 2))
    if "train" in only:
        for fraction in (0.25, 0.0):
            for path in ("reference", "fused"):
                out.append(dict(kind="train", path=path, preset="llama-25m", V=32000, B=8 if not quick else 2,
                                T=512, prompt_fraction=fraction, repeats=3 if not quick else 1))
    return out


def run_case(case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels.worker", json.dumps(case)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        with open("/proc/meminfo") as fh:
            ram = int(fh.readline().split()[1]) / 2**20
    except (OSError, StopIteration):
        ram = float("nan")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, GPU: {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), triton {triton_version}, Python {platform.python_version()}")


def _fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def head_table(results: list[dict], kind: str) -> list[str]:
    rows = [r for r in results if r["case"]["kind"] == kind]
    if not rows:
        return []
    baseline_path = "hf-unfused" if kind == "ce" else "reference"
    lines = ["| tokens (B x T) | V | path | time (ms) | peak memory (MiB) | memory vs " + baseline_path +
             " | speed vs " + baseline_path + " |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        base = next((b for b in rows if b["case"]["path"] == baseline_path and b["case"]["B"] == c["B"]
                     and b["case"]["T"] == c["T"] and b["case"]["V"] == c["V"]), None)
        tokens = f"{c['B'] * c['T']:,} ({c['B']} x {c['T']})"
        if "error" in r:
            lines.append(f"| {tokens} | {c['V']:,} | {c['path']} | failed: {r['error']} | | | |")
            continue
        ms = min(r["ms"])
        ratio_mem = ratio_speed = ""
        if base and "error" not in base:
            ratio_mem = f"{base['peak_mib'] / r['peak_mib']:.1f}x lower" if r is not base else "1x"
            ratio_speed = f"{min(base['ms']) / ms:.2f}x" if r is not base else "1x"
        lines.append(f"| {tokens} | {c['V']:,} | {c['path']} | {_fmt(ms)} | {_fmt(r['peak_mib'])} | {ratio_mem} "
                     f"| {ratio_speed} |")
    return lines


def elementwise_table(results: list[dict]) -> list[str]:
    rows = [r for r in results if r["case"]["kind"] == "elementwise"]
    if not rows:
        return ["Not measured: the Triton kernels run compiled only on a GPU; on CPU they exist as Triton's "
                "interpreter (for tests), whose timings mean nothing."]
    lines = ["| op | shape (B x T x H) | path | time (ms) | peak memory (MiB) |", "|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        if "error" in r:
            lines.append(f"| {c['op']} | {c['B']} x {c['T']} x {c['H']} | {c['path']} | failed: {r['error']} | |")
            continue
        lines.append(f"| {c['op']} | {c['B']} x {c['T']} x {c['H']} | {c['path']} | {min(r['ms']):.2f} "
                     f"| {_fmt(r['peak_mib'])} |")
    return lines


def train_table(results: list[dict]) -> list[str]:
    rows = [r for r in results if r["case"]["kind"] == "train"]
    if not rows:
        return []
    lines = ["| workload | path | loss path | step time (ms) | tokens/s | peak memory over the step (MiB) "
             "| process peak (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        work = (f"{c['B']} x {c['T']} tokens, " + (f"{c['prompt_fraction']:.0%} prompt masked (SFT)"
                                                  if c["prompt_fraction"] else "all targets (pretraining)"))
        if "error" in r:
            lines.append(f"| {work} | {c['path']} | | failed: {r['error']} | | | |")
            continue
        ms = min(r["ms"])
        lines.append(f"| {work} | {c['path']} | {r['loss_path']} | {_fmt(ms)} | {_fmt(c['B'] * c['T'] / ms * 1000)} "
                     f"| {_fmt(r['peak_mib'])} | {_fmt(r['base_mib'] + r['peak_mib'])} |")
    params = next((r["params_m"] for r in rows if "params_m" in r), None)
    if params:
        lines.append(f"\nModel: `llama-25m` preset, {params:.1f}M parameters (tied embeddings), fp32 weights, "
                     "AdamW; the time is the fastest of the timed steps after one warm-up step.")
    return lines


def _ok(results, **match):
    return [r for r in results if "error" not in r and all(r["case"].get(k) == v for k, v in match.items())]


def summary(results: list[dict]) -> list[str]:
    """The fused path against the unfused one where the claims are made: the loss at V = 128k at the largest
    token count, and the training step."""
    lines = []
    ce = _ok(results, kind="ce", V=131072)
    if ce:
        tokens = max(r["case"]["B"] * r["case"]["T"] for r in ce)
        at = [r for r in ce if r["case"]["B"] * r["case"]["T"] == tokens]
        base = next((r for r in at if r["case"]["path"] == "hf-unfused"), None)
        fused = next((r for r in at if r["case"]["path"] == "triton"), None) or next(
            (r for r in at if r["case"]["path"] == "chunked"), None)
        if base and fused:
            lines.append(f"- Cross-entropy at V = 131,072, {tokens:,} tokens: {fused['case']['path']} peak memory "
                         f"{fused['peak_mib']:,.0f} MiB vs {base['peak_mib']:,.0f} MiB unfused "
                         f"({base['peak_mib'] / fused['peak_mib']:.1f}x lower), speed "
                         f"{min(base['ms']) / min(fused['ms']):.2f}x the unfused path's.")
    for fraction, name in ((0.25, "SFT step (25% prompt masked)"), (0.0, "pretraining-like step")):
        pair = {r["case"]["path"]: r for r in _ok(results, kind="train", prompt_fraction=fraction)}
        if {"reference", "fused"} <= pair.keys():
            ref, fused = pair["reference"], pair["fused"]
            lines.append(f"- {name}: peak memory over the step {fused['peak_mib']:,.0f} vs {ref['peak_mib']:,.0f} "
                         f"MiB ({ref['peak_mib'] / fused['peak_mib']:.1f}x lower); tokens/s "
                         f"{min(ref['ms']) / min(fused['ms']):.2f}x the reference's.")
    return lines


def write(results: list[dict], command: str, out: Path, seconds: float) -> None:
    device = "GPU" if torch.cuda.is_available() else "CPU"
    mem_note = ("torch's allocator (`max_memory_allocated`), minus what was allocated before the call"
                if device == "GPU" else
                "the process's resident-set high-water mark (VmHWM, reset just before the call), minus the "
                "resident set before it; one fresh process per case")
    lines = ["# Fused kernels: time and peak memory", "",
             f"Machine: {machine()}", "", f"Command: `{command}` (took {seconds / 60:.1f} min, "
             f"{time.strftime('%Y-%m-%d')})", "",
             f"Peak memory: {mem_note}. Time: the fastest of the timed repeats. Each case first runs once on "
             "tiny inputs (loading code and kernels, counted in neither number), then once at full size "
             "(counted for memory only). Inputs are bf16 hidden states [B, T, H] and a bf16 head [V, H] with "
             f"H = {next((r['case']['H'] for r in results if 'H' in r['case']), '-')}; losses in fp32.", "",
             "## Summary", "", *summary(results), "",
             "## Cross-entropy (loss + backward) from hidden states", "", *head_table(results, "ce"), "",
             "## Per-token logp and entropy (PPO update: both used, + backward)", "",
             *head_table(results, "logprobs"), "",
             "## RMSNorm, RoPE, SwiGLU (forward + backward)", "", *elementwise_table(results), "",
             "## One SFT-like training step, fused vs reference, side by side", "", *train_table(results), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, one repeat (a smoke run)")
    parser.add_argument("--only", default=",".join(KINDS), help="comma-separated case kinds: " + ", ".join(KINDS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"--only: unknown kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    command = "python -m benchmarks.kernels " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.time()
    results = []
    for case in cases(args.quick, set(args.only.split(","))):
        result = run_case(case)
        results.append(result)
        summary = result.get("error") or f"{min(result['ms']):.0f} ms, peak {result['peak_mib']:.0f} MiB"
        print(f"{json.dumps(case)} -> {summary}", flush=True)
    write(results, command.strip(), args.out, time.time() - start)
    print(f"wrote {args.out}")
    failed = sum("error" in r for r in results)
    if failed:  # a check (scripts/gpu-check.sh) must not read a table of failures as a pass
        sys.exit(f"{failed} of {len(results)} cases failed; their rows in {args.out} say why")


if __name__ == "__main__":
    main()
