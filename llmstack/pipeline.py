"""`llmstack pipeline`: curate -> pretrain -> SFT -> reward model -> PPO in one directory, then REPORT.md.

Each stage runs in `output_dir/<stage>/` and starts from the previous stage's `model/` (pretraining: the
curation run's `data/`) wherever its config says 'previous'. A finished stage is skipped on a re-run and an
interrupted one resumes, because each stage already behaves that way on its own directory. The report
(`llmstack.evaluation.report`) reads the stages' records and adds the measures only the pipeline can take:
answer accuracy before/after SFT, the reward model's agreement with the gold rubric, and PPO with the KL
penalty switched off. This module sits above the trainers and evaluation, beside the command line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmstack.config import PREVIOUS, PipelineConfig
from llmstack.data.curate import curate
from llmstack.evaluation.report import write_report
from llmstack.trainers.base import log
from llmstack.trainers.ppo import ppo
from llmstack.trainers.pretrain import pretrain
from llmstack.trainers.reward import reward
from llmstack.trainers.sft import sft

STAGES = (("curate", curate), ("pretrain", pretrain), ("sft", sft), ("reward", reward), ("ppo", ppo))
# whose model/ a stage's 'previous' means: the reward model and the PPO policy both start from SFT
PARENT = {"sft": "pretrain", "reward": "sft", "ppo": "sft", "ppo-no-kl": "sft"}


def _wired(cfg, root: Path, name: str, seed: int):
    """A stage's config with its run directory, seed and 'previous' model paths filled in."""
    changes = {"output_dir": str(root / name), "seed": seed}
    if name == "pretrain" and cfg.data.train == PREVIOUS:
        changes["data"] = dataclasses.replace(cfg.data, train=str(root / "curate" / "data"))
    model = getattr(cfg, "model", None)
    if model is not None and model.name_or_path == PREVIOUS:
        if name not in PARENT:
            raise ValueError(f"{name}.model.name_or_path: the first stage has no previous stage to start from")
        changes["model"] = dataclasses.replace(model, name_or_path=str(root / PARENT[name] / "model"))
    if getattr(cfg, "reward_model", None) is not None and cfg.reward_model.name_or_path == PREVIOUS:
        changes["reward_model"] = dataclasses.replace(cfg.reward_model, name_or_path=str(root / "reward" / "model"))
    return dataclasses.replace(cfg, **changes)


def pipeline(cfg: PipelineConfig):
    """Run every stage that has not finished yet, then write REPORT.md; returns the last stage's result
    (None when every stage had already finished), or the interrupted stage's result."""
    root = Path(cfg.output_dir)
    runs = [(name, run_stage, getattr(cfg, name)) for name, run_stage in STAGES]
    if cfg.contrast_without_kl:
        no_kl = dataclasses.replace(cfg.ppo, ppo=dataclasses.replace(cfg.ppo.ppo, kl_coef=0.0, kl_target=None))
        runs.append(("ppo-no-kl", ppo, no_kl))
    result = None
    for name, run_stage, stage_cfg in runs:
        log.info(f"pipeline: stage {name} in {root / name}")
        result = run_stage(_wired(stage_cfg, root, name, cfg.seed))
        if result is not None and result.status != "finished":
            return result
    print(write_report(root, cfg))
    return result
