"""The audit: what each rule removed and changed, in rule order and on its own, with samples and reasons.

Per rule (tokens are whitespace-separated words):
- reached: documents not removed by an earlier rule;
- removed: documents this rule removed in rule order (the first rule to flag a document removes it), words;
- changed: documents this rule rewrote (lines dropped, masks, licence stripped) and the words that went;
- flagged: documents this rule would remove, evaluated on every document whatever earlier rules decided;
- only: documents this rule flagged and no other rule did, i.e. what the corpus would gain back without it.
  Rewrites come before a rule in the order, so moving a rewriting rule changes what later rules see.

Dedup rules compare a document with the documents kept so far, so "flagged" for them means "a duplicate of
an earlier kept document", asked of every document but recorded in the index only for kept ones.
The samples are uniform over each rule's removals (reservoir sampling, seeded), so they do not favour the
start of the corpus.
"""

from __future__ import annotations

import random
from collections import Counter

from llmstack.data.curation.pipeline import DocResult, Step, Unit


class Reservoir:
    """A uniform sample of up to k items from a stream of unknown length (Vitter's algorithm R)."""

    def __init__(self, k: int, rng: random.Random):
        self.k, self.rng, self.seen, self.items = k, rng, 0, []

    def offer(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(item)
        elif (j := self.rng.randrange(self.seen)) < self.k:
            self.items[j] = item


class RuleStats:
    def __init__(self, name: str, kind: str, params: dict, samples: int, rng: random.Random):
        self.name, self.kind, self.params = name, kind, params
        self.reached = self.removed = self.removed_words = self.changed = self.changed_words = 0
        self.flagged = self.flagged_words = self.only = self.only_words = 0
        self.pieces = 0  # the split rule: passages made
        self.reasons: Counter = Counter()  # removals by reason
        self.counts: Counter = Counter()  # what rewrites did: lines dropped by reason, masks by kind, ...
        self.by_word: Counter = Counter()  # word list: removed documents per matched word
        self.samples = Reservoir(samples, rng)
        self.changes = Reservoir(samples, rng)

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "params": self.params, "reached": self.reached,
               "removed": {"documents": self.removed, "words": self.removed_words},
               "changed": {"documents": self.changed, "words_removed": self.changed_words},
               "flagged": {"documents": self.flagged, "words": self.flagged_words},
               "only": {"documents": self.only, "words": self.only_words},
               "reasons": dict(self.reasons.most_common()), "counts": dict(self.counts.most_common()),
               "samples": self.samples.items, "change_samples": self.changes.items}
        if self.kind == "split":
            out["passages"] = self.pieces
        if self.name == "wordlist":
            out["by_word"] = dict(sorted(self.by_word.items(), key=lambda kv: (-kv[1], kv[0])))
        return out


class Audit:
    """Consumes `DocResult`s in input order, decides duplicates, and says which documents are kept."""

    def __init__(self, names: list[str], kinds: list[str], params: list[dict], indexes: dict, samples: int = 5,
                 seed: int = 0):
        self.rules = [RuleStats(n, k, p, samples, random.Random(f"{seed}:{i}"))
                      for i, (n, k, p) in enumerate(zip(names, kinds, params))]
        self.indexes = indexes  # rule position -> dedup index
        self.split_at = kinds.index("split") if "split" in kinds else None
        self.kept_ids: list[str] = []  # document number -> id, to name the original of a duplicate
        self.input = Counter()
        self.output = Counter()

    def add(self, doc: DocResult) -> list[tuple[str, str]]:
        """Account for one input document; returns its kept (id, text) documents."""
        self.input.update(documents=1, bytes=doc.nbytes, words=doc.words)
        if doc.pre and self._walk(doc.pre, 0, doc.id, "") is not None:
            return []
        offset = 0
        if self.split_at is not None:
            split = self.rules[self.split_at]
            split.reached += 1
            split.pieces += len(doc.units)
            offset = self.split_at + 1
        kept = []
        for unit in doc.units:
            self.input["units"] += 1
            if self._walk(unit.steps, offset, unit.id, unit.excerpt) is None:
                kept.append((unit.id, unit.text))
                self._keep(unit, offset)
        return kept

    def blank(self) -> None:
        self.input["blank_skipped"] += 1

    def _verdict(self, position: int, step: Step) -> tuple[bool, str, str]:
        index = self.indexes.get(position)
        if index is None:
            return step.remove, step.reason, step.evidence
        hit = index.find(step.key)
        if hit is None:
            return False, "", ""
        number, similarity = hit
        return True, "duplicate", f"of {self.kept_ids[number]} (similarity {similarity:.2f})"

    def _walk(self, steps: tuple[Step, ...], offset: int, unit_id: str, excerpt: str) -> int | None:
        """Count one document's verdicts; returns the position of the rule that removes it, or None."""
        removed_by, flagged = None, []
        for k, step in enumerate(steps):
            position, stats = offset + k, self.rules[offset + k]
            remove, reason, evidence = self._verdict(position, step)
            if remove:
                flagged.append(position)
                stats.flagged += 1
                stats.flagged_words += step.words_in
            if removed_by is not None:
                continue
            stats.reached += 1
            if remove:
                removed_by = position
                stats.removed += 1
                stats.removed_words += step.words_in
                stats.reasons[reason] += 1
                stats.samples.offer({"id": unit_id, "reason": reason, "evidence": evidence, "text": excerpt})
                if stats.name == "wordlist":
                    stats.by_word.update((step.counts or {}).keys())
            elif step.changed:
                stats.changed += 1
                stats.changed_words += step.words_in - step.words_out
                stats.counts.update(step.counts or {})
                for change_reason, change in step.examples or ((step.reason, step.evidence),):
                    stats.changes.offer({"id": unit_id, "reason": change_reason, "evidence": change})
        if len(flagged) == 1:
            only = self.rules[flagged[0]]
            only.only += 1
            only.only_words += steps[flagged[0] - offset].words_in
        return removed_by

    def _keep(self, unit: Unit, offset: int) -> None:
        number = len(self.kept_ids)
        for k, step in enumerate(unit.steps):
            if offset + k in self.indexes:
                self.indexes[offset + k].add(step.key, number)
        if self.indexes:
            self.kept_ids.append(unit.id)
        self.output.update(documents=1, words=unit.steps[-1].words_out if unit.steps else len(unit.text.split()))

    def to_json(self) -> dict:
        units = self.input["units"]
        return {"tokens": "whitespace-separated words",
                "input": {"documents": self.input["documents"], "bytes": self.input["bytes"],
                          "words": self.input["words"], "blank_skipped": self.input["blank_skipped"],
                          **({"passages": units} if self.split_at is not None else {})},
                "output": {"documents": self.output["documents"], "words": self.output["words"]},
                "rules": [rule.to_json() for rule in self.rules],
                "dedup_index": {self.rules[p].name: len(index) for p, index in self.indexes.items()}}
