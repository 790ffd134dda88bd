"""The built-in corpus with planted noise, and the ground truth of what was planted where, so a curation run
can be checked document by document.

Each kind of noise is planted in its own documents, and each is meant for one rule:

    exact_duplicate  a copy of a clean document with extra whitespace       exact_dedup
    near_duplicate   a copy of a long clean document with its first and/or
                     last word changed (word 5-gram Jaccard >= 0.9)          near_dedup
    foreign          a story in German                                        language
    code             a clean document with a line of code (curly brackets)   c4 (removes the document)
    boilerplate      a clean document with web boilerplate lines             c4 (drops the lines only)
    repetition       a clean document followed by one line six more times    gopher_repetition
    pii              a clean document with an e-mail, phone number or IPv4   pii (masks, keeps)
    blocklisted      a clean document with a word from BLOCKLISTED           wordlist

Duplicates always come after their original. Indices in the ground truth are positions in the returned list.
"""

from __future__ import annotations

import random

from llmstack.data.sources import DataError
from llmstack.data.synthetic import CREATURES, corpus

BOILERPLATE = ("Click here to subscribe", "Javascript must be enabled to view this page.",
               "By using this site you agree to our terms of use.")
CODE = ("function total(a, b) { return a + b; }", "if (count > 0) { print(count); }",
        "for (i = 0; i < n; i++) { sum += i; }")
REPEATED = ("Buy fresh berries at the old mill today.", "Visit the village market for cheap stones.")
BLOCKLISTED = ("casino", "jackpot")  # llmstack/data/blocklist.txt lists them
REPLACEMENTS = ("yesterday", "quietly", "somewhere", "suddenly")
_DE_ANIMALS = ("Fuchs", "Eule", "Katze", "Wolf", "Reiher", "Otter", "Hase", "Maulwurf")
_DE_PLACES = ("am Fluss", "auf dem Hügel", "bei der alten Mühle", "im Wald", "auf der Wiese", "am See",
              "im Dorf", "unter der Brücke")
_DE_SENTENCES = ("Der kleine {a} wohnt {p}.", "Am Morgen geht der müde {a} {p} spazieren.",
                 "Nach dem Regen sammelt der {a} sieben Beeren {p}.", "Der {a} sieht einen alten {b} {p}.",
                 "Am Abend schläft der {a} ruhig {p}.", "Im Winter sucht der {a} Nüsse und Blätter {p}.")
KINDS = ("exact_duplicate", "near_duplicate", "foreign", "code", "boilerplate", "repetition", "pii", "blocklisted")


def _german(rng: random.Random) -> str:
    sentences = [rng.choice(_DE_SENTENCES).format(a=rng.choice(_DE_ANIMALS), b=rng.choice(_DE_ANIMALS),
                                                  p=rng.choice(_DE_PLACES)) for _ in range(rng.randint(6, 9))]
    return " ".join(sentences)


def _change_word(token: str, rng: random.Random) -> str:
    """`token` with its letters replaced by another word, punctuation kept."""
    start = next(i for i, ch in enumerate(token) if ch.isalpha())
    end = start
    while end < len(token) and token[end].isalpha():
        end += 1
    word = rng.choice([w for w in REPLACEMENTS if w != token[start:end].lower()])
    return token[:start] + (word.capitalize() if token[start].isupper() else word) + token[end:]


def _shingles(text: str, n: int = 5) -> set[str]:
    words = " ".join(text.lower().split()).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _near_copy(doc: str, rng: random.Random) -> tuple[str, list[str]]:
    words = doc.split()
    ends = [0, len(words) - 1] if rng.random() < 0.5 else [len(words) - 1]
    changed = []
    for position in ends:
        new = _change_word(words[position], rng)
        changed.append(f"{words[position]} -> {new}")
        words[position] = new
    return " ".join(words), changed


def _pii(doc: str, kind: str, rng: random.Random) -> str:
    creature = rng.choice(CREATURES)
    sentence = {"email": f"Write to the {creature} at {creature}.{rng.randint(10, 99)}@example.org today.",
                "phone": f"Call the {creature} at 555-{rng.randint(200, 999)}-{rng.randint(1000, 9999)} today.",
                "ipv4": f"The {creature} keeps its notes on 203.0.113.{rng.randint(1, 254)} now."}[kind]
    return f"{doc} {sentence}"


def noisy_corpus(n_documents: int, seed: int = 0) -> tuple[list[str], dict]:
    """`n_documents` documents and the ground truth: for each kind in KINDS, the planted documents' indices
    (a dict index -> original for duplicates, -> lines for boilerplate, -> kind counts for pii, -> word for
    blocklisted), plus "clean": documents left as the corpus made them."""
    if n_documents < 40:
        raise DataError(f"noisy_corpus needs at least 40 documents to plant every kind of noise, got {n_documents}")
    rng = random.Random(seed)
    per_kind = max(1, n_documents // 50)
    n_clean = n_documents - 3 * per_kind  # duplicates and foreign documents are added; the rest change in place
    clean, seen = [], set()
    for doc in corpus(2 * n_clean, seed):  # the corpus can repeat a short story; the clean part must not
        if " ".join(doc.lower().split()) not in seen and len(clean) < n_clean:
            seen.add(" ".join(doc.lower().split()))
            clean.append(doc)
    long_docs = [i for i, doc in enumerate(clean) if len(_shingles(doc)) >= 40]
    near_sources = rng.sample(long_docs, per_kind)
    others = rng.sample([i for i in range(n_clean) if i not in set(near_sources)], 6 * per_kind)
    picks = {kind: others[k * per_kind:(k + 1) * per_kind]
             for k, kind in enumerate(("exact_duplicate", "code", "boilerplate", "repetition", "pii", "blocklisted"))}
    picks["near_duplicate"] = near_sources

    docs = list(clean)
    notes: dict[str, dict] = {kind: {} for kind in KINDS}
    for k, i in enumerate(picks["code"]):
        docs[i] = f"{docs[i]}\n{CODE[k % len(CODE)]}"
        notes["code"][i] = None
    for i in picks["boilerplate"]:
        lines = rng.sample(BOILERPLATE, rng.randint(1, 2))
        docs[i] = "\n".join([docs[i], *lines])
        notes["boilerplate"][i] = lines
    for k, i in enumerate(picks["repetition"]):
        docs[i] = "\n".join([docs[i]] + [REPEATED[k % len(REPEATED)]] * 7)
        notes["repetition"][i] = None
    for k, i in enumerate(picks["pii"]):
        kind = ("email", "phone", "ipv4")[k % 3]
        docs[i] = _pii(docs[i], kind, rng)
        notes["pii"][i] = {kind: 1}
    for k, i in enumerate(picks["blocklisted"]):
        word = BLOCKLISTED[k % len(BLOCKLISTED)]
        docs[i] = f"{docs[i]} The {rng.choice(CREATURES)} found a {word} token near the river."
        notes["blocklisted"][i] = word

    # sort keys place every added document at a random spot, duplicates after their original
    keyed = [(float(i), docs[i], ("clean", i)) for i in range(n_clean)]
    for i in picks["exact_duplicate"]:
        words = docs[i].split(" ")
        at = rng.randrange(1, len(words))
        copy = " ".join(words[:at]) + "  " + " ".join(words[at:]) + " \n"
        keyed.append((rng.uniform(i + 0.1, n_clean), copy, ("exact_duplicate", i)))
    for i in picks["near_duplicate"]:
        copy, changed = _near_copy(docs[i], rng)
        keyed.append((rng.uniform(i + 0.1, n_clean), copy, ("near_duplicate", i, changed)))
    for _ in range(per_kind):
        keyed.append((rng.uniform(0, n_clean), _german(rng), ("foreign",)))
    keyed.sort(key=lambda item: item[0])

    position = {item[2][1]: p for p, item in enumerate(keyed) if item[2][0] == "clean"}
    truth: dict = {kind: {} for kind in KINDS}
    truth["foreign"] = []
    for p, (_, _, tag) in enumerate(keyed):
        if tag[0] in ("exact_duplicate", "near_duplicate"):
            truth[tag[0]][p] = position[tag[1]]
        elif tag[0] == "foreign":
            truth["foreign"].append(p)
    truth["near_duplicate_changes"] = {p: tag[2] for p, (_, _, tag) in enumerate(keyed) if tag[0] == "near_duplicate"}
    for kind in ("code", "boilerplate", "repetition", "pii", "blocklisted"):
        truth[kind] = {position[i]: note for i, note in notes[kind].items()}
    truth["code"], truth["repetition"] = sorted(truth["code"]), sorted(truth["repetition"])
    changed = {i for kind in ("code", "boilerplate", "repetition", "pii", "blocklisted") for i in picks[kind]}
    truth["clean"] = sorted(position[i] for i in range(n_clean) if i not in changed)
    return [text for _, text, _ in keyed], truth
