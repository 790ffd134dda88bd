"""Progress with loss, throughput and ETA: a tqdm bar on a terminal, plain lines in logs (CI, clusters).

A bar redrawn with carriage returns turns a log file into one enormous line, so when stderr is not a
terminal the main process prints a self-contained status line every `plain_every` steps instead:

    [train] step 120/1000 (12%) loss 3.41 tok/s 5.2k mfu 3.1% eta 4m10s
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _rate(per_s: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:.1f}{suffix}"
    return f"{per_s:.0f}"


def _postfix(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if key == "tokens_per_s":
            parts.append(f"tok/s {_rate(value)}")
        elif key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " ".join(parts)


class Progress:
    """Shown by the main process only. The ETA counts steps done in this process, so a resumed run's
    estimate is not distorted by the steps it skipped. Postfix values persist until replaced, so a step
    that only reports the loss still shows the last throughput."""

    def __init__(self, total_steps: int, initial_step: int, is_main: bool, desc: str,
                 plain_every: int | None = None):
        self.total, self.start_step, self.desc = total_steps, initial_step, desc
        self.enabled = is_main
        self.started = time.perf_counter()
        self.plain_every = plain_every or max(1, total_steps // 20)
        self.next_plain = (initial_step // self.plain_every + 1) * self.plain_every
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True) \
            if self.enabled and sys.stderr.isatty() else None
        self.values: dict = {}

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        return (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else None

    def update(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.values.update({k: v for k, v in values.items() if v is not None})
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(_postfix(self.values), refresh=False)
        elif step >= self.next_plain or step == self.total:
            # crossing a threshold, not landing on a multiple: callers may update only every few steps
            self.next_plain = (step // self.plain_every + 1) * self.plain_every
            eta = self.eta(step)
            parts = [f"[{self.desc}] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)",
                     _postfix(self.values), f"eta {_duration(eta) if eta is not None else '?'}"]
            print(" ".join(p for p in parts if p), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

