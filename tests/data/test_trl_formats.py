"""Every TRL dataset type and form a stage takes, rendered by llmstack and by TRL 1.16 itself (its trainers'
own dataset preparation on a tiny model), must give the same token ids and loss labels. Each test runs on two
tokenizers: one that adds no special tokens and one that starts every text with BOS, as Llama's does."""

import copy
import json
import types

import pytest
from accelerate.state import AcceleratorState
from datasets import Dataset
from tokenizers import Tokenizer, processors
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, PreTrainedTokenizerFast
from trl import GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.data_utils import maybe_apply_chat_template

from llmstack.data.chat import DEFAULT_CHAT_TEMPLATE, iter_examples, tokenize_example
from llmstack.data.formats import iter_prompts, prompt_ids
from llmstack.data.preference import build_preference_rows, iter_groups, render
from llmstack.data.text import SPECIAL_TOKENS

# TRL 1.16 sets a training argument that transformers 5.24 has renamed
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """TRL's trainers leave accelerate's process-wide state set to their mixed precision; the tests that run
    after these (llmstack's own stages) must find it unset, as a fresh process would."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

# DEFAULT_CHAT_TEMPLATE with TRL's {% generation %} markers around each answer and its end-of-turn token: the
# same text, and the marked span is what llmstack's assistant-only labels cover.
MARKED_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer briefly."}

TEXTS = ["The owl flies over the hill.", "Two plus two is four.", "naïve café — 東京 ✓",
         "Tabs\tand\nnewlines {braces}", "It already ends with its end.<|eos|>"]
CONVERSATIONS = [
    [user("What is two plus two?"), assistant("Four.")],
    [SYSTEM, user("What is two plus two?"), assistant("Four."), user("And minus one?"), assistant("Three.")],
    [user("naïve café?"), assistant(" A café — 東京.")],
    [user("Say hi"), assistant("hi"), user("again"), assistant("hi again")],
    [SYSTEM, user("Tabs\tand\nnewlines"), assistant("{braces}\n")],
]
# prompts ending in a space: tokens merge across the prompt's end, where TRL starts the loss where the prompt
# alone and the whole text part
PROMPT_COMPLETIONS = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "The sky is ", "completion": "blue."},
                      {"prompt": "Q: two plus two?\nA:", "completion": " four"},
                      {"prompt": "naïve ", "completion": "café — 東京"},
                      {"prompt": "Ends", "completion": " with its end.<|eos|>"}]
CHAT_PROMPT_COMPLETIONS = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
PAIRS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
         {"prompt": "Q: two plus two?\nA:", "chosen": " four", "rejected": " five"},
         {"prompt": "naïve café", "chosen": " — 東京 ✓", "rejected": " — Paris"},
         {"prompt": "Say hi.", "chosen": " hi<|eos|>", "rejected": " no"},
         {"prompt": "", "chosen": "An answer with no prompt.", "rejected": "Another one."}]
IMPLICIT_PAIRS = [{"chosen": "Q: Can I go?\nA: Don't.", "rejected": "Q: Can I go?\nA: Do it."},
                  {"chosen": "The sky is blue.", "rejected": "The sky is green."},
                  {"chosen": "naïve café — 東京", "rejected": "naïve cafés"},
                  {"chosen": "Two plus two is four.", "rejected": "Two plus two is five."},
                  {"chosen": "Tabs\tand\nnewlines", "rejected": "Tabs\tand\nspaces"}]
CHAT_PAIRS = [{"prompt": c[:-1], "chosen": c[-1:], "rejected": [assistant("I would rather not.")]} for c in CONVERSATIONS]
CHAT_IMPLICIT_PAIRS = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in CHAT_PAIRS]
PROMPTS = [{"prompt": p["prompt"]} for p in PROMPT_COMPLETIONS]
CHAT_PROMPTS = [{"prompt": c[:-1]} for c in CONVERSATIONS[:4]] + [{"prompt": [user("Name a colour."), assistant("Blu")]}]


@pytest.fixture(params=["no special tokens", "BOS"])
def tok(request, tokenizer):
    raw = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    if request.param == "BOS":
        raw.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                           special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    fresh = PreTrainedTokenizerFast(tokenizer_object=raw, **SPECIAL_TOKENS)
    fresh.chat_template = DEFAULT_CHAT_TEMPLATE
    return fresh


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def tiny_config(tok, **extra):
    return LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id, **extra)


def trl_sft(tok, records, tmp_path, **options):
    """(input_ids, labels) of each record as TRL's SFTTrainer prepares it (its defaults unless `options`)."""
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None,
                     packing=False, **options)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_config(tiny_config(tok)), args=args,
                         train_dataset=Dataset.from_list(records), processing_class=tok)
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


def trl_reward(tok, records, tmp_path):
    """(chosen ids, rejected ids) of each record as TRL's RewardTrainer prepares it."""
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None)
    model = AutoModelForSequenceClassification.from_config(tiny_config(tok, num_labels=1))
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok)
    return [(row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]


def llmstack_sft(tok, records, tmp_path):
    return [tokenize_example(tok, e) for e in iter_examples(write_jsonl(tmp_path / "sft.jsonl", records))]


def llmstack_reward(tok, records, tmp_path):
    """(chosen ids, rejected ids) read back from the shared-prompt rows: the prompt, then each response."""
    rows = build_preference_rows(list(iter_groups(write_jsonl(tmp_path / "pairs.jsonl", records))), tok, 4096)
    pairs = []
    for ids, segments in zip(rows.input_ids, rows.segment_ids):
        prompt = ids[segments == 0].tolist()
        pairs.append(tuple(prompt + ids[segments == k].tolist() for k in (1, 2)))
    return pairs


def test_sft_standard_text_matches_trl(tok, tmp_path):
    """{"text"}: EOS appended unless already there, special tokens as the tokenizer adds them, loss on all."""
    records = [{"text": t} for t in TEXTS]
    assert llmstack_sft(tok, records, tmp_path) == trl_sft(tok, records, tmp_path)


def test_sft_conversational_messages_match_trl_with_assistant_only_loss(tok, tmp_path):
    """{"messages"}: llmstack's loss covers the answers and their EOS: TRL with `assistant_only_loss=True`
    and a template whose {% generation %} span is the answer and its EOS."""
    records = [{"messages": c} for c in CONVERSATIONS]
    marked = copy.deepcopy(tok)
    marked.chat_template = MARKED_TEMPLATE
    for c in CONVERSATIONS:
        assert marked.apply_chat_template(c, tokenize=False) == tok.apply_chat_template(c, tokenize=False)
    ours = llmstack_sft(tok, records, tmp_path)
    assert ours == trl_sft(marked, records, tmp_path, assistant_only_loss=True)
    assert all(any(label != -100 for label in labels) for _, labels in ours)


def test_sft_standard_prompt_completion_matches_trl(tok, tmp_path):
    """Text concatenation, EOS appended, loss from where the prompt alone and the whole text part (TRL's
    default completion_only_loss)."""
    ours = llmstack_sft(tok, PROMPT_COMPLETIONS, tmp_path)
    assert ours == trl_sft(tok, PROMPT_COMPLETIONS, tmp_path)
    assert tok.decode(ours[0][0]).endswith("The sky is blue.<|eos|>"), "text, not a chat template"


def test_sft_conversational_prompt_completion_matches_trl(tok, tmp_path):
    """The template's rendering of prompt + completion, loss on what follows the prompt and its header (TRL's
    default completion_only_loss, which includes the template's text after the final EOS)."""
    assert llmstack_sft(tok, CHAT_PROMPT_COMPLETIONS, tmp_path) == trl_sft(tok, CHAT_PROMPT_COMPLETIONS, tmp_path)


@pytest.mark.parametrize("records", [PAIRS, IMPLICIT_PAIRS], ids=["explicit prompt", "implicit prompt"])
def test_reward_standard_pairs_match_trl(tok, tmp_path, records):
    """Standard pairs: prompt + response + EOS as one text. The records' responses start a new word, so no
    token merges across the prompt's end (see the next test for one that does)."""
    assert llmstack_reward(tok, records, tmp_path) == trl_reward(tok, records, tmp_path)


def test_reward_keeps_the_prompts_own_tokens_where_trl_merges_across_its_end(tok, tmp_path):
    """A deliberate difference: "The sky is " + "blue." tokenises as " blue" after "is" in one text, but PPO
    samples tokens after the prompt's own tokens (" " last), so the reward model is trained on those."""
    record = {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."}
    (ours,) = llmstack_reward(tok, [record], tmp_path)
    (theirs,) = trl_reward(tok, [record], tmp_path)
    assert ours[0] == prompt_ids(tok, "The sky is ") + tok("blue.<|eos|>", add_special_tokens=False)["input_ids"]
    assert theirs[0] == tok("The sky is blue.<|eos|>")["input_ids"] and ours[0] != theirs[0]
    assert tok.decode(ours[0]) == tok.decode(theirs[0])


@pytest.mark.parametrize("records", [CHAT_PAIRS, CHAT_IMPLICIT_PAIRS], ids=["explicit prompt", "implicit prompt"])
def test_reward_conversational_pairs_match_trl_up_to_the_final_eos(tok, tmp_path, records):
    """Conversational pairs: the template's rendering. TRL scores its last token, the newline the template
    puts after the final EOS; llmstack scores the EOS, where PPO's policy stops, so its rows end there."""
    ours, theirs = llmstack_reward(tok, records, tmp_path), trl_reward(tok, records, tmp_path)
    for pair, trl_pair in zip(ours, theirs):
        for ids, trl_ids in zip(pair, trl_pair):
            assert ids[-1] == tok.eos_token_id and trl_ids[:len(ids)] == ids
            assert tok.decode(trl_ids[len(ids):]) == "\n"


def test_reward_rows_hold_what_render_scores(tok, tmp_path):
    """The rows read back equal `render`, the sequence of one response scored alone, for every form."""
    for records in (PAIRS, IMPLICIT_PAIRS, CHAT_PAIRS, CHAT_IMPLICIT_PAIRS):
        groups = list(iter_groups(write_jsonl(tmp_path / "pairs.jsonl", records)))
        expected = [tuple(render(tok, g.prompt, r) for r in g.responses) for g in groups]
        assert llmstack_reward(tok, records, tmp_path) == expected


def trl_prompt_ids(tok, prompts):
    """TRL 1.16's online trainers' prompt tokenisation (GRPOTrainer._tokenize_prompts)."""
    trainer = types.SimpleNamespace(processing_class=tok, chat_template=None, tools=None, chat_template_kwargs={},
                                    _is_vlm=False, environment_factories=None)
    return GRPOTrainer._tokenize_prompts(trainer, prompts)[0]


def test_ppo_standard_prompts_match_trl(tok, tmp_path):
    ours = [prompt_ids(tok, p) for p in iter_prompts(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS))]
    assert ours == trl_prompt_ids(tok, [r["prompt"] for r in PROMPTS])


def test_ppo_conversational_prompts_match_trl(tok, tmp_path):
    """A generation header after a user turn, as TRL's online trainers render prompts; a prompt ending on an
    assistant turn continues that message, TRL's rule for prompt-only records (`maybe_apply_chat_template`)."""
    ours = [prompt_ids(tok, p) for p in iter_prompts(write_jsonl(tmp_path / "prompts.jsonl", CHAT_PROMPTS))]
    assert ours[:4] == trl_prompt_ids(tok, [r["prompt"] for r in CHAT_PROMPTS[:4]])
    texts = [maybe_apply_chat_template(r, tok)["prompt"] for r in CHAT_PROMPTS]
    assert ours == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tok.decode(ours[4]).endswith("<|assistant|>\nBlu")
