"""A saved reward model scores the same in stock `AutoModelForSequenceClassification` as in llmstack, also when
the tokenizer's pad token is its EOS (Hugging Face then reads the score before the appended EOS)."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from llmstack.data.preference import PreferenceGroup, build_preference_rows, render
from llmstack.models.causal_lm import save_model
from llmstack.models.reward_model import load_reward_model, pooled_positions, sequence_scores
from llmstack.trainers.reward import group_scores

from helpers import assert_close_sums, tiny_chat_policy

TEXTS = ["Two plus two is four.", "Well, let me think. Two plus two is nine, or so I heard.", "Four."]


@pytest.fixture(scope="module")
def pad_is_eos(tmp_path_factory):
    root = tmp_path_factory.mktemp("pad-eos")
    path, tokenizer = tiny_chat_policy(root)
    tokenizer.pad_token = tokenizer.eos_token
    ours = load_reward_model(str(path), tokenizer, seed=1).eval()
    save_model(ours, tokenizer, root / "rm")
    stock = AutoModelForSequenceClassification.from_pretrained(root / "rm").eval()
    assert stock.config.pad_token_id == tokenizer.eos_token_id
    return ours, stock, tokenizer


def right_padded(seqs, pad_id):
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def test_pooled_positions_move_back_over_pad_ids_only():
    ids = torch.tensor([[5, 6, 0, 0, 7, 0], [0, 0, 3, 4, 5, 0]])
    assert pooled_positions(ids, torch.tensor([[3, 5], [4, 5]]), pad_token_id=0).tolist() == [[1, 4], [4, 4]]
    assert pooled_positions(ids, torch.tensor([[3, 5], [4, 5]]), pad_token_id=None).tolist() == [[3, 5], [4, 5]]


def test_stock_transformers_and_llmstack_give_the_same_scores_with_pad_equal_to_eos(pad_is_eos):
    ours, stock, tokenizer = pad_is_eos
    seqs = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in TEXTS]
    ids, mask = right_padded(seqs, tokenizer.pad_token_id)
    n_terms = ids.shape[1] * ours.config.intermediate_size
    with torch.no_grad():
        batch = sequence_scores(ours, ids, mask)
        assert_close_sums(batch, stock(input_ids=ids, attention_mask=mask).logits.squeeze(-1), n_terms)
        for i, s in enumerate(seqs):
            one = torch.tensor([s])
            single = stock(input_ids=one, attention_mask=torch.ones_like(one)).logits.squeeze(-1)
            assert_close_sums(sequence_scores(ours, one, torch.ones_like(one)), single, n_terms)
            assert_close_sums(batch[i:i + 1], single, n_terms)
        # the score is not the one at the appended EOS: the check above would catch reading it there
        at_eos = ours.score(ours(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1])
        eos_scores = at_eos[torch.arange(len(seqs)), mask.sum(-1) - 1, 0]
        assert (eos_scores - batch).abs().min() > 1e3 * torch.finfo(torch.float32).eps * batch.abs().max()


def test_the_reward_stage_scores_shared_prompt_rows_where_stock_transformers_reads(pad_is_eos):
    ours, stock, tokenizer = pad_is_eos
    prompt = [{"role": "user", "content": "What is two plus two?"}]
    group = PreferenceGroup(prompt, TEXTS, [0, 1, 2])
    rows = build_preference_rows([group], tokenizer, max_length=96)
    with torch.no_grad():
        shared = group_scores(ours, rows.rows(torch.arange(1)))[0]
        alone = torch.cat([stock(input_ids=torch.tensor([render(tokenizer, prompt, r)])).logits[:, 0]
                           for r in TEXTS])
    assert_close_sums(shared, alone, int(rows.lengths.max()) * ours.config.intermediate_size)
