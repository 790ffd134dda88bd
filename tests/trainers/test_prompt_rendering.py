"""The reward model and PPO see the same prompt rendering of the same record: a reward-stage row starts with
exactly the tokens PPO's rollout of that prompt starts with, for text and for conversations."""

import json

import pytest
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from llmstack.config import PPOConfig, load_config
from llmstack.data.chat import DEFAULT_CHAT_TEMPLATE
from llmstack.data.preference import build_preference_rows, iter_groups
from llmstack.data.synthetic import corpus
from llmstack.data.text import SPECIAL_TOKENS, train_tokenizer
from llmstack.trainers.ppo import load_prompts

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And minus one?"}]
PROMPTS = ["The sky is ", "Q: two plus two?\nA:", CONVERSATION[1:2], CONVERSATION,
           [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blu"}]]


@pytest.fixture(scope="module", params=["no special tokens", "BOS"])
def tokenizer(request):
    raw = Tokenizer.from_str(train_tokenizer(corpus(100, seed=3), vocab_size=300).backend_tokenizer.to_str())
    if request.param == "BOS":
        raw.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, **SPECIAL_TOKENS)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_reward_rows_and_ppo_rollouts_start_with_the_same_prompt_tokens(tmp_path, tokenizer, field):
    pairs = [{"prompt": p, "chosen": " yes", "rejected": " no"} for p in PROMPTS]
    groups = list(iter_groups(write_jsonl(tmp_path / "pairs.jsonl", pairs)))
    rows = build_preference_rows(groups, tokenizer, max_length=512)
    records = [{"prompt": p} if field == "prompt" or isinstance(p, str) else {"messages": p} for p in PROMPTS]
    cfg = load_config(PPOConfig, None, ["model.name_or_path=a", "reward_model.name_or_path=b",
                                        f"data.train={write_jsonl(tmp_path / 'prompts.jsonl', records)}",
                                        "data.max_prompt_length=512"])
    prompts, _, _ = load_prompts(cfg, tokenizer)
    for n in range(len(PROMPTS)):
        reward_prompt = rows.input_ids[n][rows.segment_ids[n] == 0].tolist()
        ppo_prompt = prompts.input_ids[n][prompts.attention_mask[n].bool()].tolist()
        assert reward_prompt == ppo_prompt and reward_prompt
    assert "<|" not in tokenizer.decode(rows.input_ids[0][rows.segment_ids[0] == 0], skip_special_tokens=True), \
        "a text prompt is text, not a chat-templated turn"
