import pytest
import torch
from transformers import AutoTokenizer

from llmstack.data.text import is_held_out, load_blocks, pack_blocks, pack_corpus, tokenize_documents


def test_tokenizer_round_trips_unicode_and_reloads_identically(tokenizer, tmp_path):
    text = "naïve café — 東京 ✓ 🙂\n\ttabs and {braces}, plus text never seen: Zyzzyva!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 400
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")


def test_packing_places_every_token_once_in_order_with_eos_between_documents(tokenizer):
    docs = ["the fox sees the owl.", "one plus two is three.", "x", "a much longer document " * 9]
    expected = []
    for doc in docs:  # tokenised one by one, independently of the batched path
        expected += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    blocks = list(pack_blocks(tokenize_documents(tokenizer, docs, batch_size=3), 16,
                              tokenizer.eos_token_id, tokenizer.pad_token_id))
    assert all(len(ids) == 16 == len(labels) for ids, labels in blocks)
    stream = [t for ids, labels in blocks for t, lab in zip(ids, labels) if lab != -100]
    assert stream == expected
    tail = len(expected) % 16
    assert len(blocks) == -(-len(expected) // 16)
    if tail:
        last_ids, last_labels = blocks[-1]
        assert last_labels[tail:] == [-100] * (16 - tail)
        assert last_ids[tail:] == [tokenizer.pad_token_id] * (16 - tail)
    assert all(ids == labels for ids, labels in blocks[:-1])


def test_eval_split_is_stable_disjoint_and_near_its_fraction():
    picks = [i for i in range(20000) if is_held_out(i, 0.1, seed=7)]
    assert 0.09 < len(picks) / 20000 < 0.11
    assert picks == [i for i in range(20000) if is_held_out(i, 0.1, seed=7)]
    assert picks != [i for i in range(20000) if is_held_out(i, 0.1, seed=8)]
    assert not any(is_held_out(i, 0.0, seed=7) for i in range(1000))


def test_pack_corpus_splits_all_blocks_between_train_and_eval(tokenizer):
    train, held = pack_corpus("synthetic:100", tokenizer, 32, 0.2, seed=0)
    whole = load_blocks("synthetic:100", tokenizer, 32)
    assert len(train) + len(held) == len(whole)
    rows = {tuple(r) for r in whole.input_ids.tolist()}
    assert {tuple(r) for r in train.input_ids.tolist()} | {tuple(r) for r in held.input_ids.tolist()} == rows
    assert 0.1 < len(held) / len(whole) < 0.3
    assert train.input_ids.dtype == torch.long and train.input_ids.shape[1] == 32


def test_too_little_data_for_a_held_out_block_says_what_to_change(tokenizer):
    with pytest.raises(ValueError, match="smaller data.block_size"):
        pack_corpus("synthetic:1", tokenizer, 512, 0.01, seed=0)
