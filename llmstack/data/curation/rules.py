"""Document rules that rewrite, split or judge one document on its own: Project Gutenberg licence stripping,
PII masking, splitting into passages, language identification and a word list. The quality heuristics are in
`quality.py`, deduplication in `dedup.py`.

A rule's `apply(text)` returns an `Outcome`: whether the rule would remove the document and why (a reason the
audit counts, and the evidence: the word, the line, the measured value), and the rewritten text when the rule
changes the document. Rules hold no state between documents, so any process may run them in any order.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

MAX_EXAMPLES = 3  # changed lines reported per document; the audit samples among them


class Outcome(NamedTuple):
    """What one rule made of one document."""

    remove: bool = False
    reason: str = ""  # a category the audit counts, e.g. "too_few_sentences", "language:de"
    evidence: str = ""  # what matched: the line, the word, the measured value
    text: str | None = None  # the document as the rule rewrote it; None: unchanged
    counts: dict | None = None  # what the rule changed or matched (lines by reason, masks by kind, words)
    examples: tuple = ()  # (reason, evidence) pairs of changes, e.g. dropped lines


def line_around(text: str, index: int, limit: int = 200) -> str:
    """The line of `text` holding position `index`, for evidence."""
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start:end if end >= 0 else len(text)].strip()[:limit]


# ---------------------------------------------------------------------------------------------------------
# Modifiers: rewrite, never judge


_PG_START = re.compile(r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
                       re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project "
                     r"Gutenberg).*$", re.IGNORECASE | re.MULTILINE)
_PG_MENTION = re.compile(r"project\s+gutenberg", re.IGNORECASE)


class Gutenberg:
    """Cut a Project Gutenberg eBook down to its text: everything up to the '*** START OF ...' marker line
    and from the '*** END OF ...' (or 'End of the Project Gutenberg ...') line on. Documents without a start
    marker are left alone. With `strip_mentions`, body lines naming Project Gutenberg go too: its licence
    (section 1.C) asks that copies without the licence carry no reference to it."""

    name, kind = "gutenberg", "modifier"

    def __init__(self, strip_mentions: bool = True):
        self.strip_mentions = strip_mentions

    def apply(self, text: str) -> Outcome:
        start = _PG_START.search(text)
        if start is None:
            return Outcome()
        end = _PG_END.search(text, start.end())
        stop = end.start() if end else len(text)
        body, mentions = text[start.end():stop], []
        if self.strip_mentions:
            lines = body.split("\n")
            mentions = [line.strip() for line in lines if _PG_MENTION.search(line)]
            body = "\n".join(line for line in lines if not _PG_MENTION.search(line))
        counts = {"header_words": len(text[:start.end()].split()), "footer_words": len(text[stop:].split()),
                  "mention_lines": len(mentions)}
        examples = [("header", start.group(0).strip())]
        examples += [("footer", end.group(0).strip())] if end else []
        examples += [("mention", line[:200]) for line in mentions[:MAX_EXAMPLES]]
        return Outcome(reason="licence", evidence=start.group(0).strip(), text=body.strip(), counts=counts,
                       examples=tuple(examples))


_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
# +country forms (8-15 digits, checked below) and North American forms: (555) 123-4567, 555.123.4567, +1 555 ...
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{2,5}){2,5}"
                    r"|(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4})(?!\w)")


def _plausible_phone(number: str) -> bool:
    digits = sum(ch.isdigit() for ch in number)
    return 10 <= digits <= 15 if number.startswith("+") else True


class PII:
    """Mask e-mail addresses, IPv4 addresses and phone numbers in place; the document stays. The audit
    records how many of each kind were masked, never the values."""

    name, kind = "pii", "modifier"

    def __init__(self, email: bool = True, ipv4: bool = True, phone: bool = True):
        self.email, self.ipv4, self.phone = email, ipv4, phone

    def apply(self, text: str) -> Outcome:
        counts = Counter()

        def mask(kind: str, token: str, check=None):
            def replace(match: re.Match) -> str:
                if check is not None and not check(match.group(0)):
                    return match.group(0)
                counts[kind] += 1
                return token
            return replace

        # e-mail first: an address may hold digit groups that look like an IP or a phone number
        if self.email:
            text = _EMAIL.sub(mask("email", "[EMAIL]"), text)
        if self.ipv4:
            text = _IPV4.sub(mask("ipv4", "[IP]"), text)
        if self.phone:
            text = _PHONE.sub(mask("phone", "[PHONE]"), text)
        if not counts:
            return Outcome()
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        return Outcome(reason="masked", evidence=summary, text=text, counts=dict(counts))


# ---------------------------------------------------------------------------------------------------------
# Split: one document in, passages out


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


class Paragraphs:
    """Split a document at blank lines into passages of whole paragraphs with at least `min_words` words; a
    tail shorter than that joins the passage before it. Lines wrapped inside a paragraph are joined with
    spaces, and each passage holds one paragraph per line, so line rules (C4) see paragraphs."""

    name, kind = "paragraphs", "split"

    def __init__(self, min_words: int = 200):
        self.min_words = min_words

    def split(self, text: str) -> list[str]:
        passages, current, words = [], [], 0
        for block in _BLANK_LINE.split(text):
            paragraph = " ".join(block.split())
            if not paragraph:
                continue
            current.append(paragraph)
            words += len(paragraph.split())
            if words >= self.min_words:
                passages.append(current)
                current, words = [], 0
        if current:
            if passages:
                passages[-1].extend(current)
            else:
                passages.append(current)
        return ["\n".join(paragraphs) for paragraphs in passages]


# ---------------------------------------------------------------------------------------------------------
# Filters: judge, never rewrite


class Language:
    """Keep documents whose most likely language is one of `languages` with probability >= `min_score`.

    The model is py3langid's (97 languages, naive Bayes over byte n-grams), shipped inside the package: no
    download at run time. It loads on first use (~0.8 s), once per process."""

    name, kind = "language", "filter"

    def __init__(self, languages: list[str] = ("en",), min_score: float = 0.65):
        self.languages = frozenset(languages)
        self.min_score = min_score
        self._identifier = None

    def _model(self):
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return self._identifier

    def detect(self, text: str) -> tuple[str, float]:
        language, score = self._model().classify(" ".join(text.split()))
        return language, float(score)

    def apply(self, text: str) -> Outcome:
        language, score = self.detect(text)
        evidence = f"{language} {score:.2f}"
        if self.languages and language not in self.languages:
            return Outcome(True, f"language:{language}", evidence)
        if score < self.min_score:
            return Outcome(True, "low_score", f"{evidence} < {self.min_score}")
        return Outcome()


def load_word_list(path: str | Path) -> list[str]:
    """Words and phrases of a word list file, lower-cased, in file order; '#' starts a comment."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise FileNotFoundError(f"word list {path}: {err.strerror}") from err
    words = []
    for line in lines:
        entry = " ".join(line.split("#", 1)[0].lower().split())
        if entry and entry not in words:
            words.append(entry)
    if not words:
        raise ValueError(f"word list {path} holds no words")
    return words


class WordList:
    """Remove documents holding at least `min_matches` occurrences of the list's words or phrases (whole
    words, case-insensitive); the evidence and the audit's breakdown name the words matched."""

    name, kind = "wordlist", "filter"

    def __init__(self, path: str, min_matches: int = 1):
        self.min_matches = min_matches
        words = load_word_list(path)
        # longest first, so a phrase wins over a word it starts with; any whitespace inside a phrase matches
        alternatives = (re.escape(w).replace(r"\ ", r"\s+") for w in sorted(words, key=len, reverse=True))
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)

    def apply(self, text: str) -> Outcome:
        hits = Counter(" ".join(m.group(0).lower().split()) for m in self._pattern.finditer(text))
        if sum(hits.values()) < self.min_matches:
            return Outcome()
        return Outcome(True, "word_list", ", ".join(sorted(hits)), counts=dict(hits))
