"""Reward and value models: a one-label `AutoModelForSequenceClassification` on a causal-LM backbone, and the
scores it gives.

A score is read where Hugging Face's `*ForSequenceClassification` pools, so a saved model scores the same in
stock transformers (and TRL, vLLM) as here: at the last token whose id is not the config's `pad_token_id`
(`pooled_positions`). With a tokenizer whose pad token differs from its EOS, that is the EOS the data
appends; where pad == EOS (many Hub chat models), the appended EOS counts as padding to Hugging Face, and the
score is read at the token before it. The last real token is found from the attention mask (so left and right
padding agree) and moved back over pad ids; the score head is applied at the chosen positions only.

The reward stage stores the mean and standard deviation of its held-out scores in the model's config
(`reward_mean`, `reward_std`); `statistics` reads them back for reward normalisation in RL.

Shape legend: R sequences, T positions, N rankings, K responses per ranking, H hidden width.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from llmstack.config import ConfigError, objects
from llmstack.models.causal_lm import CLASSIFIER_CONFIG, nf4_config, unloadable
from llmstack.models.heads import apply_head, at_least_fp32, score_head, unwrap
from llmstack.rl.experience import join


def load_reward_model(name_or_path: str, tokenizer, seed: int, trust_remote_code: bool = False,
                      dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                      load_in_4bit: bool = False):
    """A one-label sequence classifier with weights in `dtype` (`llmstack.models.causal_lm.weight_dtype`); a
    new score head starts small, N(0, 1/(hidden+1)) as in Ziegler et al. 2019, so early rewards are near zero
    and the backbone's features dominate the first updates. Value models are loaded the same way (they start
    from a reward model, or a policy). A model given in Python (a `memory:` name) is used as a copy; a
    directory of LoRA adapters (a reward stage run with `lora.merge=false`) is merged into its base model.
    `load_in_4bit`: QLoRA's NF4 backbone (`causal_lm.nf4_config`), with the score head kept whole to train."""
    if objects.is_memory(name_or_path):
        model = _classifier_from_object(objects.fresh_copy(name_or_path)).to(dtype)
    elif (Path(name_or_path) / "adapter_config.json").is_file():
        model = _merged_adapters(Path(name_or_path), dtype, trust_remote_code)
    else:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if load_in_4bit:
            extra["quantization_config"] = nf4_config(keep=("score",))
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
        except (OSError, ValueError) as err:
            raise unloadable("reward or value model", name_or_path, err) from err
    model.config.pad_token_id = tokenizer.pad_token_id
    if not any(a.endswith("ForSequenceClassification") for a in getattr(model.config, "architectures", None) or []):
        generator = torch.Generator().manual_seed(seed)
        hidden = model.score.weight.shape[1]
        with torch.no_grad():
            model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) / math.sqrt(hidden + 1))
    return model


def _merged_adapters(directory: Path, dtype: torch.dtype, trust_remote_code: bool):
    """The plain classifier that a directory of peft adapters (with the trained score head) describes: its
    base model as a one-label classifier with the pad id and reward statistics saved beside the adapters
    (`causal_lm.CLASSIFIER_CONFIG`), the adapters added into the weights."""
    base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"{directory} holds LoRA adapters; loading them needs peft: pip install 'llmstack[lora]'") \
            from err
    try:
        config = AutoConfig.from_pretrained(base, num_labels=1, trust_remote_code=trust_remote_code)
        saved = directory / CLASSIFIER_CONFIG
        if saved.is_file():
            trained = json.loads(saved.read_text())
            config.update({k: trained[k] for k in ("pad_token_id", "reward_mean", "reward_std") if k in trained})
        backbone = AutoModelForSequenceClassification.from_pretrained(base, config=config, dtype=dtype,
                                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{directory} holds LoRA adapters whose base model {base!r} cannot be loaded; save the "
                          "reward model merged (reward stage lora.merge=true), or put the base model where "
                          "adapter_config.json's base_model_name_or_path points") from err
    model = peft.PeftModel.from_pretrained(backbone, directory).merge_and_unload()
    model.config.architectures = [type(model).__name__]  # the score head came with the adapters: keep it
    # peft loads adapters for inference, every weight frozen; like any loaded model this one trains whole (a
    # value model) unless the caller freezes it
    return model.requires_grad_(True)


def _classifier_from_object(given):
    """A model given in Python as a reward model: a one-label sequence classifier as it is, or a causal LM whose
    backbone becomes one (the LM head is dropped, the score head is new)."""
    if type(given).__name__.endswith("ForSequenceClassification"):
        if given.config.num_labels != 1:
            raise ValueError(f"a reward or value model gives one score: this {type(given).__name__} has "
                             f"{given.config.num_labels} labels; build it with num_labels=1")
        return given.to(torch.float32)
    config = given.config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    missing, _ = model.load_state_dict(given.state_dict(), strict=False)
    if any(not name.startswith("score.") for name in missing):
        raise ValueError(f"cannot use a {type(given).__name__} as a reward model's backbone: its weights do not "
                         f"fit {type(model).__name__} (missing: {', '.join(missing[:5])})")
    return model.to(torch.float32)


def statistics(model) -> tuple[float, float] | None:
    """(reward_mean, reward_std) the reward stage stored in the model's Hugging Face config, or None. Reads
    through any wrapper: a DeepSpeed engine's own `.config` is DeepSpeed's dict, not the model's."""
    config = unwrap(model).config
    mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
    return None if mean is None or std is None else (float(mean), float(std))


def pooled_positions(input_ids_NT: torch.Tensor, index_NK: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """[N, K] each position of `index_NK` moved back to the last token at or before it whose id is not
    `pad_token_id`: where Hugging Face's sequence classifiers read their score (`last_non_pad_token`); the
    position itself when it holds a real token or there is no pad id."""
    if pad_token_id is None:
        return index_NK
    columns_T = torch.arange(input_ids_NT.shape[1], device=input_ids_NT.device)
    last_real_NT = torch.where(input_ids_NT != pad_token_id, columns_T, 0).cummax(-1).values
    return last_real_NT.gather(1, index_NK)


def _pad_id(model) -> int | None:
    return getattr(unwrap(model).config, "pad_token_id", None)


def sequence_scores(model, input_ids_RT: torch.Tensor, attention_mask_RT: torch.Tensor) -> torch.Tensor:
    """[R] scores at each sequence's last real token, in fp32 (or the model's wider dtype). Goes through the (possibly distributed)
    model's own forward so DDP/FSDP hooks run, then applies the score head to the chosen positions only."""
    # positions count real tokens only, so a left-padded sequence is seen exactly as it is alone
    positions_RT = (attention_mask_RT.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids_RT, attention_mask=attention_mask_RT, position_ids=positions_RT,
                output_hidden_states=True)
    hidden_RTH = out.hidden_states[-1]
    columns = torch.arange(input_ids_RT.shape[1], device=input_ids_RT.device)
    last_R = pooled_positions(input_ids_RT, (columns * attention_mask_RT).argmax(-1)[:, None], _pad_id(model))[:, 0]
    rows = torch.arange(len(last_R), device=last_R.device)
    return at_least_fp32(apply_head(score_head(model), hidden_RTH[rows, last_R]).squeeze(-1))


def scores_at(model, input_ids_NT: torch.Tensor, attention_mask, position_ids_NT: torch.Tensor,
              index_NK: torch.Tensor) -> torch.Tensor:
    """[N, K] scores read at positions `index_NK` of each row (each response's last token; moved back over
    pad ids as Hugging Face pools, `pooled_positions`), from one forward pass: K responses sharing a row
    (with an attention mask that keeps them apart, see `llmstack.data.preference.shared_prompt_mask`) are
    scored together. In fp32 (or the model's wider dtype)."""
    out = model(input_ids=input_ids_NT, attention_mask=attention_mask, position_ids=position_ids_NT,
                output_hidden_states=True)
    hidden_NTH = out.hidden_states[-1]
    index_NK = pooled_positions(input_ids_NT, index_NK, _pad_id(model))
    rows = torch.arange(hidden_NTH.shape[0], device=hidden_NTH.device)[:, None]
    return at_least_fp32(apply_head(score_head(model), hidden_NTH[rows, index_NK]).squeeze(-1))


class RewardModelScores:
    """A reward model as a reward source (`llmstack.rl.rewards.RewardSource`): each response's score at its
    last token, after its prompt, as the reward stage trained it to score."""

    def __init__(self, model, name: str = "reward_model"):
        self.model, self.name = model, name

    @torch.no_grad()
    def __call__(self, inputs) -> torch.Tensor:
        exp = inputs.exp
        ids, attention, _ = join(exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.mask)
        return sequence_scores(self.model, ids, attention)
