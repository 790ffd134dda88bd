import math

import pytest
import torch

import llmstack.tracking.mfu as mfu_mod
from llmstack.tracking.mfu import mfu, peak_flops, transformer_flops_per_token


def test_flops_per_token_by_hand():
    # 6 * 1000 weights + 12 * 2 layers * 8 hidden * 16 tokens = 6000 + 3072
    assert transformer_flops_per_token(1000, 2, 8, 16) == 9072.0
    # GPT-2 small at its full context: 6 * 124e6 + 12 * 12 * 768 * 1024
    assert transformer_flops_per_token(124_000_000, 12, 768, 1024) == 744_000_000 + 113_246_208


def test_mfu_is_a_fraction_of_all_devices_peak():
    assert mfu(tokens_per_s=1000, flops_per_token=1e9, peak=1e12, n_devices=2) == pytest.approx(0.5)
    assert mfu(tokens_per_s=3000, flops_per_token=2e9, peak=312e12, n_devices=8) == pytest.approx(6e12 / 2.496e15)


def test_override_wins():
    assert peak_flops(torch.device("cpu"), torch.float32, override=5e12) == (5e12, "override")


@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 PCIe", torch.bfloat16, False, (756e12, "table: H100 PCIe")),
    ("NVIDIA H100 80GB HBM3", torch.float16, False, (989e12, "table: H100")),
    ("NVIDIA L40S", torch.bfloat16, False, (362e12, "table: L40S")),
    ("NVIDIA L4", torch.bfloat16, False, (121e12, "table: L4")),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, (156e12, "table: A100 (tf32)")),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, (19.5e12, "table: A100 (fp32)")),
    ("AMD Instinct MI300X", torch.bfloat16, False, (1307e12, "table: MI300X")),
])
def test_table_lookup_by_device_name(monkeypatch, name, dtype, tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(mfu_mod, "_tf32_enabled", lambda: tf32)
    assert peak_flops(torch.device("cuda", 0), dtype) == expected


def test_unknown_gpu_is_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(mfu_mod, "_measured", {})
    monkeypatch.setattr(mfu_mod, "measure_gemm_flops", lambda device, dtype: 7e13)
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == (7e13, "measured GEMM")


def test_cpu_peak_is_measured_once_and_cached(monkeypatch):
    calls = []
    real = mfu_mod.measure_gemm_flops

    def counted(device, dtype):
        calls.append((device.type, dtype))
        return real(device, dtype, seconds=0.1)

    monkeypatch.setattr(mfu_mod, "_measured", {})
    monkeypatch.setattr(mfu_mod, "measure_gemm_flops", counted)
    rate, source = peak_flops(torch.device("cpu"), torch.float32)
    assert source == "measured GEMM" and math.isfinite(rate) and 1e8 < rate < 1e15
    assert peak_flops(torch.device("cpu"), torch.float32) == (rate, source)
    assert calls == [("cpu", torch.float32)]


def test_a_dtype_without_matmul_falls_back_to_fp32(monkeypatch):
    def measure(device, dtype):
        if dtype != torch.float32:
            raise RuntimeError("addmm not implemented for this dtype")
        return 4e10

    monkeypatch.setattr(mfu_mod, "_measured", {})
    monkeypatch.setattr(mfu_mod, "measure_gemm_flops", measure)
    rate, source = peak_flops(torch.device("cpu"), torch.float16)
    assert rate == 4e10 and source.startswith("measured GEMM (float32")


def test_gemm_rate_matches_flop_count_over_time():
    # 2 * 256^3 FLOPs per matmul; any real CPU does that in well under a second and over a microsecond
    rate = mfu_mod.measure_gemm_flops(torch.device("cpu"), torch.float32, size=256, seconds=0.05)
    assert 2 * 256**3 / 1.0 < rate < 2 * 256**3 / 1e-6
