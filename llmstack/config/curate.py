"""The curation stage's schema: the input, the output, and an ordered list of rules with their parameters.

Rules are named in `rules.order`; each rule's parameters live in the section of the same name, so every
parameter is a typed, documented key with bounds (`rules.c4.min_sentences=3` on the command line), and a
misspelt rule or parameter fails at start-up with the allowed names:

    rules:
      order: [gutenberg, paragraphs, language, c4, exact_dedup]
      c4: {min_sentences: 3}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from llmstack.config.limits import COUNT_MAX, SEED_MAX, SHARDS_MAX
from llmstack.config.loading import ConfigError, option
from llmstack.config.paths import overwrite_option

RuleName = Literal["gutenberg", "pii", "paragraphs", "language", "c4", "gopher_quality", "gopher_repetition",
                   "wordlist", "exact_dedup", "near_dedup"]
RULE_NAMES: tuple[str, ...] = get_args(RuleName)
# rules that rewrite a document and never judge it, so they may run on whole documents before `paragraphs`
MODIFIERS = ("gutenberg", "pii")


@dataclass
class CurateDataConfig:
    train: str = option("synthetic-noisy:500", "Input: a file (.txt, .jsonl, .json, .parquet, .gz), a directory of "
                        "them, a `datasets` name ('name[:config][@split]'), 'synthetic[:N]' (the built-in corpus) "
                        "or 'synthetic-noisy[:N]' (the built-in corpus with planted noise, seeded by `seed`).")
    text_field: str = option("text", "Field holding the text in JSON/Parquet records.")
    id_field: str = option("id", "Field holding a record's id; records without it are named by file and line.")
    shard_index: int = option(0, "This node's shard when the input is split over nodes.", ge=0, le=SHARDS_MAX)
    num_shards: int = option(1, "Nodes the input is split over: files are dealt round-robin (records, for a "
                             "`datasets` name). Deduplication then covers one shard; see the curate module.",
                             ge=1, le=SHARDS_MAX)

    def validate(self, prefix: str) -> None:
        if self.shard_index >= self.num_shards:
            raise ConfigError(f"config key '{prefix}.shard_index': {self.shard_index} is out of range; allowed: "
                              f"< {prefix}.num_shards ({self.num_shards})")


@dataclass
class GutenbergRule:
    strip_mentions: bool = option(True, "Also drop body lines that name Project Gutenberg, as its licence asks of "
                                  "copies stripped of the header and footer.")


@dataclass
class PIIRule:
    email: bool = option(True, "Replace e-mail addresses with [EMAIL].")
    ipv4: bool = option(True, "Replace IPv4 addresses with [IP].")
    phone: bool = option(True, "Replace phone numbers (+country forms and North American 3-3-4 forms) with [PHONE].")


@dataclass
class ParagraphsRule:
    min_words: int = option(200, "Split each document at blank lines into passages of whole paragraphs with at "
                            "least this many words (a short tail joins the passage before it); 0: one passage "
                            "per paragraph. Lines wrapped inside a paragraph are joined.", ge=0, le=COUNT_MAX)


@dataclass
class LanguageRule:
    languages: list[str] = option(default_factory=lambda: ["en"], help="ISO 639-1 codes to keep (py3langid's 97 "
                                  "languages); empty: any language.")
    min_score: float = option(0.65, "Lowest probability of the detected language for a document to stay.",
                              ge=0.0, le=1.0)


@dataclass
class C4Rule:
    terminal_punctuation: bool = option(True, "Drop lines that do not end in . ! ? or a closing quote, and lines "
                                        "ending in an ellipsis.")
    min_words_per_line: int = option(3, "Drop lines with fewer words.", ge=0, le=COUNT_MAX)
    max_word_length: int = option(1000, "Drop lines holding a longer word (characters).", ge=1, le=COUNT_MAX)
    boilerplate: list[str] = option(default_factory=lambda: ["javascript", "terms of use", "privacy policy",
                                                             "cookie policy", "uses cookies", "use of cookies",
                                                             "use cookies"],
                                    help="Drop lines containing any of these phrases (case-insensitive).")
    min_sentences: int = option(5, "Drop documents with fewer sentences left after the line rules.", ge=0, le=COUNT_MAX)
    curly_bracket: bool = option(True, "Drop documents containing { or } (code, templates).")
    lorem_ipsum: bool = option(True, "Drop documents containing 'lorem ipsum' (placeholder text).")


@dataclass
class GopherQualityRule:
    min_words: int = option(50, "Fewest words (holding a letter or digit).", ge=0, le=COUNT_MAX)
    max_words: int = option(100_000, "Most words.", ge=1, le=COUNT_MAX)
    min_mean_word_length: float = option(3.0, "Shortest mean word length (characters).", ge=0.0)
    max_mean_word_length: float = option(10.0, "Longest mean word length (characters).", gt=0.0)
    max_symbol_word_ratio: float = option(0.1, "Most '#' per word, and most ellipses per word.", ge=0.0)
    max_bullet_lines: float = option(0.9, "Largest share of lines starting with a bullet.", ge=0.0, le=1.0)
    max_ellipsis_lines: float = option(0.3, "Largest share of lines ending in an ellipsis.", ge=0.0, le=1.0)
    min_alpha_words: float = option(0.8, "Smallest share of words holding a letter.", ge=0.0, le=1.0)
    min_stop_words: int = option(2, "Fewest distinct English stop words (the, be, to, of, and, that, have, "
                                 "with); 0 turns the check off for other languages.", ge=0, le=8)

    def validate(self, prefix: str) -> None:
        if self.min_words > self.max_words:
            raise ConfigError(f"config key '{prefix}.min_words': {self.min_words} is more than "
                              f"{prefix}.max_words ({self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ConfigError(f"config key '{prefix}.min_mean_word_length': {self.min_mean_word_length} is more "
                              f"than {prefix}.max_mean_word_length ({self.max_mean_word_length})")


@dataclass
class GopherRepetitionRule:
    max_duplicate_lines: float = option(0.3, "Largest share of lines that repeat an earlier line.", ge=0.0, le=1.0)
    max_duplicate_line_chars: float = option(0.2, "Largest share of characters in repeated lines.", ge=0.0, le=1.0)
    max_duplicate_paragraphs: float = option(0.3, "Largest share of paragraphs that repeat an earlier one.",
                                             ge=0.0, le=1.0)
    max_duplicate_paragraph_chars: float = option(0.2, "Largest share of characters in repeated paragraphs.",
                                                  ge=0.0, le=1.0)
    top_ngram_chars: list[float] = option(default_factory=lambda: [0.20, 0.18, 0.16],
                                          help="For n = 2, 3, 4: largest share of word characters covered by the "
                                               "most frequent n-gram.")
    duplicate_ngram_chars: list[float] = option(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
                                                help="For n = 5..10: largest share of word characters covered by "
                                                     "n-grams that occur more than once.")

    def validate(self, prefix: str) -> None:
        for key, values, size in (("top_ngram_chars", self.top_ngram_chars, 3),
                                  ("duplicate_ngram_chars", self.duplicate_ngram_chars, 6)):
            if len(values) != size or not all(0.0 <= v <= 1.0 for v in values):
                raise ConfigError(f"config key '{prefix}.{key}': {values!r} is not allowed; expected {size} "
                                  "shares in [0, 1]")


@dataclass
class WordListRule:
    path: str | None = option(None, "Word list file: one word or phrase per line, '#' starts a comment. Matched "
                              "as whole words, case-insensitive. Required when 'wordlist' is in rules.order.")
    min_matches: int = option(1, "Drop documents with at least this many matches.", ge=1, le=COUNT_MAX)


@dataclass
class ExactDedupRule:
    """Exact duplicates after Unicode NFKC, case folding and collapsing whitespace; nothing to set."""


@dataclass
class NearDedupRule:
    threshold: float = option(0.8, "Jaccard similarity of word n-gram sets above which a document is a "
                              "near-duplicate of an earlier kept one.", gt=0.0, le=1.0)
    ngram: int = option(5, "Words per shingle.", ge=1, le=1024)
    num_perm: int = option(128, "MinHash permutations (4 bytes each of index state per kept document).", ge=2, le=4096)
    bands: int = option(16, "LSH bands (num_perm / bands rows each); more bands find more candidates, each "
                        "checked against the threshold.", ge=1, le=4096)

    def validate(self, prefix: str) -> None:
        if self.num_perm % self.bands:
            raise ConfigError(f"config key '{prefix}.bands': {self.bands} does not divide {prefix}.num_perm "
                              f"({self.num_perm})")


@dataclass
class RulesConfig:
    order: list[RuleName] = option(default_factory=lambda: ["gutenberg", "language", "c4", "gopher_quality",
                                                            "gopher_repetition", "exact_dedup", "near_dedup",
                                                            "pii"],
                                   help="Rules in the order they run; each rule's parameters are in the section of "
                                        "its name. Only gutenberg and pii may come before paragraphs.")
    gutenberg: GutenbergRule = option(default_factory=GutenbergRule)
    pii: PIIRule = option(default_factory=PIIRule)
    paragraphs: ParagraphsRule = option(default_factory=ParagraphsRule)
    language: LanguageRule = option(default_factory=LanguageRule)
    c4: C4Rule = option(default_factory=C4Rule)
    gopher_quality: GopherQualityRule = option(default_factory=GopherQualityRule)
    gopher_repetition: GopherRepetitionRule = option(default_factory=GopherRepetitionRule)
    wordlist: WordListRule = option(default_factory=WordListRule)
    exact_dedup: ExactDedupRule = option(default_factory=ExactDedupRule)
    near_dedup: NearDedupRule = option(default_factory=NearDedupRule)

    def validate(self, prefix: str) -> None:
        seen = set()
        for index, name in enumerate(self.order):
            if name in seen:
                raise ConfigError(f"config key '{prefix}.order[{index}]': rule '{name}' is listed twice")
            seen.add(name)
        if "paragraphs" in self.order:
            before = self.order[:self.order.index("paragraphs")]
            for name in before:
                if name not in MODIFIERS:
                    raise ConfigError(f"config key '{prefix}.order': '{name}' comes before 'paragraphs'; only "
                                      f"{', '.join(MODIFIERS)} may run on whole documents before they are split")
        if "wordlist" in self.order:
            path = self.wordlist.path
            if not path:
                raise ConfigError(f"config key '{prefix}.wordlist.path' is required when 'wordlist' is in "
                                  f"{prefix}.order")
            if not Path(path).is_file():
                raise ConfigError(f"config key '{prefix}.wordlist.path': file not found: {path}")

    def as_list(self) -> list[tuple[str, dict]]:
        """The rules to run, in order, as (name, parameters): what the library takes."""
        return [(name, dataclasses.asdict(getattr(self, name))) for name in self.order]


@dataclass
class CurateConfig:
    """Pretraining data curation: ordered filters, deduplication and masking, with a per-rule audit."""

    output_dir: str = option("runs/curate", "Run directory: data/ (the kept documents), curation.json, "
                             "CURATION.md, record.json. A finished run there is not redone.")
    overwrite_output_dir: bool = overwrite_option()
    seed: int = option(0, "Seed for the audit's samples, the MinHash permutations and 'synthetic-noisy'.",
                       ge=0, le=SEED_MAX)
    data: CurateDataConfig = option(default_factory=CurateDataConfig)
    rules: RulesConfig = option(default_factory=RulesConfig)
    workers: int = option(1, "Processes that evaluate the rules; results are identical for any number.", ge=1, le=1024)
    format: Literal["jsonl", "parquet"] = option("jsonl", "Format of the kept documents ({'id', 'text'} rows).")
    shard_size: int = option(100_000, "Documents per output file.", ge=1, le=COUNT_MAX)
    audit_samples: int = option(5, "Removed documents (and changed lines) kept per rule as examples in the "
                                "audit, drawn uniformly from all of them.", ge=0, le=10_000)
