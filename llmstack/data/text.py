"""Pretraining text: train a tokenizer, tokenise documents, pack them into fixed-length blocks.

Packing concatenates documents with EOS after each and cuts the stream into consecutive blocks: no padding
between documents, every token in exactly one block position. Only the final partial block is padded, and its
padding is masked out of the loss (label -100).

Design decisions:
- Work is linear in the number of tokens, on every path. The streamed packer (`pack_pieces`) slices blocks
  out of each piece and carries less than one block between pieces; the in-memory packer (`pack_corpus`,
  `load_blocks`) appends the token stream to one flat int64 buffer and reshapes it, so its peak memory is a
  small multiple of its output.
- A document is tokenised in pieces of about `PIECE_CHARS` characters, a few at a time, so a huge one never
  meets the tokenizer whole, and EOS follows only a document's last piece. Pieces are cut only just before a
  space (U+0020) that follows a non-whitespace character, where the pieces' ids are exactly the whole
  document's: in the byte-level BPE pre-tokenisation regex (GPT-2's, and llmstack's own tokenizer's) a space
  is only ever the first character of a pre-token or inside an all-whitespace one, so the pre-token ending
  before the cut cannot run on past it and the next one starts at it whatever precedes; Metaspace splits
  before every space; Digits joins nothing. `_cuts_cleanly` admits only tokenizers made of these parts, with
  no normalizer but NFC (a space composes with nothing) and no added token that holds whitespace or takes
  the whitespace after it; any other tokenizer is given each document whole. Where `PIECE_CHARS` characters
  hold no cut, the piece runs on to the next cut, or to the document's end.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmstack.data.sources import DataError, iter_document_parts
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


PIECE_CHARS = 1 << 16  # characters per tokenizer input: long enough that per-piece work is noise, short enough
BATCH_CHARS = 1 << 20  # that a call's encodings stay a few tens of MiB; the fast tokenizer threads a batch
_LAST_CUT = re.compile(r".*\S(?= )", re.DOTALL)  # .end() of a match from pos is the last cut before endpos
_NEXT_CUT = re.compile(r"\S(?= )")
_CLEAN = {"ByteLevel", "Metaspace", "Digits"}  # pre-tokenizers that never join text across a clean cut


def _cuts_cleanly(tokenizer) -> bool:
    """Whether cutting a text just before a space that follows a non-whitespace character leaves its ids
    unchanged (see the module docstring for why these parts qualify)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return False
    if backend.normalizer is not None and json.loads(backend.normalizer.__getstate__())["type"] != "NFC":
        return False
    step = json.loads(backend.pre_tokenizer.__getstate__())
    steps = step["pretokenizers"] if step["type"] == "Sequence" else [step]
    # Digits alone would leave the text around a cut in one pre-token: some step must split there
    splits = any(s["type"] == "ByteLevel" and s.get("use_regex") or s["type"] == "Metaspace" and s.get("split")
                 for s in steps)
    if not splits or not all(s["type"] in _CLEAN for s in steps):
        return False
    return not any(token.rstrip or any(c.isspace() for c in token.content)
                   for token in tokenizer.added_tokens_decoder.values())


def _pieces(text: str, size: int | None, last: bool) -> Iterator[tuple[str, bool]]:
    """`text` as (piece, False) pairs cut at clean cuts, at most `size` characters each where a cut allows,
    then its remainder as (remainder, last); `size` None leaves it whole."""
    start = 0
    while size is not None and len(text) - start > size:
        cut = _LAST_CUT.match(text, start, start + size + 1) or _NEXT_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.end()], False
        start = cut.end()
    yield text[start:], last


def _document_pieces(parts: Iterable[tuple[str, bool]], size: int | None) -> Iterator[tuple[str, bool]]:
    """Documents given as (text, last) parts, re-cut into (piece, last) pieces at clean cuts. The text after a
    part's last cut waits for the next part, so memory stays near one part unless cuts are far apart."""
    held: list[str] = []  # the current document since its last cut
    for text, last in parts:
        cut = None if last or size is None else _LAST_CUT.match(text)
        if last:
            held.append(text)
            yield from _pieces("".join(held), size, True)
            held = []
        elif cut is None:
            held.append(text)
        else:
            held.append(text[:cut.end()])
            yield from _pieces("".join(held), size, False)
            held = [text[cut.end():]]


def tokenize_pieces(tokenizer, parts: Iterable[tuple[str, bool]],
                    batch_size: int = 256) -> Iterator[tuple[list[int], bool]]:
    """Token ids, no special tokens, of documents given as (text, last) parts (`iter_document_parts`), as
    (ids, last) pairs: a document's ids are its pieces' ids in order, exactly those of the whole document.
    Batched (at most `batch_size` pieces, about `BATCH_CHARS` characters) because the fast tokenizer
    parallelises batches."""
    size = PIECE_CHARS if _cuts_cleanly(tokenizer) else None
    batch: list[tuple[str, bool]] = []
    chars = 0
    for piece, last in _document_pieces(parts, size):
        batch.append((piece, last))
        chars += len(piece)
        if len(batch) == batch_size or chars >= BATCH_CHARS:
            yield from _encode(tokenizer, batch)
            batch, chars = [], 0
    yield from _encode(tokenizer, batch)


def _encode(tokenizer, batch: list[tuple[str, bool]]) -> Iterator[tuple[list[int], bool]]:
    if batch:
        texts, lasts = zip(*batch)
        yield from zip(tokenizer(list(texts), add_special_tokens=False)["input_ids"], lasts)


def tokenize_documents(tokenizer, documents: Iterable[str], batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids per document, no special tokens; a long document is tokenised in pieces (`tokenize_pieces`)."""
    ids: list[int] = []
    for piece, last in tokenize_pieces(tokenizer, ((doc, True) for doc in documents), batch_size):
        if last and not ids:
            yield piece
            continue
        ids.extend(piece)
        if last:
            yield ids
            ids = []


def pack_pieces(pieces: Iterable[tuple[list[int], bool]], block_size: int, eos_id: int,
                pad_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, labels) blocks of `block_size` from documents' token pieces ((ids, last) pairs, EOS after
    each `last`); labels equal input_ids except the final block's padding. Blocks are sliced straight out of
    each piece, so a piece is never copied whole and fewer than `block_size` tokens wait between pieces."""
    carry: list[int] = []
    for ids in _with_eos(pieces, eos_id):
        start = 0
        if carry:
            start = min(len(ids), block_size - len(carry))
            carry += ids[:start]
            if len(carry) < block_size:
                continue
            yield carry, list(carry)
        end = start + (len(ids) - start) // block_size * block_size
        for offset in range(start, end, block_size):
            block = ids[offset:offset + block_size]
            yield block, list(block)
        carry = ids[end:]
    if carry:
        pad = block_size - len(carry)
        yield carry + [pad_id] * pad, carry + [IGNORE_INDEX] * pad


def _with_eos(pieces: Iterable[tuple[list[int], bool]], eos_id: int) -> Iterator[list[int]]:
    for ids, last in pieces:
        yield ids
        if last:
            yield [eos_id]


def pack_blocks(token_docs: Iterable[list[int]], block_size: int, eos_id: int,
                pad_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """`pack_pieces` for whole documents, one id list each."""
    return pack_pieces(((doc, True) for doc in token_docs), block_size, eos_id, pad_id)


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


def _spec_pieces(spec: str, tokenizer, text_field: str) -> Iterator[tuple[list[int], bool]]:
    return tokenize_pieces(tokenizer, iter_document_parts(spec, text_field))


def packed_blocks(spec: str, tokenizer, block_size: int, text_field: str):
    """`spec` streamed as (input_ids, labels) blocks, in memory bounded by a part and a tokenizer batch."""
    return pack_pieces(_spec_pieces(spec, tokenizer, text_field), block_size, tokenizer.eos_token_id,
                       tokenizer.pad_token_id)


def _packed_tensor(spec: str, tokenizer, block_size: int, text_field: str) -> tuple[torch.Tensor, int]:
    """Every block of `spec` as one [N, L] tensor (the `pack_pieces` blocks), and the number of real tokens."""
    flat = array("q")
    for ids, last in _spec_pieces(spec, tokenizer, text_field):
        flat.extend(ids)
        if last:
            flat.append(tokenizer.eos_token_id)
    n_tokens = len(flat)
    flat.extend([tokenizer.pad_token_id] * (-n_tokens % block_size))
    stream = torch.frombuffer(flat, dtype=torch.long) if flat else torch.empty(0, dtype=torch.long)
    return stream.view(-1, block_size), n_tokens


def _select(blocks: torch.Tensor, keep: torch.Tensor, n_tokens: int) -> PackedBlocks:
    """The rows of `blocks` where `keep`, with the padding of the final block masked in the labels."""
    ids = blocks[keep]
    labels = ids.clone()
    if len(blocks) and keep[-1]:
        labels[-1, n_tokens - (len(blocks) - 1) * blocks.shape[1]:] = IGNORE_INDEX
    return PackedBlocks(ids, labels)


def pack_corpus(spec: str, tokenizer, block_size: int, eval_fraction: float, seed: int,
                text_field: str = "text") -> tuple[PackedBlocks, PackedBlocks]:
    """All of `spec` in memory as (train, held-out) blocks, split by `is_held_out`."""
    blocks, n_tokens = _packed_tensor(spec, tokenizer, block_size, text_field)
    held = torch.tensor([is_held_out(i, eval_fraction, seed) for i in range(len(blocks))], dtype=torch.bool)
    train, held_out = _select(blocks, ~held, n_tokens), _select(blocks, held, n_tokens)
    if not len(train) or (eval_fraction > 0 and not len(held_out)):
        raise DataError(f"{spec}: {n_tokens} tokens make {len(train)} training and {len(held_out)} held-out "
                         f"blocks of {block_size}; use a smaller data.block_size, more data, or a larger "
                         "data.eval_fraction (or a separate data.eval)")
    return train, held_out


def load_blocks(spec: str, tokenizer, block_size: int, text_field: str = "text") -> PackedBlocks:
    """All of `spec` as blocks, for a separate held-out set (`data.eval`)."""
    blocks, n_tokens = _packed_tensor(spec, tokenizer, block_size, text_field)
    if not len(blocks):
        raise DataError(f"{spec}: no text found for held-out data")
    return _select(blocks, torch.ones(len(blocks), dtype=torch.bool), n_tokens)
