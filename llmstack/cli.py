"""`llmstack <stage> --config FILE [key=value ...]`; recipes/<stage>.py take exactly the same arguments."""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import yaml

from llmstack.config import (ConfigError, CurateConfig, DPOConfig, GRPOConfig, PipelineConfig, PPOConfig,
                             PretrainConfig, RewardConfig, SFTConfig, describe, load_config)
from llmstack.data.sources import DataError
from llmstack.smoke import STAND_IN as SMOKE_STAGES  # the stages a smoke run knows how to shrink
from llmstack.trainers.base import NonFiniteLossError

# errno -> what a user is told for the file-system failures they can act on
_FREE = "free some space, then re-run the same command (it resumes from the last checkpoint)"
_ACCESS = "check the path's permissions, or choose another output_dir"
FILE_SYSTEM_ERRORS = {errno.ENOSPC: ("no space left on the device", _FREE),
                      errno.EDQUOT: ("disk quota exceeded", _FREE),
                      errno.EROFS: ("read-only file system", _ACCESS),
                      errno.EACCES: ("permission denied", _ACCESS), errno.EPERM: ("permission denied", _ACCESS)}

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


def stage_parser(stage: str) -> argparse.ArgumentParser:
    config_cls, _ = STAGES[stage]
    parser = argparse.ArgumentParser(
        prog=f"llmstack {stage}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(config_cls.__doc__ or "").strip(),
        epilog="configuration keys (set in the YAML file or as key=value):\n" + "\n".join(describe(config_cls)))
    parser.add_argument("--config", help="YAML file with the run's configuration (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    if stage in SMOKE_STAGES:
        parser.add_argument("--smoke", action="store_true",
                            help="check the configuration, data and launch: a few steps on a tiny model of the "
                                 "same architecture family, into <output_dir>-smoke (llmstack.smoke)")
    return parser


def example_command(stage: str) -> str:
    """A command that runs `stage` on the built-in tiny task, with the stages it needs before it."""
    before = {"sft": ["pretrain"], "reward": ["pretrain"], "dpo": ["pretrain", "sft"],
              "ppo": ["pretrain", "sft", "reward"], "grpo": ["pretrain", "sft", "reward"]}.get(stage, [])
    after = f" (after {', '.join(f'llmstack {b} --config configs/tiny/{b}.yaml' for b in before)})" if before else ""
    return f"for example: llmstack {stage} --config configs/tiny/{stage}.yaml{after}"


def _refuse_empty(path: str | None) -> None:
    """A config file with no settings is a mistake (a wrong file, one not yet written), not a request for the
    full default run."""
    if path is None or not Path(path).is_file():
        return
    try:
        empty = yaml.safe_load(Path(path).read_text()) is None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # load_config reports it
    if empty:
        raise ConfigError(f"config file {path} holds no settings (it is empty or all comments); write the keys "
                          "to set, or leave --config out to run the built-in defaults on purpose")


def run_stage(stage: str, argv: list[str] | None = None) -> int:
    """Run one stage and return the process exit code (0 done, 1 failed, 2 bad configuration or data, 128+N
    signal); a failure is reported as one line on stderr (with its traceback when LLMSTACK_DEBUG=1)."""
    args = stage_parser(stage).parse_args(argv)
    try:
        _refuse_empty(args.config)
        cfg = load_config(STAGES[stage][0], args.config, args.overrides)
    except ConfigError as err:
        hint = "" if args.config else f"; no --config was given, {example_command(stage)}"
        print(f"llmstack {stage}: configuration error: {err}{hint}", file=sys.stderr)
        return 2
    if getattr(args, "smoke", False):
        from llmstack.smoke import smoke_config

        try:
            cfg = smoke_config(stage, cfg)
        except (ConfigError, ValueError) as err:
            print(f"llmstack {stage} --smoke: {err}", file=sys.stderr)
            return 2
    module, func = STAGES[stage][1].split(":")
    try:
        result = getattr(importlib.import_module(module), func)(cfg)
    except (ConfigError, DataError) as err:
        return report_error(stage, err, 2)
    except KeyboardInterrupt as err:
        return report_error(stage, err, 130)
    except Exception as err:  # noqa: BLE001 - every failure leaves as one line (a traceback with LLMSTACK_DEBUG=1)
        return report_error(stage, err, 1)
    finally:
        _close_process_group()
    if result is not None and result.status == "interrupted":
        print(f"llmstack {stage}: interrupted at step {result.state.step}; a checkpoint was saved in "
              f"{cfg.output_dir}/checkpoints. Re-run the same command to resume.", file=sys.stderr)
        return 128 + result.signum
    return 0


def debugging() -> bool:
    """LLMSTACK_DEBUG=1: errors come with their traceback."""
    return os.environ.get("LLMSTACK_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def describe_error(err: BaseException) -> str:
    """One line saying what went wrong: llmstack's own errors as they are, others with their type, and the
    file-system errors a user can act on (a full disk, a read-only or forbidden path) named as such."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C twice, or before training started); re-run the same command to resume"
    if isinstance(err, OSError) and err.errno in FILE_SYSTEM_ERRORS:
        what, todo = FILE_SYSTEM_ERRORS[err.errno]
        return f"{what}" + (f": {err.filename}" if err.filename else "") + f"; {todo}"
    message = " ".join(str(err).split())
    if isinstance(err, (ConfigError, DataError, NonFiniteLossError)):
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def report_error(stage: str, err: BaseException, code: int) -> int:
    """Print `err` once per run (the process of rank 0) as one line, and return the exit code `code`."""
    if debugging():
        traceback.print_exception(err)
    if int(os.environ.get("RANK", "0")) == 0:
        kind = {ConfigError: "configuration error: ", DataError: "data error: "}
        prefix = next((text for cls, text in kind.items() if isinstance(err, cls)), "")
        hint = " (LLMSTACK_DEBUG=1 shows the traceback)" if code == 1 and not debugging() else ""
        print(f"llmstack {stage}: {prefix}{describe_error(err)}{hint}", file=sys.stderr)
    return code


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
        try:
            print(format_report(argv[1]))
        except (OSError, ValueError) as err:
            sys.exit(report_error("report", err, 2 if isinstance(err, FileNotFoundError) else 1))
        sys.exit(0)
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"llmstack: unknown stage {stage!r}.{hint} Stages: {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    exit_process(run_stage(stage, argv[1:]))
