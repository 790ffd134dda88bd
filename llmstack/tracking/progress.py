"""Progress with loss, throughput and ETA: a tqdm bar on a terminal, plain lines in logs (CI, clusters)."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _postfix(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if key == "tokens_per_s":
            parts.append(f"tok/s {value / 1e3:.1f}k")
        elif key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " ".join(parts)


class Progress:
    """Shown by the main process only. The ETA counts steps done in this process, so a resumed run's
    estimate is not distorted by the steps it skipped."""

    def __init__(self, total_steps: int, initial_step: int, is_main: bool, desc: str, plain_every: int | None = None):
        self.total, self.start_step, self.desc = total_steps, initial_step, desc
        self.enabled = is_main
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.plain_every = plain_every or max(1, total_steps // 20)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True) \
            if self.enabled and self.tty else None
        self.values: dict = {}

    def eta(self, step: int) -> float:
        done = step - self.start_step
        return (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else float("nan")

    def update(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.values.update(values)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(_postfix(self.values), refresh=False)
        elif step % self.plain_every == 0 or step == self.total:
            eta = self.eta(step)
            eta_text = _duration(eta) if eta == eta else "?"
            print(f"[{self.desc}] step {step}/{self.total} ({100 * step / self.total:.0f}%) "
                  f"{_postfix(self.values)} eta {eta_text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
