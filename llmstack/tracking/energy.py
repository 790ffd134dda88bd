"""Energy used by a run, where the hardware can tell: RAPL counters on CPUs (Linux powercap), NVML on
NVIDIA GPUs. Anywhere else the record says "unmeasured" and why; a number is never estimated or invented.
"""

from __future__ import annotations

from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")


def _rapl_domains(root: Path) -> list[Path]:
    """Top-level package domains (intel-rapl:0, intel-rapl:1, ...); their subdomains are already included."""
    return sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1 and (p / "energy_uj").is_file())


def _read_rapl(domains: list[Path]) -> list[int]:
    return [int((d / "energy_uj").read_text()) for d in domains]


class EnergyMeter:
    """`start()` then `stop() -> dict` for the record: {"joules", "source"} or {"unmeasured": reason}."""

    def __init__(self, rapl_root: Path = RAPL_ROOT):
        self.rapl_root = rapl_root
        self._rapl: list[Path] = []
        self._rapl_start: list[int] = []
        self._nvml_start: list[int] = []
        self._nvml_handles: list = []

    def start(self) -> None:
        try:
            self._rapl = _rapl_domains(self.rapl_root)
            self._rapl_start = _read_rapl(self._rapl)
        except (OSError, ValueError):
            self._rapl = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml_handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml_start = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._nvml_handles]
        except Exception:  # no pynvml, no driver, or a GPU without an energy counter: all mean "not measurable"
            self._nvml_handles = []

    def stop(self) -> dict:
        out: dict = {}
        if self._rapl:
            total = 0
            for domain, before, after in zip(self._rapl, self._rapl_start, _read_rapl(self._rapl)):
                wrap = int((domain / "max_energy_range_uj").read_text()) if (domain / "max_energy_range_uj").is_file() else 0
                total += after - before if after >= before else after + wrap - before
            out["cpu_joules"] = total / 1e6
        if self._nvml_handles:
            import pynvml

            now = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._nvml_handles]
            out["gpu_joules"] = sum(b - a for a, b in zip(self._nvml_start, now)) / 1e3  # millijoules
        if not out:
            return {"unmeasured": "no readable RAPL counters (/sys/class/powercap) and no NVML energy counter"}
        out["source"] = " + ".join(s for s, k in (("RAPL", "cpu_joules"), ("NVML", "gpu_joules")) if k in out)
        out["note"] = "this machine's whole CPU packages / GPUs, not this process alone"
        return out
