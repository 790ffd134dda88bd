"""Trainers to import: each stage as an object that takes Python objects, in the manner of transformers and TRL.

    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset,
                         config=SFTConfig(output_dir="runs/sft"), callbacks=[StopAt(3)])
    result = trainer.train()          # result.model, result.metrics, result.run_dir, result.status

`model` is a path or Hub name, or a `PreTrainedModel` or peft model object; data is a path, a `save_to_disk`
directory, a `datasets` name, a list of dicts, or a `datasets` `Dataset` / `IterableDataset` / `DatasetDict`;
`config` is a stage's config dataclass, a dict of the same keys, or a YAML path. The trainer puts the objects
in the configuration as `memory:` names (`llmstack.config.objects`) and calls the same stage function as the
command line, so there is one code path; the run directory, its record and its resume work as for a command.

The object given is never trained in place: the stage trains a copy, and `result.model` is the trained model
as saved in `run_dir/model` (loaded back from there when the run had finished before).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from llmstack.config import (ConfigError, DPOConfig, GRPOConfig, PPOConfig, PretrainConfig, RewardConfig, SFTConfig,
                             config_from_dict, objects, to_dict)


@dataclass
class TrainResult:
    """What `train()` gives back: the trained model (unwrapped, adapters merged when the config merges them),
    the record's final metrics, the run directory and how the run ended (`finished`, `stopped` by a callback
    with `reason`, or `interrupted` by a signal: then no model)."""

    model: Any
    metrics: dict
    run_dir: Path
    status: str
    reason: str | None = None
    record: dict = field(default_factory=dict)


class _Trainer:
    config_class: type = None
    stage: str = ""
    function: str = ""

    def __init__(self, model=None, tokenizer=None, train_dataset=None, eval_dataset=None, config=None,
                 callbacks=(), output_dir: str | None = None):
        self._data = self._settings(config)
        if output_dir is not None:
            self._data["output_dir"] = str(output_dir)
        if model is not None:
            if tokenizer is None and not isinstance(model, (str, Path)):
                raise ConfigError(f"{type(self).__name__}: a model object comes with its tokenizer: pass "
                                  "tokenizer= (an object or a path)")
            self._set_model("model", model)
        if tokenizer is not None:
            self._data.setdefault("model", {})["tokenizer"] = _tokenizer_spec(tokenizer)
        train, default_eval = _dataset_specs(train_dataset)
        if train is not None:
            self._data.setdefault("data", {})["train"] = train
        eval_spec = _dataset_specs(eval_dataset)[0] if eval_dataset is not None else default_eval
        if eval_spec is not None and (eval_dataset is not None or hasattr(self.config_class().data, "eval")):
            self._data.setdefault("data", {})["eval"] = eval_spec
        self.callbacks = list(callbacks)
        self.extra: dict = {}

    def _settings(self, config) -> dict:
        if config is None:
            return {}
        if isinstance(config, (str, Path)):
            data = yaml.safe_load(Path(config).read_text()) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"config file {config} must hold a mapping of keys, got {type(data).__name__}")
            return data
        if dataclasses.is_dataclass(config):
            if not isinstance(config, self.config_class):
                raise ConfigError(f"{type(self).__name__} takes a {self.config_class.__name__}, got "
                                  f"{type(config).__name__}")
            return to_dict(config)
        if isinstance(config, dict):
            return json.loads(json.dumps(config))  # a deep copy; the caller's dict is left as it was
        raise ConfigError(f"config: expected a {self.config_class.__name__}, a dict or a YAML path, got "
                          f"{type(config).__name__}")

    def _set_model(self, section: str, model) -> None:
        spec, lora = _model_spec(model)
        target = self._data.setdefault(section, {})
        target["name_or_path"] = spec
        if section == "model":
            target["preset"] = None
        if lora:
            self._data.setdefault("lora", {}).update(lora)

    @property
    def config(self):
        """The resolved configuration, with every check of the command line."""
        return config_from_dict(self.config_class, self._data)

    def train(self) -> TrainResult:
        cfg = self.config
        module, name = self.function.split(":")
        result = getattr(importlib.import_module(module), name)(cfg, callbacks=self.callbacks, **self.extra)
        return _result(cfg, result)


def _result(cfg, result) -> TrainResult:
    from llmstack.models.causal_lm import load_causal_lm

    run_dir = Path(cfg.output_dir)
    record = json.loads((run_dir / "record.json").read_text()) if (run_dir / "record.json").is_file() else {}
    if result is None:  # finished before: nothing was trained in this call
        model = load_causal_lm(str(run_dir / "model")) if (run_dir / "model").is_dir() else None
        return TrainResult(model, record.get("metrics", {}), run_dir, record.get("status", "finished"),
                           record.get("stop_reason"), record)
    return TrainResult(result.model, record.get("metrics", {}), run_dir, result.status, result.reason, record)


def _model_spec(model) -> tuple[str, dict]:
    """(config value, LoRA settings) for a model given as a path, a Hub name or an object. A peft model's own
    adapter settings become the run's `lora` section, and its base model (with any trained adapters merged)
    the starting weights."""
    if isinstance(model, (str, Path)):
        return str(model), {}
    lora = {}
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        import copy

        peft = model.peft_config[getattr(model, "active_adapter", "default")]
        lora = {"enabled": True, "r": int(peft.r), "alpha": int(peft.lora_alpha),
                "dropout": float(peft.lora_dropout), "target_modules": sorted(peft.target_modules)}
        model = copy.deepcopy(model).merge_and_unload()
    if not hasattr(model, "state_dict") or not hasattr(model, "config"):
        raise ConfigError(f"model: expected a path, a Hub name or a Hugging Face model object, got "
                          f"{type(model).__name__}")
    digest, params = objects.weights_sha256(model)
    description = {"class": type(model).__name__, "parameters": params, "weights_sha256": digest}
    return objects.register(model, "model", digest, description), lora


def _tokenizer_spec(tokenizer) -> str:
    if isinstance(tokenizer, (str, Path)):
        return str(tokenizer)
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}|{vocab}|{tokenizer.chat_template}".encode()).hexdigest()
    return objects.register(tokenizer, "tokenizer", digest,
                            {"class": type(tokenizer).__name__, "vocabulary": len(tokenizer), "sha256": digest})


def _dataset_specs(data) -> tuple[str | None, str | None]:
    """(training data, held-out data) config values for data given as a path or name or as records. A
    `DatasetDict` gives its `train` split and, as held-out data, its `validation` or `test` split."""
    if data is None:
        return None, None
    if isinstance(data, (str, Path)):
        return str(data), None
    splits = _splits(data)
    if splits is not None:
        if "train" not in splits:
            raise ConfigError(f"train_dataset: a DatasetDict without a 'train' split (it has: {', '.join(splits)}); "
                              "pass the split to train on")
        held = next((splits[name] for name in ("validation", "test") if name in splits), None)
        return _records_spec(splits["train"]), (_records_spec(held) if held is not None else None)
    return _records_spec(data), None


def _splits(data) -> dict | None:
    try:
        import datasets
    except ImportError:
        return None
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return dict(data)
    return None


def _records_spec(data) -> str:
    kind = type(data).__name__
    if kind == "IterableDataset":
        # a stream is read once, by the run: fingerprinting it here would consume it or read it twice
        digest = hashlib.sha256(f"{kind}|{id(data)}".encode()).hexdigest()
        return objects.register(data, "dataset", digest, {"class": kind, "streamed": True,
                                                          "fingerprint": "not computed: a stream is read once"})
    if kind == "Dataset" or isinstance(data, (list, tuple)):
        records = list(data) if kind != "Dataset" else data
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ConfigError(f"dataset record {bad}: expected a dict of fields, got {type(records[bad]).__name__}")
        digest, count = objects.records_sha256(records)
        return objects.register(records, "dataset", digest, {"class": kind, "records": count,
                                                             "records_sha256": digest})
    raise ConfigError(f"dataset: expected a path, a datasets name, a list of dicts or a datasets Dataset, got {kind}")


def _function_spec(fn: Callable, kind: str, name: str | None = None) -> str:
    if isinstance(fn, str):
        return fn
    if not callable(fn):
        raise ConfigError(f"{kind}: expected a function or a 'package.module:function' name, got {type(fn).__name__}")
    name = name or getattr(fn, "__name__", type(fn).__name__)
    where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', name)}"
    digest = hashlib.sha256(f"{where}|{id(fn)}".encode()).hexdigest()
    return objects.register(fn, kind, digest, {"name": name, "function": where})


class PretrainTrainer(_Trainer):
    """Causal-LM pretraining. `model` may be omitted: the config's preset is built with fresh weights."""

    config_class, stage, function = PretrainConfig, "pretrain", "llmstack.trainers.pretrain:pretrain"


class SFTTrainer(_Trainer):
    """Supervised fine-tuning on language-modelling or prompt-completion records (TRL's types)."""

    config_class, stage, function = SFTConfig, "sft", "llmstack.trainers.sft:sft"


class RewardTrainer(_Trainer):
    """A reward model from preference pairs or rankings; `model` is the backbone (a causal LM) or a
    one-label sequence classifier."""

    config_class, stage, function = RewardConfig, "reward", "llmstack.trainers.reward:reward"


class DPOTrainer(_Trainer):
    """DPO on preference pairs or rankings; the reference is the starting model."""

    config_class, stage, function = DPOConfig, "dpo", "llmstack.trainers.dpo:dpo"


class PPOTrainer(_Trainer):
    """The RL loop (PPO with a value model by default). Rewards come from `reward_model` (a reward stage's
    model, as a path or object) and/or `reward_funcs`: functions `f(prompts, completions, **columns) -> list of
    floats` (a list, or a dict name -> function) or built-in names; `metrics` are logged functions
    `f(prompts, completions)`. `train_dataset` holds the prompts."""

    config_class, stage, function = PPOConfig, "ppo", "llmstack.trainers.ppo:ppo"

    def __init__(self, model=None, tokenizer=None, train_dataset=None, eval_dataset=None, config=None,
                 callbacks=(), output_dir: str | None = None, reward_model=None, value_model=None,
                 reward_funcs=(), metrics=()):
        super().__init__(model, tokenizer, train_dataset, eval_dataset, config, callbacks, output_dir)
        if reward_model is not None:
            self._set_model("reward_model", reward_model)
        if value_model is not None:
            self._set_model("value_model", value_model)
        named = reward_funcs.items() if isinstance(reward_funcs, dict) else [(None, f) for f in reward_funcs]
        if named:
            self._data["reward_funcs"] = [*self._data.get("reward_funcs", []),
                                          *(_function_spec(f, "reward", n) for n, f in named)]
        named = metrics.items() if isinstance(metrics, dict) else [(None, f) for f in metrics]
        if named:
            self._data["metrics"] = [*self._data.get("metrics", []),
                                     *(_function_spec(f, "metric", n) for n, f in named)]


class GRPOTrainer(PPOTrainer):
    """The RL loop with GRPO's defaults: groups of answers per prompt, no value model."""

    config_class, stage = GRPOConfig, "grpo"
