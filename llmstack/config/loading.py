"""Loading, validating and saving configurations: YAML files plus dotted `key=value` overrides, checked
against the dataclass schemas (types, `Literal` choices, numeric bounds in each field's `option`, and each
section's own `validate`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value is not acceptable; the message says which and what is allowed. One error
    may carry several problems (`problems`), all found in one pass, so a user fixes them in one go."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        unique = list(dict.fromkeys(problems))
        if len(unique) == 1:
            return cls(unique[0])
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(unique, 1))
        return cls(f"{len(unique)} problems: {listed}", unique)


class _Problems(list):
    """Problems found so far; `check` runs one check and keeps its ConfigError instead of stopping."""

    def check(self, fn, *args):
        try:
            return fn(*args)
        except ConfigError as err:
            self.extend(err.problems)
            return None


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A config field with its documentation and numeric bounds (ge: >=, gt: >, le: <=, lt: <)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file (optional) and `key=value` overrides; raise one ConfigError listing every
    problem (unknown keys, wrong types, out-of-range values, each section's own checks)."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    problems = _Problems()
    _check_keys(cls, data, "", source, problems)
    for item in overrides or []:
        problems.check(_apply_override, cls, data, item)
    cfg = _build(cls, data, "", problems=problems)
    if problems:
        raise ConfigError.of(problems)
    return cfg


def config_from_dict(cls: type, data: dict, source: str = "the settings given in Python"):
    """Build `cls` from a nested dict (as `config.yaml` holds it), with every check `load_config` makes."""
    problems = _Problems()
    _check_keys(cls, data, "", source, problems)
    cfg = _build(cls, data, "", problems=problems)
    if problems:
        raise ConfigError.of(problems)
    return cfg


def _apply_override(cls: type, data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command-line override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
    parts = key.split(".")
    problems = _Problems()
    _check_keys(cls, _nest(parts, None), "", f"command-line override {item!r}", problems)
    if problems:
        raise ConfigError.of(problems)
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _one_level_down(cls: type, hints: dict, key: str, prefix: str) -> list[str]:
    """`sft.max_steps` for `sft.train.max_steps`: the key exists in exactly one section just below."""
    found = [f"{prefix}{f.name}.{key}" for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
             and key in {g.name for g in dataclasses.fields(hints[f.name])}]
    return found if len(found) == 1 else []


def _check_keys(cls: type, data: dict, prefix: str, source: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names and key in getattr(cls, "MOVED", {}):
            parent = prefix[:-1].rpartition(".")[0]
            problems.append(f"config key '{dotted}' in {source} has moved: it is now "
                            f"'{parent + '.' if parent else ''}{cls.MOVED[key]}'")
            continue
        if key not in names:
            problems.append(_unknown_key(cls, hints, names, key, prefix, source))
            continue
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            _check_keys(sub, value, f"{dotted}.", source, problems)


# Hugging Face Trainer / TRL argument names -> what means the same here ({section} is the stage's own
# algorithm section where one exists). Answered wherever they appear, at the top level or in a section.
TRL_NAMES = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.batch_size (evaluation uses the training micro-batch)",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.max_steps (runs are counted in optimiser steps)",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_steps (in steps)",
    "weight_decay": "train.weight_decay",
    "lr_scheduler_type": "train.schedule",
    "max_grad_norm": "train.max_grad_norm",
    "adam_beta1": "train.adam_betas",
    "adam_beta2": "train.adam_betas",
    "bf16": "train.precision=bf16",
    "fp16": "train.precision=fp16",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "gradient_checkpointing": "gradient_checkpointing",
    "model_name_or_path": "model.name_or_path",
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "packing": "data.packing",
    "dataset_text_field": "data.train records with a 'text' field",
    "beta": "dpo.beta (DPO) or ppo.kl_coef (PPO/GRPO)",
    "loss_type": "dpo.loss (DPO) or ppo.loss_aggregation (GRPO)",
    "num_generations": "rollout.samples_per_prompt",
    "max_completion_length": "rollout.max_new_tokens",
    "max_new_tokens": "rollout.max_new_tokens",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "num_ppo_epochs": "ppo.epochs",
    "cliprange": "ppo.clip",
    "epsilon": "ppo.clip",
    "cliprange_value": "ppo.value_clip",
    "vf_coef": "ppo.value_lr (the value model has its own optimiser)",
    "kl_coef": "ppo.kl_coef",
    "missing_eos_penalty": "ppo.missing_eos_penalty",
    "use_peft": "lora.enabled",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "reward_model_path": "reward_model.name_or_path",
    "sft_model_path": "model.name_or_path",
}


def _unknown_key(cls: type, hints: dict, names: list[str], key: str, prefix: str, source: str) -> str:
    dotted = f"{prefix}{key}"
    # matched on the key alone: a shared section prefix would make unrelated keys look alike
    close = [f"{prefix}{n}" for n in difflib.get_close_matches(key, names, n=1, cutoff=0.6)] \
        or _one_level_down(cls, hints, key, prefix)
    if key in TRL_NAMES and not close:
        return f"unknown config key '{dotted}' in {source}: that is TRL/transformers' name; here it is " \
               f"'{TRL_NAMES[key]}'"
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    return f"unknown config key '{dotted}' in {source}.{hint} Keys allowed at {where}: {', '.join(names)}"


def _build(cls: type, data: dict, prefix: str, base=None, problems: _Problems | None = None):
    """`base` (default: `cls()`) with the keys of `data` replaced; sections keep their stage's defaults. A value
    that cannot be used is recorded in `problems` (or raised, without a list) and its default kept, so the
    remaining checks still run."""
    own = problems is None
    problems = _Problems() if own else problems
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, value, typ = f"{prefix}{f.name}", data[f.name], hints[f.name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                problems.append(f"config key '{key}': expected a section of keys, got {value!r}")
                continue
            kwargs[f.name] = _build(typ, value, f"{key}.", getattr(base, f.name), problems)
        else:
            try:
                kwargs[f.name] = _coerce(key, value, typ)
            except ConfigError as err:
                problems.extend(err.problems)
    obj = dataclasses.replace(base, **kwargs)
    if not prefix:
        _validate(obj, "", problems)
    if own and problems:
        raise ConfigError.of(problems)
    return obj


def _validate(obj, prefix: str, problems: _Problems) -> None:
    """Bounds of every number and each section's own `validate`, defaults included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{prefix}{f.name}.", problems)
        else:
            problems.check(_check_bounds, f"{prefix}{f.name}", value, f.metadata)
    if hasattr(obj, "validate"):
        problems.check(obj.validate, prefix[:-1] if prefix else "config")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) is list:
        return f"a list of {_type_name(typing.get_args(typ)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(typ, str(typ))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Return `value` as `typ`, or raise ConfigError naming key, value and the expected type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(typ):
            return None
        for arg in (a for a in typing.get_args(typ) if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin is Literal:
        allowed = typing.get_args(typ)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key '{key}': {value!r} is not allowed; allowed: "
                          f"{', '.join(repr(a) for a in allowed)}.{hint}")
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_type,) = typing.get_args(typ)
            return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept any finite numeral.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {_type_name(typ)}, got {value!r} ({type(value).__name__})")


def _check_bounds(key: str, value: Any, meta: Any) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    checks = (("ge", ">=", lambda v, lim: v >= lim), ("gt", ">", lambda v, lim: v > lim),
              ("le", "<=", lambda v, lim: v <= lim), ("lt", "<", lambda v, lim: v < lim))
    for name, word, holds in checks:
        limit = meta.get(name)
        if limit is not None and not holds(value, limit):
            raise ConfigError(f"config key '{key}': {value!r} is out of range; allowed: {word} {limit}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Saving and describing


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per key: dotted name, type, the stage's default and help; for `--help`."""
    lines = []
    hints = typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            lines += describe(typ, f"{key}.", getattr(defaults, f.name))
            continue
        lines.append(f"  {key} = {getattr(defaults, f.name)!r}  ({_type_name(typ)})  {f.metadata.get('help', '')}")
    return lines
