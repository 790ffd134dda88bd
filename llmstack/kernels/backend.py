"""Which kernels run where: the one resolver of the `kernels` choice, and the one place that imports triton.

`kernels: auto | reference | fused` is the only vocabulary for choosing kernels, from the config down to
each op; `resolve(kernels, device)` decides once what that means on a device and returns a `KernelPlan`,
which stages pass down to every fused op (the ops also take the word itself and resolve it the same way).

Triton is an optional dependency (`pip install 'llmstack[kernels]'`). Without it, or without a GPU driver,
every op in this package still works through its plain-torch path; the fallback is logged once per reason.

The jitted kernels live in `llmstack.kernels.triton_impl` and are defined only when a Triton path is first
asked for, never when `llmstack.kernels` is imported. That matters on CPU: Triton's interpreter
(`TRITON_INTERPRET=1`, used by the tests) takes effect only for kernels defined after the variable is set,
so defining them lazily lets a test harness set it at any point before the first Triton call.

What the tests cover: every kernel's program logic, forward and backward, under the interpreter on CPU, and
the same cases on CUDA tensors with the kernels compiled when a GPU is present (tests/kernels/conftest.py:
there the interpreter stays off; `bash scripts/gpu-check.sh` runs them). Their speed is measured by
`python -m benchmarks.kernels`, not tested.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

KERNELS = ("auto", "reference", "fused")  # the config's words, the only vocabulary for choosing kernels
PATHS = ("reference", "chunked", "triton")  # what a resolved choice runs


@functools.cache
def _kernels():
    """The `triton_impl` package (all kernels defined), or None with the reason logged once."""
    try:
        importlib.import_module("triton")
    except ImportError:
        log.warning("llmstack.kernels: triton is not installed (pip install 'llmstack[kernels]'); "
                    "using the plain-torch paths")
        return None
    from llmstack.kernels import triton_impl
    return triton_impl


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: compiled on CUDA, or interpreted on CPU when
    `TRITON_INTERPRET=1` was set before the kernels were defined (slow: about 1 ms per program; for tests)."""
    device = torch.device(device)
    impl = _kernels()
    if impl is None:
        return False
    if device.type == "cuda":
        ok = not impl.INTERPRETED and torch.cuda.is_available()
        if not ok:
            _warn_once("llmstack.kernels: the Triton kernels were defined in interpreter mode or CUDA is not "
                       "available; CUDA tensors use the plain-torch paths")
        return ok
    if device.type == "cpu":
        return impl.INTERPRETED
    return False


@dataclass(frozen=True)
class KernelPlan:
    """A `kernels` choice resolved for one device by `resolve`: what the user asked for and what runs.

    `path` is how the fused ops compute: `reference` (the plain-torch spec: full logits, unfused layers),
    `chunked` (the losses in torch chunks, never the full logits; layers unfused) or `triton` (Triton
    kernels for the losses and, where `swap_modules`, RMSNorm, RoPE and SwiGLU inside the model)."""

    kernels: str
    device: str
    path: str
    swap_modules: bool

    def summary(self) -> dict:
        return {"kernels": self.kernels, "device": self.device, "path": self.path}


def resolve(kernels: str, device: torch.device | str) -> KernelPlan:
    """The one decision of what runs, by device:

        kernels    CUDA with Triton              CPU, or no Triton / no driver
        reference  reference                     reference
        auto       triton, modules swapped       chunked (Triton on CPU is only the slow interpreter)
        fused      triton, modules swapped       chunked, logged as a fallback; except under
                                                 TRITON_INTERPRET=1 on CPU: triton (tests only: slow)
    """
    plan = _decide(kernels, device)
    if kernels == "fused" and plan.path != "triton":
        log.warning(_FALLBACK.format(device=plan.device))
    return plan


_FALLBACK = ("kernels=fused: Triton cannot run on {device} here; layers stay stock and the losses take the chunked "
             "torch path (on CPU, set TRITON_INTERPRET=1 before the first kernel call to interpret the kernels)")


def _decide(kernels: str, device: torch.device | str) -> KernelPlan:
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if kernels == "reference":
        return KernelPlan(kernels, device.type, "reference", False)
    runs = (device.type == "cuda" or kernels == "fused") and triton_runs_on(device)
    return KernelPlan(kernels, device.type, "triton" if runs else "chunked", runs)


def path_on(kernels: KernelPlan | str, device: torch.device) -> str:
    """The path an op takes on tensors of `device`: a config word is resolved there (the fallback logged once,
    not at every call); a plan keeps its path, except that Triton falls back to the chunked torch path on a
    device it cannot run on (logged once)."""
    if isinstance(kernels, str):
        plan = _decide(kernels, device)
        if kernels == "fused" and plan.path != "triton":
            _warn_once(_FALLBACK.format(device=plan.device))
        return plan.path
    if kernels.path == "triton" and not triton_runs_on(device):
        _warn_once(f"llmstack.kernels: Triton cannot run on {torch.device(device).type} here; using the chunked "
                   "torch path")
        return "chunked"
    return kernels.path


def triton_module(name: str):
    """One kernel module of `triton_impl`, e.g. `triton_module("rms_norm")`; call only after `triton_runs_on`."""
    return getattr(_kernels(), name)


def fallback_notice(op: str, device: torch.device) -> None:
    """Logged once per op and device when a fused op computes with plain torch because Triton cannot run."""
    _warn_once(f"llmstack.kernels: {op} on {device.type} runs in plain torch (Triton cannot run there)")
