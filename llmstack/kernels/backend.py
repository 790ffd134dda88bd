"""Can Triton run here, and on which device? The one place that imports triton, behind a guard.

Triton is an optional dependency (`pip install 'llmstack[kernels]'`). Without it, or without a GPU driver,
every op in this package still works through its plain-torch path; the fallback is logged once per reason.

The jitted kernels live in `llmstack.kernels.triton_impl` and are defined only when a Triton path is first
asked for, never when `llmstack.kernels` is imported. That matters on CPU: Triton's interpreter
(`TRITON_INTERPRET=1`, used by the tests) takes effect only for kernels defined after the variable is set,
so defining them lazily lets a test harness set it at any point before the first Triton call.

What the tests cover: every kernel's program logic, forward and backward, under the interpreter on CPU. What
they cannot: the kernels compiled for a GPU (block sizes against real shared memory, the compiled code's
speed). That needs a CUDA device, where `python -m benchmarks.kernels` runs the compiled path; the tests
build CPU tensors and so stay on the interpreter.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "chunked", "triton")


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


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The path a loss op takes: `auto` is Triton on CUDA (when it runs there) and chunked torch elsewhere;
    an explicit `triton` that cannot run on `device` falls back to `chunked`, logged once."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl={impl!r} is not one of {', '.join(IMPLS)}")
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_runs_on(device) else "chunked"
    if impl == "triton" and not triton_runs_on(device):
        _warn_once(f"llmstack.kernels: Triton cannot run on {device.type} here; using the chunked torch path "
                   "(on CPU, set TRITON_INTERPRET=1 before the first kernel call to interpret the kernels)")
        return "chunked"
    return impl


def triton_module(name: str):
    """One kernel module of `triton_impl`, e.g. `triton_module("rms_norm")`; call only after `triton_runs_on`."""
    return getattr(_kernels(), name)


def fallback_notice(op: str, device: torch.device) -> None:
    """Logged once per op and device when a fused op computes with plain torch because Triton cannot run."""
    _warn_once(f"llmstack.kernels: {op} on {device.type} runs in plain torch (Triton cannot run there)")
