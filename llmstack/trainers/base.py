"""Mechanics every stage shares, written once: accelerator set-up, optimiser and schedule, signals, and the
start-of-run report (checkpoints are `checkpoint.py`). Stages compose these functions; nothing here is a base
class.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from llmstack.config import ConfigError
from llmstack.models import causal_lm, lora
from llmstack.trainers import distributed
from llmstack.tracking.record import find_parent

log = logging.getLogger("llmstack")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no update was applied and no checkpoint was written after it."""


# ---------------------------------------------------------------------------------------------------------
# Accelerator and the start-of-run report


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX; CPUINFO's flags). Without
    either, torch emulates bf16 matmuls through fp32 and autocast only adds casts."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, cuda: bool | None = None, cpuinfo: str | None = None) -> str:
    """`train.precision` as a run uses it: `auto` is bf16 on a CUDA device with bf16 (Ampere and later) and
    on a CPU with AVX512-BF16 or AMX, fp32 elsewhere; other values are kept."""
    if precision != "auto":
        return precision
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_bf16(cpuinfo) else "fp32"


def compute_precision(acc: Accelerator) -> str:
    """The run's resolved precision (fp32 | bf16 | fp16), from the accelerator's mixed-precision mode."""
    return {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[str(acc.mixed_precision)]


def make_accelerator(precision: str, grad_accum: int, trackers: list[str], project_dir: str,
                     micro_batch: int | None = None, max_grad_norm: float = 0.0) -> Accelerator:
    precision = resolve_precision(precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.precision': fp16 needs a CUDA device (it relies on loss scaling); "
                          "use train.precision=bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = launched > 1 and not torch.cuda.is_available()
    if on_cpu and not distributed.flag("ACCELERATE_USE_DEEPSPEED"):
        # Launched as N CPU processes, accelerate only builds a real process group when told it runs on CPU;
        # otherwise each process trains alone while reporting world size N. (FSDP is adopted just below.)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    # Without CUDA the default process-group backend is unusable; gloo runs multi-process CPU training.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
    if launched == 1:
        # accelerate keeps one state per process and refuses another mixed precision for a later Accelerator;
        # one Python process may run several stages (the pipeline, the Python API: SFT in fp32, then DPO in
        # bf16), each with its own settings
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum,
                      log_with=trackers or None, project_dir=project_dir, kwargs_handlers=handlers)
    if on_cpu and distributed.flag("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU:
        distributed.adopt_fsdp_on_cpu(acc)
    if acc.state.deepspeed_plugin is not None:
        # DeepSpeed calls collectives that torch has deprecated; the warning repeats at every step and is
        # nothing a user can act on
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        distributed.fill_deepspeed_config(acc.state.deepspeed_plugin.deepspeed_config, micro_batch, grad_accum,
                                          max_grad_norm, acc.num_processes)
    if launched > 1 and (acc.num_processes != launched or acc.distributed_type == DistributedType.NO):
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate set up {acc.num_processes} "
            f"({acc.distributed_type.value}): each would train alone. On CPU launch with "
            "`accelerate launch --config_file configs/accelerate/cpu-2proc.yaml ...`")
    return acc


def describe_world(accelerator: Accelerator) -> str:
    return (f"world size {accelerator.num_processes} ({accelerator.distributed_type.value}), "
            f"layout {distributed.layout(accelerator)}, "
            f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}")


def batch_arithmetic(batch_size: int, grad_accum: int, world_size: int, seq_len: int) -> str:
    global_batch = batch_size * grad_accum * world_size
    return (f"batch: {batch_size} per device x {grad_accum} accumulation x {world_size} processes = "
            f"{global_batch} sequences per step x {seq_len} tokens = {global_batch * seq_len:,} tokens per step")


def setup_logging(is_main: bool) -> None:
    """Progress and start-up lines from the main process only, so N processes do not print N copies."""
    level = logging.INFO if is_main else logging.WARNING
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[llmstack] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


# ---------------------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule


# Fine-tuning a pretrained checkpoint takes peak learning rates of about 1e-6 to 1e-4 (SFT 1e-5 to 1e-4, reward
# models about 1e-5, RL 1e-6 to 1e-5); the 1e-3 to 3e-3 that train the tiny presets from scratch (and fill
# configs/tiny/) wreck such a model within a few steps.
FINE_TUNING_MAX_LR = 2e-4


def learning_rate_facts(stage: str, name_or_path: str | None, lr: float, weight_decay: float) -> dict:
    """record.json's account of the learning rate: whether the run starts from a checkpoint trained elsewhere
    (a Hub name or a directory that is not an llmstack run's model/), and, when its `train.lr` is a
    from-scratch rate, a warning naming the key (logged and recorded)."""
    external = name_or_path is not None and "run_dir" not in (find_parent(name_or_path) or {})
    facts = {"lr": lr, "weight_decay": weight_decay, "starts_from_outside_checkpoint": external}
    if external and lr > FINE_TUNING_MAX_LR:
        facts["warning"] = (f"{stage}: train.lr={lr:g} is a learning rate for training from scratch, and "
                            f"{name_or_path} is a pretrained checkpoint it would wreck; fine-tuning takes 1e-6 to "
                            f"1e-4 (e.g. train.lr=2e-5), with train.weight_decay=0 or small")
        log.warning(facts["warning"])
    return facts


def build_optimizer(model: torch.nn.Module, lr: float, betas: list[float], weight_decay: float,
                    kind: str = "adamw"):
    """AdamW (`kind` adamw, or adamw_8bit: `llmstack.models.lora.adamw_8bit`); biases and norm gains (1-D
    tensors) are not decayed, as in GPT-3 and Llama training. The fused
    implementation updates all tensors in one kernel per device: on 2 CPU threads a step over 26M parameters
    took 17 ms against 43 ms for torch's default per-tensor loop (30 against 85 ms on one thread), and on CUDA it is
    the fastest of torch's AdamW implementations; the arithmetic is the same (5e-8 apart after 5 steps)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if causal_lm.ndim(param) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw_8bit":
        return lora.adamw_8bit(groups, lr, tuple(betas))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for the update numbered `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: cosine, linear, constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def effective_warmup(warmup_steps: int, max_steps: int, schedule: str) -> int:
    """The warm-up a run takes: as asked, unless it would leave a decaying schedule no room (a config sized
    for a long run, shortened with train.max_steps=...), where a tenth of the run warms up instead."""
    if schedule == "constant" or warmup_steps < max_steps:
        return warmup_steps
    shorter = max_steps // 10
    log.warning(f"train.warmup_steps={warmup_steps} would leave no {schedule} decay within train.max_steps="
                f"{max_steps}; warming up for {shorter} steps instead")
    return shorter


def build_scheduler(optimizer, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """A LambdaLR stepped once per optimiser update (never through accelerate, which would step it once per
    process and so run the schedule N times too fast)."""
    warmup = effective_warmup(warmup_steps, max_steps, schedule)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup, max_steps, min_lr_ratio))


# ---------------------------------------------------------------------------------------------------------
# Pre-emption


class StopOnSignal:
    """Turns SIGTERM/SIGINT into a request the loop honours at the next step boundary (checkpoint, then exit).

    A second SIGINT falls through to Python's default, so Ctrl-C twice still aborts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step")

    def requested(self, accelerator: Accelerator, asked: bool = False) -> tuple[bool, bool]:
        """(whether any process received a signal, whether any process `asked` to stop), the same on every
        process: one reduction answers both."""
        flags = torch.tensor([self.signum is not None, asked], dtype=torch.long, device=accelerator.device)
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "sum")
        return bool(flags[0]), bool(flags[1])
