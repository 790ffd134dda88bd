import sys

from llmstack.tracking.energy import EnergyMeter


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


def test_without_counters_the_record_says_unmeasured(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a machine without NVIDIA's library
    meter = EnergyMeter(rapl_root=tmp_path)
    meter.start()
    assert "unmeasured" in meter.stop()
