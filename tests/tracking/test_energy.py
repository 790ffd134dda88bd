import sys

import torch

from llmstack.tracking import energy
from llmstack.tracking.energy import EnergyMeter, energy_joules


def test_rapl_counters_are_summed_across_packages_and_wraparound(tmp_path):
    for name, start in (("intel-rapl:0", 1_000_000), ("intel-rapl:1", 9_000_000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "energy_uj").write_text(str(start))
        (tmp_path / name / "max_energy_range_uj").write_text("10000000")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subdomain: already counted in its package
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("5")
    meter = EnergyMeter(rapl_root=tmp_path)
    meter.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3500000")  # +2.5 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500000")  # wrapped: +1.5 J
    result = meter.stop()
    assert result["cpu_joules"] == 4.0 and result["source"] == "RAPL"


class Clock:
    """time.monotonic that reads what the test sets."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _without_counters(monkeypatch, clock):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a machine without NVIDIA's library
    monkeypatch.setattr(energy.time, "monotonic", clock)
    monkeypatch.setattr(energy, "_has_cuda", lambda: False)


def test_a_stated_power_times_the_wall_time_is_the_estimate(tmp_path, monkeypatch):
    clock = Clock()
    _without_counters(monkeypatch, clock)
    meter = EnergyMeter(rapl_root=tmp_path, power_watts=250.0)
    meter.start()
    clock.now += 90 * 60  # an hour and a half at 250 W: 0.375 kWh = 1,350,000 J
    result = meter.stop()
    assert result["method"] == "estimated" and result["watts"] == 250.0 and "train.power_watts" in result["source"]
    assert result["joules"] == 1_350_000.0 and result["joules"] / 3.6e6 == 0.375


def test_without_a_stated_power_the_cpu_model_counts_the_cores_in_use(tmp_path, monkeypatch):
    clock = Clock()
    _without_counters(monkeypatch, clock)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    meter = EnergyMeter(rapl_root=tmp_path, processes=2)
    meter.start()
    clock.now += 10.0
    result = meter.stop()
    # 3 threads in each of 2 processes, 6 W per core, 10 s: 360 J
    assert result["method"] == "estimated" and result["joules"] == 6 * 3 * 2 * 10.0 == 360.0
    assert result["cores"] == 6 and result["watts"] == 36.0 and "6 W per core" in result["source"]


def test_measured_figures_are_labelled_so_and_summed(tmp_path):
    (tmp_path / "intel-rapl:0").mkdir()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("0")
    meter = EnergyMeter(rapl_root=tmp_path, power_watts=250.0)  # a counter wins over a stated power
    meter.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("7000000")
    result = meter.stop()
    assert result["method"] == "measured" and result["joules"] == result["cpu_joules"] == 7.0
    assert energy_joules(result) == (7.0, "measured")
    assert energy_joules({"cpu_joules": 2.0, "gpu_joules": 3.0}) == (5.0, "measured")  # records before `method`
    assert energy_joules({"unmeasured": "why"}) == (None, None)
