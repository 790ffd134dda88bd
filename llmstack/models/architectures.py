"""A model's architecture without its weights: from a local `config.json`, the Hugging Face cache, or, offline
and uncached, a table of common families matched by name. Used by `--smoke` to build a tiny model of the same
family as the one a configuration names.

The table holds what decides which code runs (the model type, the vocabulary, tied embeddings, attention
bias); the widths are replaced by small ones anyway. Names are matched case-insensitively, most specific first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

FAMILIES: list[tuple[str, dict]] = [
    (r"qwen2\.5|qwen2", dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True)),
    (r"qwen3", dict(model_type="qwen3", vocab_size=151936, tie_word_embeddings=True)),
    (r"smollm", dict(model_type="llama", vocab_size=49152, tie_word_embeddings=True)),
    (r"llama", dict(model_type="llama", vocab_size=128256, tie_word_embeddings=False)),
    (r"mistral", dict(model_type="mistral", vocab_size=32768, tie_word_embeddings=False)),
    (r"gemma", dict(model_type="gemma2", vocab_size=256000, tie_word_embeddings=True)),
    (r"phi-?3", dict(model_type="phi3", vocab_size=32064, tie_word_embeddings=False)),
]

# the widths of a smoke model: two layers, small enough for seconds per step on one CPU core
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_window_layers=2, layer_types=None)


def known_config(name_or_path: str) -> PretrainedConfig | None:
    """The configuration `name_or_path` names, read from disk or the cache (never the network), or None."""
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        return AutoConfig.from_pretrained(str(local.parent))
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return None


def family_of(name_or_path: str) -> dict | None:
    """The table's entry for a name (a Hub id, or a path that mentions the family, e.g. runs/sft-qwen2.5/model)."""
    lowered = name_or_path.lower()
    return next((dict(entry) for pattern, entry in FAMILIES if re.search(pattern, lowered)), None)


def tiny_config(name_or_path: str, vocab_size: int) -> tuple[PretrainedConfig, str]:
    """A two-layer configuration of the family `name_or_path` belongs to, sized for `vocab_size` tokens, and
    where the family was found. Raises ValueError when it cannot be told offline."""
    config = known_config(name_or_path)
    if config is not None:
        settings, source = json.loads(config.to_json_string()), "its config.json"
    else:
        settings, source = family_of(name_or_path), "the table of known families"
        if settings is None:
            raise ValueError(f"cannot tell the architecture of {name_or_path!r} offline: it is neither a local "
                             "directory with config.json nor in the Hugging Face cache, and its name matches no "
                             f"known family ({', '.join(p for p, _ in FAMILIES)}); point model.name_or_path at a "
                             "directory holding its config.json")
    model_type = settings.pop("model_type")
    for key in ("architectures", "quantization_config", "auto_map", "transformers_version", "torch_dtype", "dtype",
                "rope_scaling", "sliding_window", "use_sliding_window"):
        settings.pop(key, None)
    settings.update({k: v for k, v in TINY.items() if v is not None or k in settings},
                    vocab_size=-(-vocab_size // 64) * 64)
    return AutoConfig.for_model(model_type, **settings), source


def build_tiny(name_or_path: str, tokenizer, seed: int = 0, one_score: bool = False):
    """(model, where the family was found): a causal LM of `name_or_path`'s family at the `TINY` widths with
    random weights, its special tokens those of `tokenizer`; `one_score` marks it for use as a reward or value
    model's backbone (one label)."""
    import torch
    from transformers import AutoModelForCausalLM

    config, source = tiny_config(name_or_path, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if one_score:
        config.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config), source
