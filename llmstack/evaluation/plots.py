"""PNG figures of metrics.jsonl curves, for reports. matplotlib draws off-screen (Agg), so this works on
machines without a display; it is imported only when a figure is drawn."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` where it was logged, as a trailing mean over `smooth` points: single PPO
    rollouts are noisy, and the trend is what the eye should follow."""
    points = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    means = [sum(values[max(0, i + 1 - smooth):i + 1]) / len(values[max(0, i + 1 - smooth):i + 1])
             for i in range(len(values))]
    return steps, means


def plot_panels(path: Path, panels: list[tuple[str, dict[str, tuple[list, list]]]], title: str,
                xlabel: str = "step", markers: bool = False) -> Path:
    """One row of panels, each (y label, {curve label: (x, y)}), written as a PNG at `path`; `markers` draws
    each curve's points as markers (one point per curve: a scatter of labelled points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, "o" if markers else "-", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
