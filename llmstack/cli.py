"""`llmstack <stage> --config FILE [key=value ...]`; recipes/<stage>.py take exactly the same arguments."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
from typing import NoReturn

from llmstack.config import (ConfigError, CurateConfig, DPOConfig, GRPOConfig, PipelineConfig, PPOConfig,
                             PretrainConfig, RewardConfig, SFTConfig, describe, load_config)
from llmstack.trainers.base import NonFiniteLossError

# stage -> (config class, "module:function" run lazily so `--help` does not import torch-heavy code)
STAGES = {
    "curate": (CurateConfig, "llmstack.data.curate:curate"),
    "pretrain": (PretrainConfig, "llmstack.trainers.pretrain:pretrain"),
    "sft": (SFTConfig, "llmstack.trainers.sft:sft"),
    "reward": (RewardConfig, "llmstack.trainers.reward:reward"),
    "ppo": (PPOConfig, "llmstack.trainers.ppo:ppo"),
    "grpo": (GRPOConfig, "llmstack.trainers.ppo:ppo"),
    "dpo": (DPOConfig, "llmstack.trainers.dpo:dpo"),
    "pipeline": (PipelineConfig, "llmstack.pipeline:pipeline"),
}


def parse_stage_args(stage: str, argv: list[str] | None):
    config_cls, _ = STAGES[stage]
    parser = argparse.ArgumentParser(
        prog=f"llmstack {stage}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(config_cls.__doc__ or "").strip(),
        epilog="configuration keys (set in the YAML file or as key=value):\n" + "\n".join(describe(config_cls)))
    parser.add_argument("--config", help="YAML file with the run's configuration (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    return load_config(config_cls, args.config, args.overrides)


def run_stage(stage: str, argv: list[str] | None = None) -> int:
    """Run one stage and return the process exit code (0 done, 1 failed, 2 bad configuration, 128+N signal)."""
    try:
        cfg = parse_stage_args(stage, argv)
    except ConfigError as err:
        print(f"llmstack {stage}: configuration error: {err}", file=sys.stderr)
        return 2
    module, func = STAGES[stage][1].split(":")
    try:
        result = getattr(importlib.import_module(module), func)(cfg)
    except NonFiniteLossError as err:
        print(f"llmstack {stage}: {err}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    if result is not None and result.status == "interrupted":
        print(f"llmstack {stage}: interrupted at step {result.state.step}; a checkpoint was saved in "
              f"{cfg.output_dir}/checkpoints. Re-run the same command to resume.", file=sys.stderr)
        return 128 + result.signum
    return 0


def _close_process_group() -> None:
    """The process is about to exit: a gloo/NCCL group left open aborts some ranks at interpreter shutdown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Leave with `code`. A rank of a multi-process run leaves without interpreter teardown: a background
    thread of the distributed stack is now and then still joinable there, and C++ then aborts the process
    (SIGABRT, "terminate called without an active exception") after a run that finished and saved."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llmstack <stage> --config FILE [key=value ...]\n\nstages:")
        for name, (cls, _) in STAGES.items():
            print(f"  {name:10s} {(cls.__doc__ or '').strip()}")
        print("  annotate   llmstack annotate --model DIR --prompts FILE --k K --out DIR: a Label Studio ranking "
              "project of the model's answers")
        print("  report     llmstack report RUN_DIR: the run's lineage graph back to the raw text, time and energy")
        print("\n`llmstack <stage> --help` lists every configuration key.")
        sys.exit(0 if argv else 2)
    stage = argv[0]
    if stage == "annotate":
        from llmstack.evaluation.annotate import main as annotate

        sys.exit(annotate(argv[1:]))
    if stage == "report":
        from llmstack.tracking.lineage import format_report

        if len(argv) != 2:
            print("usage: llmstack report RUN_DIR", file=sys.stderr)
            sys.exit(2)
        print(format_report(argv[1]))
        sys.exit(0)
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"llmstack: unknown stage {stage!r}.{hint} Stages: {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    exit_process(run_stage(stage, argv[1:]))
