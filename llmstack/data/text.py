"""Pretraining text: train a tokenizer, tokenise documents, pack them into fixed-length blocks.

Packing concatenates documents with EOS after each and cuts the stream into consecutive blocks: no padding
between documents, every token in exactly one block position. Only the final partial block is padded, and its
padding is masked out of the loss (label -100).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmstack.data.sources import iter_documents
from llmstack.losses import IGNORE_INDEX

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int = 50_000_000) -> PreTrainedTokenizerFast:
    """Byte-level BPE on at most `max_chars` characters of `texts` (a corpus larger than memory still works);
    every string round-trips through encode/decode."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(_capped(texts, max_chars), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, **SPECIAL_TOKENS)


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        yield text[: max_chars - seen]
        seen += len(text)


def tokenize_documents(tokenizer, documents: Iterable[str], batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids per document, no special tokens; batched because the fast tokenizer parallelises batches."""
    docs = iter(documents)
    while batch := list(itertools.islice(docs, batch_size)):
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def pack_blocks(token_docs: Iterable[list[int]], block_size: int, eos_id: int,
                pad_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, labels) blocks of `block_size`; labels equal input_ids except the final block's padding."""
    buffer: list[int] = []
    for doc in token_docs:
        buffer.extend(doc)
        buffer.append(eos_id)
        while len(buffer) >= block_size:
            block, buffer = buffer[:block_size], buffer[block_size:]
            yield block, list(block)
    if buffer:
        pad = block_size - len(buffer)
        yield buffer + [pad_id] * pad, buffer + [IGNORE_INDEX] * pad


def is_held_out(index: int, eval_fraction: float, seed: int) -> bool:
    """Deterministic held-out assignment of item `index` (a packed block, a conversation), the same in every
    process, run and code path."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


@dataclass
class PackedBlocks:
    input_ids: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N, L]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def _stack(blocks: list[tuple[list[int], list[int]]], block_size: int) -> PackedBlocks:
    if not blocks:
        empty = torch.empty(0, block_size, dtype=torch.long)
        return PackedBlocks(empty, empty.clone())
    ids, labels = zip(*blocks)
    return PackedBlocks(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def packed_blocks(spec: str, tokenizer, block_size: int, text_field: str):
    docs = tokenize_documents(tokenizer, iter_documents(spec, text_field))
    return pack_blocks(docs, block_size, tokenizer.eos_token_id, tokenizer.pad_token_id)


def pack_corpus(spec: str, tokenizer, block_size: int, eval_fraction: float, seed: int,
                text_field: str = "text") -> tuple[PackedBlocks, PackedBlocks]:
    """All of `spec` in memory as (train, held-out) blocks, split by `is_held_out`."""
    train, held_out = [], []
    for index, block in enumerate(packed_blocks(spec, tokenizer, block_size, text_field)):
        (held_out if is_held_out(index, eval_fraction, seed) else train).append(block)
    n_tokens = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in train + held_out)
    if not train or (eval_fraction > 0 and not held_out):
        raise ValueError(f"{spec}: {n_tokens} tokens make {len(train)} training and {len(held_out)} held-out "
                         f"blocks of {block_size}; use a smaller data.block_size, more data, or a larger "
                         "data.eval_fraction (or a separate data.eval)")
    return _stack(train, block_size), _stack(held_out, block_size)


def load_blocks(spec: str, tokenizer, block_size: int, text_field: str = "text") -> PackedBlocks:
    """All of `spec` as blocks, for a separate held-out set (`data.eval`)."""
    blocks = list(packed_blocks(spec, tokenizer, block_size, text_field))
    if not blocks:
        raise ValueError(f"{spec}: no text found for held-out data")
    return _stack(blocks, block_size)
