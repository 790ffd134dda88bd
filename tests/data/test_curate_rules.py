"""Each curation rule on hand-made documents: what it keeps, what it removes or rewrites, and why."""

import random
from collections import Counter

import pytest

from llmstack.data.curation.dedup import ExactDedup, NearDedup, normalise
from llmstack.data.curation.quality import C4, GopherQuality, GopherRepetition, count_sentences, ngram_shares
from llmstack.data.curation.rules import PII, Gutenberg, Language, Paragraphs, WordList

BOOK = ("The Project Gutenberg EBook of Tiny Tales\n\nTitle: Tiny Tales\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***\n\nChapter 1\n\nIt was a dark night.\n"
        "Project Gutenberg volunteers typed this line.\n\nThe end came.\n\n"
        "End of the Project Gutenberg EBook of Tiny Tales\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***\n\nThe licence text goes here. Section 1.C.\n")


def test_gutenberg_strips_header_footer_and_mentions():
    out = Gutenberg().apply(BOOK)
    assert not out.remove
    assert out.text == "Chapter 1\n\nIt was a dark night.\n\nThe end came."
    # 7 + 3 + 10 words before the body; 9 + 10 + 7 from the 'End of the Project Gutenberg' line on
    assert out.counts == {"header_words": 20, "footer_words": 26, "mention_lines": 1}
    assert ("footer", "End of the Project Gutenberg EBook of Tiny Tales") in out.examples


def test_gutenberg_keeps_mentions_when_asked_and_leaves_other_texts_alone():
    kept = Gutenberg(strip_mentions=False).apply(BOOK).text
    assert "Project Gutenberg volunteers typed this line." in kept
    assert Gutenberg().apply("A plain story with no licence at all.") == (False, "", "", None, None, ())


def test_pii_masks_emails_phones_and_ips_but_not_other_numbers():
    text = ("Mail ann.lee+news@mail.example.co.uk or call +44 20 7946 0958 or (555) 123-4567; the box is "
            "192.168.0.12. In 1805, 3.14 and 1.2.3 are numbers, as are 2020-12-31, 12:30 and 5551234567.")
    out = PII().apply(text)
    assert out.text == ("Mail [EMAIL] or call [PHONE] or [PHONE]; the box is [IP]. In 1805, 3.14 and 1.2.3 are "
                        "numbers, as are 2020-12-31, 12:30 and 5551234567.")
    assert out.counts == {"email": 1, "phone": 2, "ipv4": 1} and not out.remove
    assert "ann.lee" not in out.evidence  # the audit never sees the values
    assert PII(phone=False).apply("call 555-123-4567 now").text is None


def test_paragraphs_join_wrapped_lines_and_group_to_min_words():
    text = "one two\nthree\n\nfour five six\n\n\nseven\n  \neight nine"
    assert Paragraphs(3).split(text) == ["one two three", "four five six", "seven\neight nine"]
    assert Paragraphs(4).split(text) == ["one two three\nfour five six\nseven\neight nine"]  # short tail joins
    assert Paragraphs(0).split(text) == ["one two three", "four five six", "seven", "eight nine"]
    assert Paragraphs(5).split("\n \n") == []


def test_language_keeps_english_removes_german_and_unsure_text():
    english = ("It is a truth universally acknowledged, that a single man in possession of a good fortune must "
               "want a wife.")
    german = "Es ist eine allgemein anerkannte Wahrheit, dass ein alleinstehender Mann eine Frau braucht."
    rule = Language(["en"], 0.65)
    assert rule.apply(english) == (False, "", "", None, None, ())
    out = rule.apply(german)
    assert out.remove and out.reason == "language:de" and out.evidence.startswith("de ")
    assert float(out.evidence.split()[1]) > 0.9
    assert not Language([], 0.65).apply(german).remove  # any language
    assert rule.apply("Mr. Bennet made no answer.").reason == "low_score"  # too short to be sure


def test_c4_line_rules_drop_lines_with_their_reasons():
    text = ("This line is fine and ends well.\nNo punctuation here\nToo short.\n"
            "Please enable javascript to continue.\nA line ending in an ellipsis...\n\n"
            "Another good line is here!\n\u201cA quoted line ends here.\u201d")
    out = C4(min_sentences=0).apply(text)
    assert not out.remove
    assert out.text == ("This line is fine and ends well.\nAnother good line is here!\n"
                        "\u201cA quoted line ends here.\u201d")
    assert out.counts == {"line:no_terminal_punctuation": 2, "line:too_few_words": 1,
                          "line:boilerplate:javascript": 1}
    assert out.examples[0] == ("no_terminal_punctuation", "No punctuation here")
    assert C4(min_sentences=0, max_word_length=10).apply("A supercalifragilistic word is here.").remove is False
    assert C4(min_sentences=1, max_word_length=10).apply("A supercalifragilistic word is here.").reason == \
        "too_few_sentences"  # its only line went for the long word


@pytest.mark.parametrize("text, reason, evidence", [
    ("Fine sentence one here.\nfunction f() { return 1; }\nFine sentence two here.", "curly_bracket",
     "function f() { return 1; }"),
    ("Fine sentence one here.\nLorem ipsum dolor sit amet.", "lorem_ipsum", "Lorem ipsum dolor sit amet."),
    ("One sentence is here. Two sentences are here.", "too_few_sentences", "2 < 3"),
])
def test_c4_page_rules_remove_documents(text, reason, evidence):
    out = C4(min_sentences=3).apply(text)
    assert (out.remove, out.reason, out.evidence) == (True, reason, evidence)


def test_sentence_count_skips_abbreviations_and_initials():
    text = ("Mr. Darcy met Dr. Smith at St. Paul's. They talked! Did they? J. R. Tolkien wrote \u201cIt ends.\u201d "
            "Then e.g. this is one.")
    assert count_sentences(text) == 5


@pytest.mark.parametrize("text, params, reason, evidence", [
    ("the cat and the dog", {"min_words": 6}, "too_few_words", "5 < 6"),
    ("a b c d e f g h", {"min_words": 1}, "short_words", "mean word length 1.00 < 3.0"),
    ("internationalisation " * 3, {"min_words": 1}, "long_words", "mean word length 20.00 > 10.0"),
    ("#tag #tag word word", {"min_words": 1}, "hash_ratio", "2/4 words > 0.1"),
    ("wait... and then... the end of the story here", {"min_words": 1}, "ellipsis_ratio", "2/9 words > 0.1"),
    ("- the first item\n- the second item", {"min_words": 1}, "bullet_lines", "1.00 of lines > 0.9"),
    ("the cats sat\u2026\nthe dogs ran\u2026\nthe end of this", {"min_words": 1, "max_symbol_word_ratio": 1.0},
     "ellipsis_lines", "0.67 of lines > 0.3"),
    ("the cat and 12345 67890 12345 67890", {"min_words": 1}, "few_alpha_words", "0.43 of words < 0.8"),
    ("cats chase mice daily", {"min_words": 1}, "few_stop_words", "0 (none) < 2"),
])
def test_gopher_quality_checks(text, params, reason, evidence):
    out = GopherQuality(**params).apply(text)
    assert (out.remove, out.reason, out.evidence) == (True, reason, evidence)


def test_gopher_quality_keeps_ordinary_prose():
    assert not GopherQuality(min_words=5).apply("the cat sat with the dog and that was all").remove


REPETITION_OFF = {"max_duplicate_lines": 1.0, "max_duplicate_line_chars": 1.0, "max_duplicate_paragraphs": 1.0,
                  "max_duplicate_paragraph_chars": 1.0, "top_ngram_chars": [1.0] * 3,
                  "duplicate_ngram_chars": [1.0] * 6}


@pytest.mark.parametrize("text, params, reason, evidence", [
    # 1 of 3 lines repeats; 10 of 31 characters are in the repeat
    ("alpha beta\nalpha beta\ngamma delta", {"max_duplicate_lines": 0.3}, "duplicate_lines",
     "0.333 > 0.3: 'alpha beta'"),
    ("alpha beta\nalpha beta\ngamma delta", {"max_duplicate_line_chars": 0.3}, "duplicate_line_chars",
     "0.323 > 0.3: 'alpha beta'"),
    ("one two three\n\none two three\n\nfour five six seven", {"max_duplicate_paragraphs": 0.3},
     "duplicate_paragraphs", "0.333 > 0.3: 'one two three'"),
    # 'red fox' three times: 3 x 6 of 33 word characters
    ("red fox red fox red fox ran far away today", {"top_ngram_chars": [0.5, 1.0, 1.0]}, "top_2gram",
     "0.545 > 0.5: 'red fox'"),
    # 'a b c d e' twice covers 10 of 11 characters
    ("a b c d e x a b c d e", {"duplicate_ngram_chars": [0.9, 1.0, 1.0, 1.0, 1.0, 1.0]}, "duplicate_5grams",
     "0.909 > 0.9"),
])
def test_gopher_repetition_checks(text, params, reason, evidence):
    out = GopherRepetition(**{**REPETITION_OFF, **params}).apply(text)
    assert (out.remove, out.reason, out.evidence) == (True, reason, evidence)


def _naive_shares(words, n):
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts, total = Counter(grams), sum(map(len, words))
    covered = {i for start, gram in enumerate(grams) if counts[gram] > 1 for i in range(start, start + n)}
    top_count, top_chars = max(((counts[g], sum(map(len, g))) for g in grams), default=(0, 0))
    return (top_count * top_chars / total if top_count > 1 else 0.0), sum(len(words[i]) for i in covered) / total


def test_ngram_shares_match_a_naive_count():
    rng = random.Random(0)
    for _ in range(200):
        words = [rng.choice(["a", "bb", "ccc", "dd", "e", "ffff"]) for _ in range(rng.randint(1, 50))]
        top, duplicate = ngram_shares(words, (2, 3, 4), range(5, 11))
        for n in range(2, 11):
            expected_top, expected_duplicate = _naive_shares(words, n)
            if n <= 4:
                assert top.get(n, (0.0, 0))[0] == pytest.approx(expected_top)
            else:
                assert duplicate.get(n, 0.0) == pytest.approx(expected_duplicate)


def test_word_list_matches_whole_words_and_phrases(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# spam words\nCasino\npayday loan  # a phrase\n\ncasino\n")
    text = "The CASINO offered a Payday\nLoan; casinos are not matched, nor is xcasino."
    out = WordList(str(path)).apply(text)
    assert (out.remove, out.reason, out.evidence) == (True, "word_list", "casino, payday loan")
    assert out.counts == {"casino": 1, "payday loan": 1}
    assert not WordList(str(path), min_matches=3).apply(text).remove
    assert not WordList(str(path)).apply("casinos and payday loans only").remove


def test_word_list_file_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no words"):
        WordList(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        WordList(str(tmp_path / "missing.txt"))


def test_exact_dedup_key_ignores_case_width_and_whitespace():
    rule = ExactDedup()
    assert normalise(" Hello\u3000 WORLD\n") == "hello world"
    same = {rule.key(t) for t in ("Hello  World\n", "hello world", "\uff48\uff45\uff4c\uff4c\uff4f world")}
    assert len(same) == 1 and rule.key("hello world!") not in same
    index = rule.index()
    assert index.find(rule.key("hello world")) is None
    index.add(rule.key("hello world"), 7)
    assert index.find(rule.key("HELLO world")) == (7, 1.0)


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t):
        w = t.lower().split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


def test_near_dedup_finds_a_one_word_edit_and_not_an_unrelated_text():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(500)]
    original = " ".join(rng.choice(vocab) for _ in range(60))
    edited = original.rsplit(" ", 1)[0] + " changed"
    unrelated = " ".join(rng.choice(vocab) for _ in range(60))
    rule = NearDedup(threshold=0.8, seed=3)
    index = rule.index()
    index.add(rule.key(original), 4)
    number, similarity = index.find(rule.key(edited))
    assert number == 4 and abs(similarity - _jaccard(original, edited)) < 0.1  # true Jaccard 55/57
    assert index.find(rule.key(unrelated)) is None
    assert rule.key("   ") is None and index.find(None) is None
