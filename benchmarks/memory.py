"""A process's peak resident memory, standard library only: the workers that run in a peer's own virtual
environment (TRL 1.12's, without llmstack) read it too."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark. Linux's `ru_maxrss` keeps the launching process's peak across
    fork and exec (a harness that prepared the data in 900 MiB gave every contender at least that), so the
    kernel's per-address-space mark (`VmHWM`) is read where there is one."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
