"""`llmstack report RUN_DIR`: follow a run's parent links back to the raw text."""

from __future__ import annotations

import json
from pathlib import Path


def lineage(run_dir: str | Path) -> list[dict]:
    """The run's record, then its parent's, and so on; stops at a parent that is not an llmstack run."""
    chain, seen = [], set()
    current: Path | None = Path(run_dir)
    while current is not None and (current / "record.json").is_file() and current.resolve() not in seen:
        seen.add(current.resolve())
        record = json.loads((current / "record.json").read_text())
        chain.append({"run_dir": str(current), **record})
        parent = record.get("parent") or {}
        current = Path(parent["run_dir"]) if "run_dir" in parent else None
    if not chain:
        raise FileNotFoundError(f"{run_dir} holds no record.json: not an llmstack run directory")
    return chain


def format_lineage(chain: list[dict]) -> str:
    lines = []
    for depth, record in enumerate(chain):
        inputs = ", ".join(f"{role}: {source.get('spec', source)}" for role, source in record.get("inputs", {}).items()
                           if isinstance(source, dict))
        metrics = record.get("metrics", {})
        headline = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("final_") and isinstance(v, float))
        lines.append(f"{'  ' * depth}{'<- ' if depth else ''}{record['stage']} [{record['status']}] {record['run_dir']}")
        lines.append(f"{'  ' * depth}   inputs: {inputs or '-'}; {headline or 'no metrics'}")
    last_parent = chain[-1].get("parent")
    if last_parent and "run_dir" not in last_parent:
        lines.append(f"{'  ' * len(chain)}<- {last_parent.get('model', last_parent)} (outside llmstack)")
    return "\n".join(lines)
