"""Energy used by a run: measured where the hardware can tell (RAPL counters on CPUs through Linux powercap,
NVML on NVIDIA GPUs), estimated from power x time everywhere else. Every figure says which it is
(`method`: measured or estimated) and how it was obtained (`source`).

The estimate, in order of preference:
- `train.power_watts`, a power the user states (a wall meter, a cloud provider's figure): watts x seconds;
- otherwise a CPU model: CPU_WATTS_PER_CORE x the cores the run's processes compute on x seconds. That is the
  thermal design power shared out per core, assumed drawn in full while training, which is what a training
  loop that keeps every core busy comes close to. GPUs without an energy counter are not included, and the
  record says so.
codecarbon estimates the same way (a CPU's TDP from its own table, or a constant, times time) where RAPL is
unreadable; it is not a dependency, so the constant below stands in for its table.
"""

from __future__ import annotations

import time
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")

# TDP per core of current x86 parts: a 65 W desktop chip with 8 cores gives 8.1 W, a 360 W server chip with
# 96 cores 3.75 W, a 125 W 16-core workstation chip 7.8 W; 6 W sits between them. An estimate, labelled so.
CPU_WATTS_PER_CORE = 6.0


def _rapl_domains(root: Path) -> list[Path]:
    """Top-level package domains (intel-rapl:0, intel-rapl:1, ...); their subdomains are already included."""
    return sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1 and (p / "energy_uj").is_file())


def _read_rapl(domains: list[Path]) -> list[int]:
    return [int((d / "energy_uj").read_text()) for d in domains]


def _cores_in_use(processes: int) -> int:
    import torch

    return torch.get_num_threads() * processes


def estimate(seconds: float, watts: float, source: str) -> dict:
    """The record's entry for an energy figure computed as `watts` x `seconds`."""
    return {"method": "estimated", "joules": watts * seconds, "watts": watts, "seconds": round(seconds, 3),
            "source": source}


class EnergyMeter:
    """`start()` then `stop() -> dict` for the record: measured {"method": "measured", "joules", "cpu_joules"
    and/or "gpu_joules", "source", "note"} or estimated (`estimate`). `power_watts`: the user's stated power;
    `processes`: how many processes of the run share this machine (each computes on torch's threads);
    `cores`: the cores in use, for work that is not torch's (e.g. single-threaded worker processes)."""

    def __init__(self, rapl_root: Path = RAPL_ROOT, power_watts: float | None = None, processes: int = 1,
                 cores: int | None = None):
        self.rapl_root = rapl_root
        self.power_watts = power_watts
        self.processes = processes
        self.cores = cores
        self._started = 0.0
        self._rapl: list[Path] = []
        self._rapl_start: list[int] = []
        self._nvml_start: list[int] = []
        self._nvml_handles: list = []

    def start(self) -> None:
        self._started = time.monotonic()
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
        seconds = time.monotonic() - self._started
        out = self._measured()
        if out:
            out["joules"] = sum(out.get(k, 0.0) for k in ("cpu_joules", "gpu_joules"))
            out["source"] = " + ".join(s for s, k in (("RAPL", "cpu_joules"), ("NVML", "gpu_joules")) if k in out)
            out["note"] = "this machine's whole CPU packages / GPUs, not this process alone"
            return {"method": "measured", **out}
        if self.power_watts is not None:
            out = estimate(seconds, self.power_watts, "stated power (train.power_watts) x wall time")
        else:
            cores = self.cores or _cores_in_use(self.processes)
            out = estimate(seconds, CPU_WATTS_PER_CORE * cores,
                           f"CPU model: {CPU_WATTS_PER_CORE:g} W per core x cores in use x wall time")
            out["cores"] = cores
            if _has_cuda():
                out["note"] = "GPUs have no readable energy counter here and are not included"
        return {**out, "why": "no readable RAPL or NVML counter"}

    def _measured(self) -> dict:
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
        return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def amount(joules: float) -> str:
    """Energy for a reader: kWh from one kWh up, Wh below."""
    return f"{joules / 3.6e6:.3g} kWh" if joules >= 3.6e6 else f"{joules / 3.6e3:.3g} Wh"


def energy_joules(energy: dict | None) -> tuple[float | None, str | None]:
    """(joules, 'measured' | 'estimated') of a record's energy entry; (None, None) when it has no figure.
    Entries written before `method` existed hold measured cpu_joules / gpu_joules."""
    if not energy or "unmeasured" in energy:
        return None, None
    if "joules" in energy:
        return energy["joules"], energy.get("method", "measured")
    parts = [energy[k] for k in ("cpu_joules", "gpu_joules") if k in energy]
    return (sum(parts), "measured") if parts else (None, None)


def combine(readings: list[dict]) -> dict:
    """One entry for a run's sessions (a resumed run has several): their joules summed, labelled estimated
    when any part was."""
    known = [(r, *energy_joules(r)) for r in readings]
    known = [(r, j, m) for r, j, m in known if j is not None]
    if not known:
        return readings[-1] if readings else {"unmeasured": "no session recorded energy"}
    if len(known) == 1 and len(readings) == 1:
        return readings[0]
    methods = {m for _, _, m in known}
    sources = list(dict.fromkeys(r.get("source", "?") for r, _, _ in known))
    out = {"method": "estimated" if "estimated" in methods else "measured",
           "joules": sum(j for _, j, _ in known), "source": "; ".join(sources), "sessions": len(known)}
    if len(known) < len(readings):
        out["note"] = f"{len(readings) - len(known)} session(s) recorded no energy and are not included"
    return out
