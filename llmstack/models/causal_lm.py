"""Causal language models: named presets for training from scratch, loading any Hugging Face model, saving.

Everything goes in and out as Hugging Face objects (DESIGN rule 4): a preset is a `LlamaConfig`, a loaded
model is whatever `AutoModelForCausalLM` returns, and saving is `save_pretrained` (safetensors) plus the
tokenizer, so vLLM, TGI, peft and the Hub read the result as is.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from llmstack.config import ConfigError, objects
from llmstack.models.heads import unwrap

log = logging.getLogger(__name__)

# Llama-style architectures for CPU work and small GPU runs. Widths are multiples of 64 (GEMM tiles, and
# bitsandbytes 4-bit blocks for QLoRA). Embeddings are tied, so the parameter count in
# the name includes the vocabulary matrix once, at the vocabulary size noted beside each preset.
PRESETS: dict[str, dict] = {
    # ~1.4M parameters at vocab 4096: CI and laptop smoke runs, minutes on 2 CPU cores.
    "llama-1m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=384),
    # ~26M parameters at vocab 32000: benchmarks and realistic CPU runs.
    "llama-25m": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=6,
                      intermediate_size=1024),
    # ~110M parameters at vocab 32000 (GPT-2-small sized): single-GPU pretraining.
    "llama-110m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=2048),
}


def preset_config(name: str, vocab_size: int, max_positions: int, tokenizer=None) -> LlamaConfig:
    if name not in PRESETS:
        raise ConfigError(f"config key 'model.preset': unknown preset {name!r}; available: {', '.join(PRESETS)}")
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True,
                       rms_norm_eps=1e-5, attention_dropout=0.0, **PRESETS[name], **special)


# beside a classifier's adapters: the config of the classifier they were trained in (see `save_model`)
CLASSIFIER_CONFIG = "classifier_config.json"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(model_dtype: str, compute: str, frozen: bool) -> torch.dtype:
    """The dtype a model's weights are loaded in, for `model.dtype` and the run's compute precision
    `compute` (fp32 | bf16 | fp16, `train.precision` resolved). An explicit `model_dtype` is taken as is (pure
    low-precision training where the user asks). `auto`: a trained model keeps fp32 master weights, which
    autocast casts per operation, so small updates are not rounded away; a frozen model needs no master copy
    and is loaded directly in the compute dtype (half the memory under bf16)."""
    if model_dtype != "auto":
        return DTYPES[model_dtype]
    return DTYPES[compute] if frozen else torch.float32


def build_from_preset(name: str, tokenizer, max_positions: int, seed: int, dtype: torch.dtype = torch.float32,
                      attn_implementation: str | None = None) -> PreTrainedModel:
    """Fresh weights for preset `name`, sized to the tokenizer (rounded up to a multiple of 64 for GEMMs),
    drawn in fp32 (the same values whatever `dtype`, up to its rounding)."""
    vocab = -(-len(tokenizer) // 64) * 64
    torch.manual_seed(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(preset_config(name, vocab, max_positions, tokenizer), **extra)
    return model.to(dtype)


def load_causal_lm(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                   load_in_4bit: bool = False, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> PreTrainedModel:
    """Any `AutoModelForCausalLM`, with weights in `dtype` (see `weight_dtype`; mixed precision is applied by
    the trainer, not the weights), or with its linear layers in 4-bit NF4 for QLoRA (bitsandbytes; bf16
    compute). `attn_implementation` (sdpa | eager | flash_attention_2) goes to Hugging Face; None: its
    default. A model given in Python (a `memory:` name) comes back as a copy in `dtype`, so the caller's object
    is left as it was."""
    if objects.is_memory(name_or_path):
        return objects.fresh_copy(name_or_path).to(dtype)
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise unloadable("model", name_or_path, err) from err
    if gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # The GGUF tensors were dequantised on loading; what remains is the quantizer's bookkeeping, which
        # makes save_pretrained refuse the model ("quantized with gguf and is not serializable"). Without it
        # the model trains and saves as the plain model it now is.
        model.hf_quantizer.remove_quantization_config(model)
    return model


def nf4_config(keep: tuple[str, ...] = ()):
    """QLoRA's quantisation: linear layers in 4-bit NF4 with double-quantised scales, computing in bf16;
    modules named in `keep` stay in full precision (a score head that trains whole)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(keep) or None)


def unloadable(what: str, name_or_path: str, err: Exception) -> ConfigError:
    """One line for a model or tokenizer that cannot be loaded: a directory without one, or a name that is
    neither on disk nor obtainable from the Hub."""
    hint = ("it is not a local directory, and the Hub could not provide it (no such repository, or offline)"
            if not Path(name_or_path).exists() else f"the directory holds no loadable {what}")
    first = " ".join(str(err).split())[:300]
    return ConfigError(f"cannot load a {what} from {name_or_path!r}: {hint}. {first}")


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    if objects.is_memory(name_or_path):
        tokenizer = objects.fresh_copy(name_or_path)  # a stage may set its pad token or chat template
    else:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as err:
            raise unloadable("tokenizer", name_or_path, err) from err
    if tokenizer.pad_token is None:
        # Packed pretraining never pads inside a block; the final partial block needs some id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocab(model: PreTrainedModel, tokenizer) -> None:
    """Some Hub tokenizers add tokens beyond the model's embedding matrix; that fails later as an index error."""
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise ConfigError(f"config key 'model.tokenizer': the tokenizer has {len(tokenizer)} tokens but the model "
                          f"embeds only {n_embed}; use the model's own tokenizer or resize the model's embeddings first")


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every dropout probability set to 0: RL recomputes log-probabilities of sampled tokens and
    compares them across passes, which dropout's noise would make differ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def uses_varlen_attention(model) -> bool:
    """Whether the model attends through a flash-attention kernel, which takes no dense mask: packed rows then
    rely on restarting position ids for their example boundaries (CUDA only)."""
    return str(getattr(unwrap(model).config, "_attn_implementation", "")).startswith("flash_attention")


def numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also where DeepSpeed ZeRO-3 left this process an empty shard."""
    return getattr(param, "ds_numel", None) or param.numel()


def ndim(param: torch.Tensor) -> int:
    """Dimensions of the whole parameter (a ZeRO-3 shard is flat; its full shape is kept as `ds_shape`)."""
    return len(getattr(param, "ds_shape", param.shape))


def matmul_params(model: PreTrainedModel) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding (a lookup)."""
    total = sum(numel(p) for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return total if tied else total - numel(embed)


def save_model(model: PreTrainedModel, tokenizer, directory: str | Path, state_dict=None) -> None:
    """`save_pretrained` (safetensors) plus tokenizer, into a temp dir renamed into place when complete."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if hasattr(model, "peft_config") and type(unwrap(model)).__name__.endswith("ForSequenceClassification"):
        # peft saves the adapters and the score head only; the classifier's settings (pad id, reward
        # statistics) go beside them under their own name: a config.json would make stock transformers take
        # the directory for a whole model instead of loading the base and then the adapters
        unwrap(model).config.to_json_file(tmp / CLASSIFIER_CONFIG)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)

