"""Model-FLOPs utilisation: achieved training FLOP/s as a fraction of what the hardware could do."""

from __future__ import annotations

import time

import torch


def transformer_flops_per_token(n_params: int, n_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls forward and backward (2N + 4N) plus 12*L*H*T for
    attention scores and values (PaLM, Chowdhery et al. 2022, appendix B). `n_params` counts the weights
    used in a matmul per token: an untied input embedding is a lookup and belongs out of it."""
    return 6.0 * n_params + 12.0 * n_layers * hidden_size * seq_len


# Dense (no sparsity) peak FLOP/s per device, from the vendors' datasheets: (bf16/fp16 tensor, tf32/fp32).
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),  # SXM
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "V100": (125e12, 15.7e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "MI300X": (1307e12, 654e12),
    "MI250X": (383e12, 95.7e12),
}

_measured: dict[tuple[str, torch.dtype], float] = {}


def _lookup(device_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    # longest key first, so "H100 PCIe" wins over "H100"
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            low, full = PEAK_FLOPS[key]
            return (low if dtype in (torch.bfloat16, torch.float16) else full), f"table: {key}"
    return None


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Best observed rate of a square matmul: a practical peak for devices without a datasheet entry."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float, str]:
    """Per-device peak FLOP/s and where the number came from: an override, the datasheet table, or a GEMM
    measured once per process (CPU, unknown accelerators)."""
    if override:
        return override, "override"
    if device.type == "cuda":
        found = _lookup(torch.cuda.get_device_name(device), dtype)
        if found:
            return found
    key = (device.type, dtype)
    if key not in _measured:
        # CPUs without native bf16 matmul emulate it slowly; measure the dtype the model will actually run.
        _measured[key] = measure_gemm_flops(device, dtype)
    return _measured[key], "measured GEMM"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int) -> float:
    return tokens_per_s * flops_per_token / (peak * n_devices)
