"""`llmstack pipeline`: curate -> pretrain -> SFT -> reward model -> alignment routes in one directory, then
REPORT.md. The routes after SFT (`routes`): PPO on the reward model, the same without the KL penalty, GRPO on
the reward model, GRPO on the gold rubric itself, and DPO on the annotators' rankings. With `start: sft` the
path begins at SFT from a pretrained checkpoint (configs/examples/smollm2/pipeline.yaml).

Each stage runs in `output_dir/<stage>/` and starts from the previous stage's `model/` (pretraining: the
curation run's `data/`) wherever its config says 'previous'. A finished stage is skipped on a re-run and an
interrupted one resumes, because each stage already behaves that way on its own directory. The report
(`llmstack.evaluation.report`) reads the stages' records and adds the measures only the pipeline can take:
answer accuracy before/after SFT, the reward model's agreement with the gold rubric, and every route's
policy read on the same fresh questions. This module sits above the trainers and evaluation, beside the
command line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmstack.config import PREVIOUS, PipelineConfig
from llmstack.config.schema import ROUTES
from llmstack.data.curate import curate
from llmstack.evaluation.report import write_report
from llmstack.trainers.base import log
from llmstack.trainers.dpo import dpo
from llmstack.trainers.ppo import ppo
from llmstack.trainers.pretrain import pretrain
from llmstack.trainers.reward import reward
from llmstack.trainers.sft import sft
from llmstack.tracking.run_dir import owns_output_dir

STAGES = (("curate", curate), ("pretrain", pretrain), ("sft", sft), ("reward", reward))
STAGES_BEFORE_SFT = ("curate", "pretrain")  # not run when the path starts from a pretrained checkpoint
# whose model/ a stage's 'previous' means: the reward model and every route's policy start from SFT
PARENT = {"sft": "pretrain", "reward": "sft", **{route: "sft" for route in ROUTES}}


def route_config(cfg: PipelineConfig, route: str):
    """(the stage function, its config) of one alignment route after SFT."""
    if route == "ppo":
        return ppo, cfg.ppo
    if route == "ppo-no-kl":  # the contrast: the same PPO with the KL penalty off
        return ppo, dataclasses.replace(cfg.ppo, ppo=dataclasses.replace(cfg.ppo.ppo, kl_coef=0.0, kl_target=None))
    if route == "grpo":
        return ppo, cfg.grpo
    if route == "grpo-gold":  # GRPO on the hidden rubric itself: the ceiling the reward model approximates
        return ppo, dataclasses.replace(cfg.grpo, reward_model=dataclasses.replace(cfg.grpo.reward_model,
                                                                                    name_or_path=None),
                                        reward_funcs=[cfg.gold_reward], reward_weights=[])
    return dpo, cfg.dpo


def _wired(cfg, root: Path, name: str, seed: int, overwrite: bool = False):
    """A stage's config with its run directory, seed and 'previous' model paths filled in; `overwrite` (the
    pipeline's overwrite_output_dir) carries over to every stage."""
    changes = {"output_dir": str(root / name), "seed": seed,
               "overwrite_output_dir": overwrite or cfg.overwrite_output_dir}
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


@owns_output_dir
def pipeline(cfg: PipelineConfig):
    """Run every stage that has not finished yet, then write REPORT.md; returns the last stage's result
    (None when every stage had already finished), or the interrupted stage's result."""
    root = Path(cfg.output_dir)
    skipped = STAGES_BEFORE_SFT if cfg.start == "sft" else ()
    runs = [(name, run_stage, getattr(cfg, name)) for name, run_stage in STAGES if name not in skipped]
    runs += [(route, *route_config(cfg, route)) for route in cfg.routes]
    result = None
    for name, run_stage, stage_cfg in runs:
        log.info(f"pipeline: stage {name} in {root / name}")
        result = run_stage(_wired(stage_cfg, root, name, cfg.seed, cfg.overwrite_output_dir))
        if result is not None and not result.completed:
            return result
    print(write_report(root, cfg))
    return result
