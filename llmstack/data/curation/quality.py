"""Heuristic quality rules: C4's line and page rules (Raffel et al. 2020, section 2.2) and Gopher's quality
and repetition rules (Rae et al. 2021, appendix A.1.1 and table A1).

Words are whitespace-separated tokens throughout, so every count here can be checked by hand. Each rule
reports the first check a document fails, with the measured value as evidence.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

import numpy as np

from llmstack.data.curation.rules import MAX_EXAMPLES, Outcome, line_around

TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019")  # closing quotes end a quoted sentence
ELLIPSES = ("...", "\u2026")
# a run of . ! ? (and closing quotes or brackets) at the end of a token ends a sentence, unless the token
# is a common abbreviation or an initial
_SENTENCE_END = re.compile(r"(?<!\S)(\S*?)[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "rev", "gen", "col", "capt", "lt",
                           "vs", "etc", "e.g", "i.e", "no", "vol", "fig", "p"})


def count_sentences(text: str) -> int:
    count = 0
    for match in _SENTENCE_END.finditer(text):
        word = match.group(1).lower()
        if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        count += 1
    return count


class C4:
    """C4's rules. Page rules on the raw document: drop it if it holds a curly bracket or 'lorem ipsum'.
    Line rules (kept lines are rejoined): drop lines with a word longer than `max_word_length`, lines not
    ending in terminal punctuation (or ending in an ellipsis), lines of fewer than `min_words_per_line`
    words, and lines holding a boilerplate phrase. Then drop the page if fewer than `min_sentences`
    sentences remain. The curly-bracket check reads every line, not only those the line rules keep, so
    code fragments go as the paper says."""

    name, kind = "c4", "filter"

    def __init__(self, terminal_punctuation: bool = True, min_words_per_line: int = 3, max_word_length: int = 1000,
                 boilerplate: list[str] = ("javascript", "terms of use", "privacy policy"), min_sentences: int = 5,
                 curly_bracket: bool = True, lorem_ipsum: bool = True):
        self.terminal_punctuation = terminal_punctuation
        self.min_words_per_line = min_words_per_line
        self.max_word_length = max_word_length
        self.boilerplate = tuple(p.lower() for p in boilerplate)
        self.min_sentences = min_sentences
        self.curly_bracket = curly_bracket
        self.lorem_ipsum = lorem_ipsum

    def line_reason(self, line: str) -> str | None:
        """Why the line rules drop `line` (stripped), or None to keep it."""
        words = line.split()
        if any(len(w) > self.max_word_length for w in words):
            return "long_word"
        if self.terminal_punctuation and (not line.endswith(TERMINAL) or line.endswith(ELLIPSES)):
            return "no_terminal_punctuation"
        if len(words) < self.min_words_per_line:
            return "too_few_words"
        lower = line.lower()
        phrase = next((p for p in self.boilerplate if p in lower), None)
        return f"boilerplate:{phrase}" if phrase else None

    def apply(self, text: str) -> Outcome:
        if self.curly_bracket:
            found = [i for i in (text.find("{"), text.find("}")) if i >= 0]
            if found:
                return Outcome(True, "curly_bracket", line_around(text, min(found)))
        if self.lorem_ipsum:
            at = text.lower().find("lorem ipsum")
            if at >= 0:
                return Outcome(True, "lorem_ipsum", line_around(text, at))
        kept, dropped, examples = [], Counter(), []
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            reason = self.line_reason(line)
            if reason is None:
                kept.append(line)
                continue
            dropped[f"line:{reason}"] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append((reason, line[:200]))
        new_text = "\n".join(kept) if dropped else None
        sentences = count_sentences(text if new_text is None else new_text)
        if sentences < self.min_sentences:
            return Outcome(True, "too_few_sentences", f"{sentences} < {self.min_sentences}")
        if new_text is None:
            return Outcome()
        return Outcome(reason="lines", evidence=f"{sum(dropped.values())} lines dropped", text=new_text,
                       counts=dict(dropped), examples=tuple(examples))


STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("\u2022", "-", "*", "\u2023", "\u25e6", "\u25cf", "\u25aa")
_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2014\u2013\u2026"
_ALNUM = re.compile(r"[^\W_]")  # a letter or a digit
_ALPHA = re.compile(r"[^\W\d_]")  # a letter


class GopherQuality:
    """Gopher's quality rules, in the paper's order: word count, mean word length, '#' and ellipsis per word,
    lines starting with a bullet, lines ending in an ellipsis, words holding a letter, and English stop words.
    Word counts and lengths use words holding a letter or digit, stripped of surrounding punctuation."""

    name, kind = "gopher_quality", "filter"

    def __init__(self, min_words: int = 50, max_words: int = 100_000, min_mean_word_length: float = 3.0,
                 max_mean_word_length: float = 10.0, max_symbol_word_ratio: float = 0.1,
                 max_bullet_lines: float = 0.9, max_ellipsis_lines: float = 0.3, min_alpha_words: float = 0.8,
                 min_stop_words: int = 2):
        self.min_words, self.max_words = min_words, max_words
        self.min_mean, self.max_mean = min_mean_word_length, max_mean_word_length
        self.max_symbols = max_symbol_word_ratio
        self.max_bullets, self.max_ellipsis_lines = max_bullet_lines, max_ellipsis_lines
        self.min_alpha, self.min_stop_words = min_alpha_words, min_stop_words

    def apply(self, text: str) -> Outcome:
        tokens = text.split()
        stripped = [t.strip(_STRIP) for t in tokens]
        words = [w for w in stripped if _ALNUM.search(w)]
        n = len(words)
        if n < self.min_words:
            return Outcome(True, "too_few_words", f"{n} < {self.min_words}")
        if n > self.max_words:
            return Outcome(True, "too_many_words", f"{n} > {self.max_words}")
        if not n:
            return Outcome()
        mean = sum(map(len, words)) / n
        if mean < self.min_mean:
            return Outcome(True, "short_words", f"mean word length {mean:.2f} < {self.min_mean}")
        if mean > self.max_mean:
            return Outcome(True, "long_words", f"mean word length {mean:.2f} > {self.max_mean}")
        for reason, count in (("hash_ratio", text.count("#")),
                              ("ellipsis_ratio", sum(text.count(e) for e in ELLIPSES))):
            if count / len(tokens) > self.max_symbols:
                return Outcome(True, reason, f"{count}/{len(tokens)} words > {self.max_symbols}")
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        bullets = sum(line.startswith(BULLETS) for line in lines) / len(lines)
        if bullets > self.max_bullets:
            return Outcome(True, "bullet_lines", f"{bullets:.2f} of lines > {self.max_bullets}")
        trailing = sum(line.endswith(ELLIPSES) for line in lines) / len(lines)
        if trailing > self.max_ellipsis_lines:
            return Outcome(True, "ellipsis_lines", f"{trailing:.2f} of lines > {self.max_ellipsis_lines}")
        alpha = sum(1 for t in tokens if _ALPHA.search(t)) / len(tokens)
        if alpha < self.min_alpha:
            return Outcome(True, "few_alpha_words", f"{alpha:.2f} of words < {self.min_alpha}")
        stops = STOP_WORDS.intersection(w.lower() for w in words)
        if len(stops) < self.min_stop_words:
            return Outcome(True, "few_stop_words", f"{len(stops)} ({', '.join(sorted(stops)) or 'none'}) "
                                                   f"< {self.min_stop_words}")
        return Outcome()


def _repeats(items: list[str]) -> tuple[int, int, str]:
    """(items equal to an earlier item, their characters, the first such item)."""
    seen, count, chars, first = set(), 0, 0, ""
    for item in items:
        if item in seen:
            count, chars, first = count + 1, chars + len(item), first or item
        else:
            seen.add(item)
    return count, chars, first


class GopherRepetition:
    """Gopher's repetition rules: the share of repeated lines and paragraphs (by count and by characters),
    the share of word characters covered by the most frequent 2-, 3- and 4-gram, and by all repeated 5- to
    10-grams (every occurrence of an n-gram that occurs more than once; overlaps counted once)."""

    name, kind = "gopher_repetition", "filter"

    def __init__(self, max_duplicate_lines: float = 0.3, max_duplicate_line_chars: float = 0.2,
                 max_duplicate_paragraphs: float = 0.3, max_duplicate_paragraph_chars: float = 0.2,
                 top_ngram_chars: list[float] = (0.20, 0.18, 0.16),
                 duplicate_ngram_chars: list[float] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)):
        self.limits = {"line": (max_duplicate_lines, max_duplicate_line_chars),
                       "paragraph": (max_duplicate_paragraphs, max_duplicate_paragraph_chars)}
        self.top = dict(zip((2, 3, 4), top_ngram_chars))
        self.duplicate = dict(zip(range(5, 11), duplicate_ngram_chars))

    def apply(self, text: str) -> Outcome:
        units = {"line": [s.strip() for s in text.split("\n") if s.strip()],
                 "paragraph": [s.strip() for s in re.split(r"\n[ \t]*\n", text) if s.strip()]}
        for unit, items in units.items():
            if not items:
                continue
            max_share, max_chars = self.limits[unit]
            count, chars, first = _repeats(items)
            share, char_share = count / len(items), chars / max(1, sum(map(len, items)))
            if share > max_share:
                return Outcome(True, f"duplicate_{unit}s", f"{share:.3f} > {max_share}: {first[:120]!r}")
            if char_share > max_chars:
                return Outcome(True, f"duplicate_{unit}_chars",
                               f"{char_share:.3f} > {max_chars}: {first[:120]!r}")
        words = text.split()
        top, duplicate = ngram_shares(words, self.top, self.duplicate)
        for n, limit in self.top.items():
            share, at = top.get(n, (0.0, 0))
            if share > limit:
                return Outcome(True, f"top_{n}gram", f"{share:.3f} > {limit}: {' '.join(words[at:at + n])!r}")
        for n, limit in self.duplicate.items():
            share = duplicate.get(n, 0.0)
            if share > limit:
                return Outcome(True, f"duplicate_{n}grams", f"{share:.3f} > {limit}")
        return Outcome()


def ngram_shares(words: list[str], top_ns: Iterable[int], duplicate_ns: Iterable[int]) -> tuple[dict, dict]:
    """Shares of word characters (whitespace excluded). For n in `top_ns`: {n: (share in all occurrences of
    the most frequent n-gram, ties going to the longest; a position where it occurs)}, only for n-grams that
    occur more than once. For n in `duplicate_ns`: {n: share inside some occurrence of an n-gram that occurs
    more than once}, overlaps counted once. n >= 2."""
    top_ns, duplicate_ns = set(top_ns), set(duplicate_ns)
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words))
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    top, duplicate = {}, {}
    rank, chars = ids, lengths  # rank: an id per distinct n-gram, exact; chars: characters per n-gram
    for n in range(2, min(max(top_ns | duplicate_ns, default=1), len(words)) + 1):
        # an n-gram is an (n-1)-gram and one more word: number the pairs, no hashing, no collisions
        _, rank, counts = np.unique(rank[:-1] * len(vocab) + ids[n - 1:], return_inverse=True, return_counts=True)
        occurrences = counts[rank.ravel()]
        chars = chars[:-1] + lengths[n - 1:]
        if n in top_ns and occurrences.max() > 1:
            candidates = np.flatnonzero(occurrences == occurrences.max())
            best = int(candidates[np.argmax(chars[candidates])])
            top[n] = (float(occurrences[best] * chars[best] / total), best)
        if n in duplicate_ns:
            starts = np.flatnonzero(occurrences > 1)
            cover = np.zeros(len(words) + 1, dtype=np.int64)
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + n, -1)
            duplicate[n] = float(lengths[np.cumsum(cover[:-1]) > 0].sum() / total) if len(starts) else 0.0
    return top, duplicate
