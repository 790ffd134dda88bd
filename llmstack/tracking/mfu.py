"""Model-FLOPs utilisation: achieved training FLOP/s as a fraction of what the hardware could do.

MFU = tokens/s x training FLOPs per token / (peak FLOP/s per device x devices). The peak comes from an
explicit override, the datasheet table below, or a matmul timed once on this machine (CPUs, unknown GPUs).
"""

from __future__ import annotations

import time

import torch


def transformer_flops_per_token(n_params: int, n_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: 6N + 12*L*H*T.

    From PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", appendix B): every
    weight in a matmul costs 2 FLOPs per token forward and 4 backward (6N), and attention's scores and
    weighted values add 12*L*H*T (L layers, H = heads x head_dim, T the sequence length). Causal masking
    is not discounted, as in the paper, so numbers compare with published MFU figures.

    `n_params` is the caller's choice; llmstack passes the weights used in a matmul per token: an untied
    input embedding is a table lookup and is left out, while the output projection (tied or not) is in.
    """
    return 6.0 * n_params + 12.0 * n_layers * hidden_size * seq_len


# Dense (no sparsity) peak FLOP/s per device: (bf16/fp16 tensor, tf32 tensor, fp32 without tf32).
# Sources: the vendors' datasheets (NVIDIA A100, H100, H200, L4, L40, L40S, V100; the Ada and Ampere
# GeForce whitepapers for RTX 4090/3090, fp16 with fp32 accumulation; AMD Instinct MI250X, MI300X).
# A10G: AWS's figures (~70 TF fp16 tensor, ~35 TF fp32); NVIDIA publishes no separate sheet for it.
# Devices without tf32 (V100, MI250X) list their fp32 matrix rate twice.
PEAK_FLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989e12, 494e12, 67e12),
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100 NVL": (835e12, 418e12, 60e12),
    "H100": (989e12, 494e12, 67e12),  # SXM ("H100 80GB HBM3")
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L40": (181e12, 90.5e12, 90.5e12),
    "L4": (121e12, 60e12, 30.3e12),
    "A10G": (70e12, 35e12, 35e12),
    "V100": (125e12, 15.7e12, 15.7e12),  # SXM2
    "RTX 4090": (165e12, 82.6e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12, 35.6e12),
    "MI300X": (1307e12, 654e12, 163e12),
    "MI250X": (383e12, 95.7e12, 95.7e12),
}

# (device type, dtype) -> (FLOP/s, source): timing a matmul costs ~0.5 s, so once per process is enough.
_measured: dict[tuple[str, torch.dtype], tuple[float, str]] = {}


def _tf32_enabled() -> bool:
    # torch >= 2.9 has a per-backend setting and raises if the legacy getter is read after the new one was set
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return False


def _lookup(device_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    # longest key first, so "H100 PCIe" wins over "H100" and "L40S" over "L4"
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            half, tf32, fp32 = PEAK_FLOPS[key]
            if dtype in (torch.bfloat16, torch.float16):
                return half, f"table: {key}"
            return (tf32, f"table: {key} (tf32)") if _tf32_enabled() else (fp32, f"table: {key} (fp32)")
    return None


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                       seconds: float = 0.4) -> float:
    """Best observed rate of a square matmul after a warm-up: a practical peak where no datasheet applies.
    A dtype the device only emulates (fp16 on most CPUs) can take seconds per matmul; then the warm-up's
    own rate is the answer rather than timing it again."""
    size = size or (1024 if device.type == "cpu" else 4096)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size**3

    def timed() -> float:
        start = time.perf_counter()
        (a @ b)[0, 0].item()  # .item() waits for an asynchronous device, whatever its backend
        return time.perf_counter() - start

    warm = timed()
    if warm >= seconds:
        return flops / warm
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = max(best, flops / timed())
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float, str]:
    """Per-device peak FLOP/s for training in `dtype`, and where the number came from: "override", "table:
    <name>" or "measured GEMM" (once per process per device type and dtype; in fp32 where the device has no
    matmul for `dtype`)."""
    if override:
        return float(override), "override"
    if device.type == "cuda":
        found = _lookup(torch.cuda.get_device_name(device), dtype)
        if found:
            return found
    key = (device.type, dtype)
    if key not in _measured:
        try:
            _measured[key] = measure_gemm_flops(device, dtype), "measured GEMM"
        except (RuntimeError, TypeError):
            _measured[key] = measure_gemm_flops(device, torch.float32), f"measured GEMM (float32; no {dtype} matmul)"
    return _measured[key]


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int) -> float:
    """Model-FLOPs utilisation as a fraction (0.42 = 42%) of `n_devices` x `peak`."""
    return tokens_per_s * flops_per_token / (peak * n_devices)
