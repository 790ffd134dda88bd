"""The jitted Triton kernels, one module per op: `_<op>_fwd_kernel` / `_<op>_bwd_kernel` and the launchers
that size their grids. Imported only through `llmstack.kernels.backend` once triton is known to import;
every module is imported here at once so that all kernels are defined in the same mode (compiled, or
interpreted under `TRITON_INTERPRET=1`), which `INTERPRETED` records.

Block sizes and warp counts are common starting points, not tuned: no GPU was at hand when they were
written. Re-tune them with `python -m benchmarks.kernels` on the target GPU and note the numbers here.
"""

from llmstack.kernels.triton_impl import cross_entropy, logprobs, rms_norm, rope, swiglu

INTERPRETED = type(rms_norm._rms_norm_fwd_kernel).__name__ == "InterpretedFunction"

__all__ = ["INTERPRETED", "cross_entropy", "logprobs", "rms_norm", "rope", "swiglu"]
