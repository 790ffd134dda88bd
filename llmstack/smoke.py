"""`--smoke`: a stage's own configuration and data, run for a few steps on a tiny model of the same family.

For users' CI: it checks that a configuration loads, its data reads and the stage runs end to end, with no GPU
and no real weights. What changes, each said in one log line:
- every model the configuration names (policy, reward and value models) becomes a two-layer model of the same
  architecture family with random weights (`llmstack.models.architectures`), held in memory;
- the tokenizer is the model's own where it can be read offline; otherwise a small byte-level BPE is trained on
  the smoke data;
- data is read as configured, first records only; a source that cannot be read here (a Hub dataset offline, a
  path produced by an earlier stage) is replaced by built-in records of the same type;
- the run takes 3 steps of small batches into `<output_dir>-smoke`, so the real run directory is never touched;
  without CUDA it runs in fp32.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from llmstack.config import config_from_dict, objects, to_dict

log = logging.getLogger("llmstack")

STEPS = 3
RECORDS = 64  # records read from each data source: enough for a few batches and a held-out slice
SMALL = {  # section -> key -> value, applied where the stage has the key
    "train": dict(max_steps=STEPS, batch_size=2, grad_accum=1, warmup_steps=0, log_every=1, eval_every=STEPS,
                  eval_batches=1, save_every=STEPS, report_to=[]),
    "data": dict(max_length=128, block_size=64, max_prompt_length=64, streaming=False, eval_fraction=0.1),
    "rollout": dict(batch_size=2, max_new_tokens=8),
    "dpo": dict(kl_prompts=2, kl_max_new_tokens=8),
    "lora": dict(load_in_4bit=False),
    "value_lora": dict(load_in_4bit=False),
    "": dict(sample_prompts=1, sample_max_new_tokens=8, samples_per_step=1),
}
# the reader of each stage's data, for the built-in records that stand in for an unreadable source
STAND_IN = {"pretrain": "synthetic:200", "sft": "synthetic:64", "reward": "synthetic:32", "dpo": "synthetic:32",
            "ppo": "synthetic:32", "grpo": "synthetic:32"}


def note(message: str) -> None:
    log.warning(f"smoke: {message}")


def smoke_config(stage: str, cfg):
    """`cfg` shrunk for a smoke run of `stage` (see the module's docstring)."""
    import torch

    if stage not in STAND_IN:
        raise ValueError(f"--smoke runs a training stage ({', '.join(STAND_IN)}), not {stage}")
    data = to_dict(cfg)
    for section, values in SMALL.items():
        target = data if not section else data.get(section)
        if isinstance(target, dict):
            target.update({k: v for k, v in values.items() if k in target})
    data["output_dir"] = f"{str(cfg.output_dir).rstrip('/')}-smoke"
    if not torch.cuda.is_available() and data["train"]["precision"] != "fp32":
        note(f"train.precision={data['train']['precision']} runs as fp32 without CUDA (CPU autocast is slow on CPUs "
             "without native bf16, and a smoke run checks the configuration, not the numerics)")
        data["train"]["precision"] = "fp32"
    for key in ("train", "eval", "ptx"):
        spec = data["data"].get(key)
        if spec:
            data["data"][key] = _smoke_data(stage, f"data.{key}", spec)
    if data["data"]["train"].startswith("synthetic") and "format" in data["data"]:
        data["data"]["format"] = "auto"
    model = data["model"]
    if model.get("name_or_path"):
        tokenizer = _tokenizer(model.get("tokenizer") or model["name_or_path"], data["data"]["train"])
        model.update(name_or_path=_tiny_model(model["name_or_path"], tokenizer, "model"),
                     tokenizer=_register_tokenizer(tokenizer), gguf_file=None)
        for section in ("reward_model", "value_model"):
            name = (data.get(section) or {}).get("name_or_path")
            if name:
                data[section]["name_or_path"] = _tiny_model(name, tokenizer, section, classifier=True)
    else:  # a preset: the smallest one, with a small trained tokenizer
        model.update(preset="llama-1m", vocab_size=512)
    note(f"{STEPS} steps into {data['output_dir']}")
    return config_from_dict(type(cfg), data, "the smoke run's settings")


def _readable(spec: str) -> bool:
    if objects.is_memory(spec) or spec.startswith("synthetic"):
        return True
    if Path(spec).exists():
        return True
    from llmstack.data.sources import iter_records

    try:
        next(iter(iter_records(spec)))
    except Exception:  # offline, not cached, or not a dataset: the stand-in says which
        return False
    return True


def _smoke_data(stage: str, key: str, spec: str) -> str:
    if spec.startswith("synthetic"):
        return spec
    if not _readable(spec):
        note(f"{key}={spec} cannot be read here (offline, or made by an earlier stage): using the built-in "
             f"{STAND_IN[stage]} records of the same type instead")
        return STAND_IN[stage]
    from llmstack.data.sources import iter_records

    if Path(spec).is_file() and spec.endswith(".txt"):
        return spec
    records = [record for _, record in itertools.islice(iter_records(spec), RECORDS)]
    digest, count = objects.records_sha256(records)
    note(f"{key}={spec}: the first {count} records")
    return objects.register(records, "dataset", digest, {"smoke_of": spec, "records": count,
                                                         "records_sha256": digest})


def _tokenizer(name_or_path: str, train_spec: str):
    from llmstack.data.sources import iter_records
    from llmstack.data.text import train_tokenizer
    from llmstack.models.causal_lm import load_tokenizer

    try:
        return load_tokenizer(name_or_path)
    except (OSError, ValueError):
        pass
    if train_spec.startswith("synthetic"):
        from llmstack.data.synthetic import corpus

        texts = corpus(200)
    else:
        texts = [str(record) for _, record in itertools.islice(iter_records(train_spec), RECORDS)]
    note(f"the tokenizer of {name_or_path!r} cannot be read offline: a 512-token byte-level BPE trained on the "
         "smoke data stands in")
    return train_tokenizer(texts, vocab_size=512)


def _register_tokenizer(tokenizer) -> str:
    return objects.register(tokenizer, "tokenizer", f"{id(tokenizer):016x}",
                            {"class": type(tokenizer).__name__, "vocabulary": len(tokenizer)})


def _tiny_model(name_or_path: str, tokenizer, section: str, classifier: bool = False) -> str:
    from llmstack.models.architectures import build_tiny

    model, source = build_tiny(name_or_path, tokenizer, one_score=classifier)
    note(f"{section}.name_or_path={name_or_path}: a 2-layer {model.config.model_type} with random weights "
         f"(architecture from {source})")
    digest, params = objects.weights_sha256(model)
    return objects.register(model, "model", digest, {"smoke_of": name_or_path, "class": type(model).__name__,
                                                     "parameters": params, "weights_sha256": digest})
