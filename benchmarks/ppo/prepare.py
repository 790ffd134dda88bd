"""Once for both contenders, in llmstack's environment: the models each process loads and the prompts.

A setup directory holds `policy/` (the SFT model: policy init and frozen reference), `reward/` (the reward
model, also the value model's init: the policy's backbone with a scalar head seeded once), `prompts.jsonl`
(what llmstack reads), `queries.json` (the left-padded token rows llmstack's loader deals, in its order,
for TRL) and `work.json` (the shared settings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.ppo.spec import Work, llmstack_overrides


def need(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"benchmarks.ppo: {what} not found at {path}; pass another with the matching option")
    return path


def read_prompts(path: Path, n: int) -> list[str]:
    """The first `n` prompts of a JSONL file holding one JSON string, or one {"prompt": text}, per line."""
    prompts = []
    for number, line in enumerate(need(path, "the prompts file").read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        text = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise SystemExit(f"{path}, line {number}: expected a JSON string or an object with a 'prompt' string")
        prompts.append(text)
        if len(prompts) == n:
            return prompts
    raise SystemExit(f"{path} holds {len(prompts)} prompts; {n} are needed (rollout x steps, each used once)")


def save_reward_model(setup: Path, tokenizer, seed: int) -> None:
    """The policy's backbone with a fresh scalar head, seeded by llmstack's reward loader; saved as a
    sequence classifier, so neither side draws a head of its own when loading it."""
    from llmstack.models.causal_lm import save_model
    from llmstack.models.reward_model import load_reward_model

    save_model(load_reward_model(str(setup / "policy"), tokenizer, seed), tokenizer, setup / "reward")


def preset_models(setup: Path, preset: str, vocab: int, text: Path, max_positions: int, seed: int) -> None:
    """A `preset` model with fresh weights and a byte-level BPE of `vocab` tokens trained on `text`."""
    from llmstack.data import sources, text as text_data
    from llmstack.data.chat import ensure_chat_template
    from llmstack.models.causal_lm import build_from_preset, save_model

    if (setup / "reward" / "config.json").is_file():
        return
    print(f"[ppo] training a {vocab}-token tokenizer on {text}; building {preset}", file=sys.stderr)
    tokenizer = text_data.train_tokenizer(sources.iter_documents(str(need(text, "the tokenizer text"))), vocab)
    ensure_chat_template(tokenizer)
    save_model(build_from_preset(preset, tokenizer, max_positions, seed), tokenizer, setup / "policy")
    save_reward_model(setup, tokenizer, seed)


def smollm2_models(setup: Path, package_dir: Path, seed: int) -> None:
    """SmolLM2-135M-Instruct as the policy, and its backbone under a fresh scalar head as the reward model."""
    from benchmarks.smollm2 import save_smollm2

    if (setup / "reward" / "config.json").is_file():
        return
    save_reward_model(setup, save_smollm2(setup / "policy", package_dir), seed)


def prompt_rows(work: Work, setup: Path, prompts_file: Path) -> None:
    """prompts.jsonl for llmstack, and for TRL the token rows llmstack's own loader makes of them, in the
    order its sampler deals them."""
    from llmstack.config import PPOConfig, load_config
    from llmstack.data.batching import ShuffledBatches
    from llmstack.data.chat import ensure_chat_template
    from llmstack.models.causal_lm import load_tokenizer
    from llmstack.trainers.ppo import load_prompts

    prompts = read_prompts(prompts_file, work.rollout * work.steps)
    with open(setup / "prompts.jsonl", "w") as fh:
        fh.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    cfg = load_config(PPOConfig, None, llmstack_overrides(work, str(setup / "policy"), str(setup / "reward"),
                                                          str(setup / "prompts.jsonl"), str(setup / "unused")))
    tokenizer = load_tokenizer(str(setup / "policy"))
    ensure_chat_template(tokenizer)
    rows, _, _ = load_prompts(cfg, tokenizer)
    batches = iter(ShuffledBatches(rows, work.rollout, 0, 1, work.seed))
    # each rollout's rows left-padded to that rollout's longest prompt, as llmstack deals them; TRL's collator
    # pads a batch to its longest row, so it leaves rows of one width as they are
    queries = [row for _ in range(work.steps) for row in next(batches)["input_ids"].tolist()]
    (setup / "queries.json").write_text(json.dumps(queries))
    work.save(setup / "work.json")
