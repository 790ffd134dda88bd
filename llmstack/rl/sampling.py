"""Counter-based random draws for sampling: each row's noise is a pure function of (its seed, the decoding
step, the vocabulary column), so a row samples the same tokens whatever else shares its batch, its process
or its padding, on any device. torch's stateful generators cannot give that per row in one batched call.
"""

from __future__ import annotations

import torch


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts signed integers arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014): a bijection of 64-bit integers whose outputs for
    consecutive inputs pass statistical tests of randomness. int64 products wrap, as the algorithm needs."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(keys_B: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """U(0, 1) [B, n] in float64, a pure function of (key, step, column): counter-based, so it is the same
    for a row whatever else is computed, on any device."""
    row = _mix(keys_B.long() * _GOLDEN + _mix(torch.full_like(keys_B, step, dtype=torch.long) + 1))
    bits = _mix(row[:, None] + _GOLDEN * torch.arange(1, n + 1, device=keys_B.device))
    return (_shr(bits, 11).double() + 0.5) * 2.0 ** -53


def row_seeds(seed: int, step: int, index_B: torch.Tensor) -> torch.Tensor:
    """One sampling seed per (run seed, step, prompt index)."""
    run = _mix(torch.full_like(index_B, seed, dtype=torch.long) * _GOLDEN + step + 1)
    return _mix(run + (index_B.long() + 1) * _GOLDEN)


def gumbel_noise(seeds_B: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """Gumbel(0, 1) [B, n] in fp32: argmax(log p + this) is a draw from p (the Gumbel-max trick)."""
    return (-torch.log(-torch.log(uniform_noise(seeds_B, step, n)))).float()
