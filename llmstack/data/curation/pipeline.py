"""Run the rules over documents: every rule on every document, in worker processes, results in input order.

Every rule sees the document as the rules before it left it, whether or not an earlier rule would remove it:
a rule's verdict is what it would decide if it were the only rule removing anything, which is what the
audit's "only this rule" column needs. Rewrites by a rule that would remove the document are not passed on
(the document is gone at that point; later rules judge it as it came in). Dedup rules only compute their
key here; the main process decides against the index of kept documents (see `dedup.py`).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator, NamedTuple

from llmstack.data.curation.dedup import ExactDedup, NearDedup
from llmstack.data.curation.quality import C4, GopherQuality, GopherRepetition
from llmstack.data.curation.rules import PII, Gutenberg, Language, Paragraphs, WordList

RULES = {cls.name: cls for cls in (Gutenberg, PII, Paragraphs, Language, C4, GopherQuality, GopherRepetition,
                                   WordList, ExactDedup, NearDedup)}
EXCERPT = 300  # characters of a document kept for the audit's samples


class Step(NamedTuple):
    """One rule's verdict on one document, as the audit needs it."""

    remove: bool
    reason: str
    evidence: str
    words_in: int  # whitespace words of the document the rule saw
    words_out: int  # ... and of the document it passed on
    changed: bool
    counts: dict | None
    examples: tuple
    key: object = None  # dedup rules: the document's key


class Unit(NamedTuple):
    """A document after the split (or the whole document when there is none) and its rules' verdicts."""

    id: str
    excerpt: str
    steps: tuple[Step, ...]
    text: str | None  # the final text; None when a rule other than dedup removes it


class DocResult(NamedTuple):
    id: str
    nbytes: int  # UTF-8 bytes of the input document
    words: int
    pre: tuple[Step, ...]  # the rules before the split, on the whole document
    units: tuple[Unit, ...]


def build_rule(name: str, params: dict, seed: int = 0):
    if name not in RULES:
        raise ValueError(f"unknown curation rule {name!r}; rules: {', '.join(RULES)}")
    return RULES[name](**params, seed=seed) if name == "near_dedup" else RULES[name](**params)


class Pipeline:
    """The rules of one run, built once per process."""

    def __init__(self, rules: list[tuple[str, dict]], seed: int = 0):
        self.rules = [build_rule(name, params, seed) for name, params in rules]
        splits = [i for i, rule in enumerate(self.rules) if rule.kind == "split"]
        if len(splits) > 1:
            raise ValueError("curation rules: at most one split rule")
        self.split_at = splits[0] if splits else None
        before = self.rules[:self.split_at] if self.split_at is not None else []
        if any(rule.kind != "modifier" for rule in before):
            raise ValueError(f"curation rules: only modifiers may come before {self.rules[self.split_at].name}")

    @property
    def names(self) -> list[str]:
        return [rule.name for rule in self.rules]

    @property
    def kinds(self) -> list[str]:
        return [rule.kind for rule in self.rules]

    def process(self, doc_id: str, text: str) -> DocResult:
        nbytes, words = len(text.encode("utf-8")), len(text.split())
        if self.split_at is None:
            return DocResult(doc_id, nbytes, words, (), (self._unit(doc_id, text, self.rules),))
        pre, text, removed = _run(self.rules[:self.split_at], text)
        pieces = [] if removed else self.rules[self.split_at].split(text)
        after = self.rules[self.split_at + 1:]
        units = tuple(self._unit(f"{doc_id}#{k}", piece, after) for k, piece in enumerate(pieces))
        return DocResult(doc_id, nbytes, words, pre, units)

    @staticmethod
    def _unit(unit_id: str, text: str, rules: list) -> Unit:
        steps, final, removed = _run(rules, text)
        return Unit(unit_id, text[:EXCERPT], steps, None if removed else final)


def _run(rules: list, text: str) -> tuple[tuple[Step, ...], str, bool]:
    """Every rule's verdict on `text`; the text the rules leave; whether a non-dedup rule would remove it."""
    steps, removed, words = [], False, len(text.split())
    for rule in rules:
        if rule.kind == "dedup":
            steps.append(Step(False, "", "", words, words, False, None, (), rule.key(text)))
            continue
        out = rule.apply(text)
        if out.text is not None and not out.remove and not out.text.strip():
            out = out._replace(remove=True, reason="nothing_left", text=None)
        if out.remove:
            removed = True
            steps.append(Step(True, out.reason, out.evidence, words, words, False, out.counts, out.examples))
            continue
        changed = out.text is not None and out.text != text
        words_out = len(out.text.split()) if changed else words
        steps.append(Step(False, out.reason, out.evidence, words, words_out, changed, out.counts, out.examples))
        if changed:
            text, words = out.text, words_out
    return tuple(steps), text, removed


_WORKER: Pipeline | None = None


def _start_worker(rules: list[tuple[str, dict]], seed: int) -> None:
    global _WORKER
    _WORKER = Pipeline(rules, seed)


def _process_batch(batch: list[tuple[str, str]]) -> list[DocResult]:
    return [_WORKER.process(doc_id, text) for doc_id, text in batch]


def _batches(docs: Iterable[tuple[str, str]], max_docs: int, max_chars: int) -> Iterator[list[tuple[str, str]]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def evaluate(rules: list[tuple[str, dict]], docs: Iterable[tuple[str, str]], workers: int = 1, seed: int = 0,
             batch_docs: int = 64, batch_chars: int = 4 << 20) -> Iterator[DocResult]:
    """Results for `docs` ((id, text) pairs) in input order. With several workers, at most 2 x workers
    batches (each <= batch_docs documents or about batch_chars characters) are in flight, so memory stays
    bounded however long the input is. Workers are spawned, so a script calling this with workers > 1 needs
    the usual `if __name__ == "__main__":` guard."""
    if workers == 1:
        pipeline = Pipeline(rules, seed)
        for doc_id, text in docs:
            yield pipeline.process(doc_id, text)
        return
    # spawn, not fork: the main process may hold threads (pyarrow, torch) that a forked child would inherit
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(rules, seed)) as pool:
        pending = deque()
        try:
            for batch in _batches(docs, batch_docs, batch_chars):
                pending.append(pool.submit(_process_batch, batch))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
