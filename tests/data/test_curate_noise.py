"""The noisy corpus plants what its ground truth says, where it says, checked from the texts themselves."""

import re

from llmstack.data.synthetic import corpus
from llmstack.data.synthetic_noise import BLOCKLISTED, BOILERPLATE, noisy_corpus


def shingles(text: str) -> set:
    words = text.lower().split()
    return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}


def test_ground_truth_matches_the_texts():
    docs, truth = noisy_corpus(400, seed=3)
    assert len(docs) == 400 and noisy_corpus(400, seed=3) == (docs, truth) and noisy_corpus(400, 4)[0] != docs
    planted = [set(truth[k]) for k in ("exact_duplicate", "near_duplicate", "foreign", "code", "boilerplate",
                                       "repetition", "pii", "blocklisted", "clean")]
    assert sum(map(len, planted)) == 400 and len(set().union(*planted)) == 400  # each document is one kind
    assert all(len(p) == 8 for p in planted[:-1])  # 400 // 50 of each kind
    source = set(corpus(2 * (400 - 24), seed=3))
    assert all(docs[i] in source for i in truth["clean"])
    for copy, original in truth["exact_duplicate"].items():
        assert copy > original and docs[copy] != docs[original]
        assert " ".join(docs[copy].split()) == " ".join(docs[original].split())
    for copy, original in truth["near_duplicate"].items():
        a, b = docs[original].split(), docs[copy].split()
        changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        assert copy > original and len(a) == len(b) and set(changed) <= {0, len(a) - 1} and changed
        assert len(shingles(docs[copy]) & shingles(docs[original])) / len(shingles(docs[copy]) |
                                                                           shingles(docs[original])) >= 0.9
    for i in truth["foreign"]:
        assert " der " in f" {docs[i]} " and " the " not in f" {docs[i].lower()} "
    assert all("{" in docs[i].split("\n")[-1] for i in truth["code"])
    for i, lines in truth["boilerplate"].items():
        assert docs[i].split("\n")[1:] == lines and set(lines) <= set(BOILERPLATE)
    for i in truth["repetition"]:
        tail = docs[i].split("\n")[1:]
        assert len(tail) == 7 and len(set(tail)) == 1
    patterns = {"email": r"\w+\.\d+@example\.org", "phone": r"555-\d{3}-\d{4}", "ipv4": r"203\.0\.113\.\d+"}
    for i, kinds in truth["pii"].items():
        (kind,) = kinds
        assert len(re.findall(patterns[kind], docs[i])) == 1
    for i, word in truth["blocklisted"].items():
        assert word in BLOCKLISTED and f" {word} " in docs[i]
