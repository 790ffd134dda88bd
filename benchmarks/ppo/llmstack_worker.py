"""llmstack's PPO stage as one contender, alone in this process; prints one JSON line of results.

    python -m benchmarks.ppo.llmstack_worker SETUP_DIR OUT_DIR [ENGINE]

ENGINE is `rollout.engine` (default: auto, what a run gets without setting it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.ppo.clock import Clock, report
from benchmarks.ppo.spec import Work, llmstack_overrides


def main(argv: list[str]) -> None:
    setup, out = Path(argv[0]), Path(argv[1])
    engine = argv[2] if len(argv) > 2 else "auto"
    work = Work.load(setup / "work.json")
    from llmstack.config import PPOConfig, load_config
    from llmstack.trainers import ppo as stage

    cfg = load_config(PPOConfig, None, llmstack_overrides(work, str(setup / "policy"), str(setup / "reward"),
                                                          str(setup / "prompts.jsonl"), str(out), engine))
    clock = Clock()
    # the loop looks these up in the module at every step, so the timed versions are the ones it calls
    stage.generate = clock.generation(
        stage.generate, lambda exp, *args: (exp.response_ids.numel(), exp.mask.sum(-1).float().mean()))
    stage.score = clock.scoring_end(stage.score)
    stage.ppo(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report(clock, [r["reward"] for r in rows], [r["kl"] for r in rows])


if __name__ == "__main__":
    main(sys.argv[1:])
