"""One benchmark case, measured in its own fresh process: `python -m benchmarks.kernels.worker '<json case>'`.

Prints one JSON line: {"case": ..., "ms": [per-repeat times], "peak_mib": ..., "base_mib": ...}.

Peak memory is what the measured call adds on top of what existed before it (inputs, model, optimiser):
on CUDA from torch's allocator (`max_memory_allocated`); on CPU, where torch keeps no allocator statistics,
from the kernel's resident-set high-water mark (VmHWM), reset to the current RSS just before the call
(`/proc/self/clear_refs`), falling back to the ru_maxrss delta where the reset is refused. A fresh process
per case keeps one case's freed-but-cached memory out of the next one's number.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time

import torch
import torch.nn.functional as F

from llmstack import losses
from llmstack.kernels import KernelPlan
from llmstack.kernels import linear_cross_entropy as lce
from llmstack.kernels import linear_logprobs as llp

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Memory:
    """Peak bytes added by the code run between `start()` and `peak_mib()`."""

    def __init__(self, device: torch.device):
        self.device = device

    def _status_mib(self, key: str) -> float:
        with open("/proc/self/status") as fh:
            return int(re.search(rf"{key}:\s+(\d+)", fh.read()).group(1)) / 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        self.base = self._status_mib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the high-water mark to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        if self.reset:
            return self._status_mib("VmHWM") - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, device: torch.device, repeats: int, warmup=None) -> dict:
    """Peak memory over all calls of `step` (the first included), and each call's wall time. `warmup`, the
    same code on tiny inputs, runs first so that one-time costs (loading code, thread pools, compiled
    kernels) count neither as the case's memory nor as its time."""
    if warmup is not None:
        warmup()
    memory = Memory(device)
    memory.start()
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return {"ms": times[1:], "first_ms": times[0], "peak_mib": memory.peak_mib(), "base_mib": memory.base}


def _head_inputs(case, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[case["dtype"]]
    b, t, h, v = case["B"], case["T"], case["H"], case["V"]
    hidden = torch.randn(b, t, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g).to(device)
    return hidden, weight, labels


def _tiny(case):
    return {**case, "B": 1, "T": 16, "V": 256}


def _forced(path: str, device) -> KernelPlan:
    """The plan that runs `path` (chunked or triton) on `device`, whatever the device would resolve to: the
    benchmark compares the paths themselves."""
    return KernelPlan("fused", torch.device(device).type, path, swap_modules=path == "triton")


def _cross_entropy_step(case, device):
    hidden, weight, labels = _head_inputs(case, device)
    path = case["path"]
    if path == "hf-unfused":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def loss_fn():  # what a Hugging Face causal LM does when given labels
            return ForCausalLMLoss(F.linear(hidden, weight), labels, weight.shape[0],
                                   num_items_in_batch=torch.tensor(1, device=device))
    elif path == "reference":
        def loss_fn():  # llmstack's unfused path: full logits, then causal_lm_loss_sum
            return losses.causal_lm_loss_sum(F.linear(hidden, weight), labels)
    else:
        def loss_fn():
            return lce.causal_linear_cross_entropy(hidden, weight, labels, kernels=_forced(path, device))

    def step():
        hidden.grad = weight.grad = None
        loss_fn().backward()
    return step


def cross_entropy_case(case, device) -> dict:
    """Summed next-token loss, forward and backward, from [B, T, H] hidden states and a [V, H] head."""
    return measure(_cross_entropy_step(case, device), device, case["repeats"],
                   warmup=_cross_entropy_step(_tiny(case), device))


def _logprobs_step(case, device):
    hidden, weight, tokens = _head_inputs(case, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    advantages = torch.randn(tokens.shape, generator=g).to(device)
    path = case["path"]

    def step():
        hidden.grad = weight.grad = None
        if path == "reference":
            logp, entropy = llp.reference(hidden, weight, tokens, temperature=0.7)
        else:
            logp, entropy = llp.linear_logprobs(hidden, weight, tokens, temperature=0.7, kernels=_forced(path, device))
        (-(advantages * logp).sum() - 0.01 * entropy.sum()).backward()
    return step


def logprobs_case(case, device) -> dict:
    """Per-token logp and entropy with a PPO-like use of both, forward and backward."""
    return measure(_logprobs_step(case, device), device, case["repeats"], warmup=_logprobs_step(_tiny(case), device))


def elementwise_case(case, device) -> dict:
    """RMSNorm, RoPE or SwiGLU on a [B, T, H] activation: the Triton op against the reference."""
    from llmstack.kernels import rms_norm, rope, swiglu

    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[case["dtype"]]
    b, t, h = case["B"], case["T"], case["H"]
    kernels = "fused" if case["path"] == "triton" else "reference"
    if case["op"] == "rms_norm":
        x = torch.randn(b, t, h, generator=g).to(device, dtype).requires_grad_()
        w = torch.ones(h, device=device, dtype=dtype, requires_grad=True)
        run, params = (lambda: rms_norm.rms_norm(x, w, 1e-6, kernels=kernels)), [x, w]
    elif case["op"] == "swiglu":
        gate = torch.randn(b, t, 4 * h, generator=g).to(device, dtype).requires_grad_()
        up = torch.randn(b, t, 4 * h, generator=g).to(device, dtype).requires_grad_()
        run, params = (lambda: swiglu.swiglu(gate, up, kernels=kernels)), [gate, up]
    else:
        heads, dim = h // 128, 128
        q = torch.randn(b, t, heads, dim, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(b, t, heads // 4, dim, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
        angles = torch.arange(t, device=device)[:, None] * torch.rand(dim // 2, generator=g).to(device)[None]
        cos = torch.cat([angles.cos()] * 2, -1)[None].to(dtype)
        sin = torch.cat([angles.sin()] * 2, -1)[None].to(dtype)
        run, params = (lambda: sum(o.float().sum() for o in rope.apply_rope(q, k, cos, sin, kernels=kernels))), [q, k]

    def step():
        for p in params:
            p.grad = None
        out = run()
        (out if out.dim() == 0 else out.float().square().sum()).backward()

    return measure(step, device, case["repeats"])


def training_step_case(case, device) -> dict:
    """One SFT-like step (forward, backward, AdamW) of a small Llama, stock path or fused path."""
    from transformers import AutoModelForCausalLM

    from llmstack.models.fused import apply_kernels
    from llmstack.models.heads import final_hidden_states, lm_head_params
    from llmstack.models.causal_lm import preset_config

    torch.manual_seed(0)
    config = preset_config(case["preset"], case["V"], case["T"])
    model = AutoModelForCausalLM.from_config(config).to(device)
    handle = apply_kernels(model, "auto" if case["path"] == "fused" else "reference")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, case["V"], (case["B"], case["T"]), generator=g).to(device)
    labels = ids.clone()
    labels[:, :int(case["T"] * case["prompt_fraction"])] = losses.IGNORE_INDEX
    n_targets = losses.count_targets(labels)

    def step():
        if case["path"] == "fused":
            weight, _ = lm_head_params(model)
            hidden = final_hidden_states(model, input_ids=ids, use_cache=False)
            loss = lce.causal_linear_cross_entropy(hidden, weight, labels, kernels=handle.plan)
        else:
            loss = losses.causal_lm_loss_sum(model(input_ids=ids, use_cache=False).logits, labels)
        (loss / n_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # Adam's state exists from here on, as in any step after the first
    result = measure(step, device, case["repeats"])
    result["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    result["loss_path"] = handle.plan.path
    return result


KINDS = {"ce": cross_entropy_case, "logprobs": logprobs_case, "elementwise": elementwise_case,
         "train": training_step_case}


def main(argv=None) -> None:
    case = json.loads((argv or sys.argv[1:])[0])
    device = torch.device(case.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    result = KINDS[case["kind"]](case, device)
    print(json.dumps({"case": case, **result}))


if __name__ == "__main__":
    main()
