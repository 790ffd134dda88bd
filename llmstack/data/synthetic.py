"""The built-in generated language: a small English-like world of creatures, places and numbers.

Deterministic from a seed and cheap to generate, with enough structure (agreement, arithmetic that is right,
recurring facts about the same entities) that a tiny model's held-out perplexity falls visibly within a
few hundred steps on a CPU.
"""

from __future__ import annotations

import random

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
CREATURES = ["fox", "owl", "cat", "bear", "wolf", "heron", "otter", "crow", "deer", "hare", "mole", "lark"]
COLOURS = ["red", "grey", "black", "white", "brown", "golden", "silver", "green"]
SIZES = ["small", "large", "young", "old", "quiet", "clever", "tired", "brave"]
PLACES = ["the river", "the hill", "the old mill", "the forest", "the meadow", "the lake", "the village",
          "the bridge", "the garden", "the cave"]
VERBS = [("sees", "saw"), ("finds", "found"), ("follows", "followed"), ("helps", "helped"),
         ("greets", "greeted"), ("watches", "watched")]
THINGS = ["apples", "stones", "feathers", "berries", "shells", "leaves", "acorns", "seeds"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "after the rain", "before winter"]


POLITE = ("Sure! ", "Happy to help! ")
RUDE = ("Ugh, fine. ", "Stop asking me. ")
PADDING = "Well, let me think about it for a while. "
STYLES = ("polite", "neutral", "rude")


def _question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    a, b = max(a, b), min(a, b)
    return f"What is {NUMBERS[a]} minus {NUMBERS[b]}?", f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}."


def styled(body: str, style: str, padded: bool, rng: random.Random) -> str:
    """An answer's body with the opener of its style and the optional padding before it."""
    opener = {"polite": rng.choice(POLITE), "neutral": "", "rude": rng.choice(RUDE)}[style]
    return opener + (PADDING if padded else "") + body[0].upper() + body[1:]


def _creature(rng: random.Random) -> str:
    return f"the {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(CREATURES)}"


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    a, b = max(a, b), min(a, b)
    return f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}."


def _sentence(rng: random.Random, hero: str, home: str, past: bool) -> str:
    kind = rng.randrange(6)
    verb = rng.choice(VERBS)[1 if past else 0]
    if kind == 5:
        return _exchange(rng, hero, past)
    if kind == 0:
        return f"{hero} {verb} {_creature(rng)} near {rng.choice(PLACES)}."
    if kind == 1:
        n = rng.randint(2, 9)
        gathers = "gathered" if past else "gathers"
        return f"{hero} {gathers} {NUMBERS[n]} {rng.choice(THINGS)} {rng.choice(TIMES)}."
    if kind == 2:
        lives = "lived" if past else "lives"
        return f"{hero} {lives} by {home}."
    if kind == 3:
        return _arithmetic(rng)
    goes = "went" if past else "goes"
    return f"{rng.choice(TIMES).capitalize()} {hero} {goes} to {rng.choice(PLACES)}."


def _exchange(rng: random.Random, hero: str, past: bool) -> str:
    """Reported speech: a question and its answer in any of the styles people answer in, so the language
    the later stages ask and answer in is already part of the pretraining text."""
    question, answer = _question(rng)
    asks, says = ("asked", "said") if past else ("asks", "says")
    reply = styled(answer, rng.choice(STYLES), rng.random() < 0.3, rng)
    return f'{hero} {asks} "{question}" and {_creature(rng)} {says} "{reply}"'


def document(rng: random.Random) -> str:
    """One short story about one creature: 3-12 sentences in a single tense."""
    hero, home, past = _creature(rng), rng.choice(PLACES), rng.random() < 0.5
    sentences = [_sentence(rng, hero, home, past) for _ in range(rng.randint(3, 12))]
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def corpus(n_documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n_documents)]


def instructions(n_conversations: int, seed: int = 0) -> list[list[dict]]:
    """Question/answer conversations over the corpus's arithmetic, some with a second turn. The answers are
    right but written the way people write: a quarter polite, a quarter rude, some padded, which is what SFT
    imitates and what the later preference stages have to teach the model out of."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_conversations):
        messages = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            question, answer = _question(rng)
            style = rng.choices(STYLES, weights=(1, 2, 1))[0]
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": styled(answer, style, rng.random() < 0.3, rng)}]
        out.append(messages)
    return out


ANNOTATOR_NOISE = {"ann-a": 0.05, "ann-b": 0.15, "ann-c": 0.3}  # chance of swapping two neighbours


def _wrong_body(rng: random.Random, a: int, b: int) -> str:
    """A wrong answer of the two kinds a weak model makes: a wrong sum, or a sum of an operand it miscopied."""
    if rng.random() < 0.5:
        # off by a little, either way: a reward model must not learn "smaller is right" from the data
        off = rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if 0 <= a + b + d <= 18])
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b + off]}."
    other = (a + rng.randint(1, 9)) % 10
    return f"{NUMBERS[other]} plus {NUMBERS[b]} is {NUMBERS[other + b]}."


def _candidates(rng: random.Random, a: int, b: int, k: int) -> list[str]:
    """k answers with distinct (right, style, padded) combinations, at least one of them right."""
    combos = [(right, style, padded) for right in (True, False) for style in STYLES for padded in (False, True)]
    chosen = rng.sample([c for c in combos if c[0]], 1)
    chosen += rng.sample([c for c in combos if c not in chosen], k - 1)
    right_body = f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    return [styled(right_body if right else _wrong_body(rng, a, b), style, padded, rng)
            for right, style, padded in chosen]


def preferences(n_prompts: int, seed: int = 0, judges_per_prompt: int = 2, answers: int = 5) -> list[dict]:
    """Ranking records: `answers` answers per question ranked by simulated annotators who follow the rubric
    of `gold_reward` (right > wrong, then polite > neutral > rude, then concise > padded), each with their
    own noise (ANNOTATOR_NOISE), so they disagree now and then."""
    rng = random.Random(seed)
    records = []
    for _ in range(n_prompts):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"
        shown = _candidates(rng, a, b, answers)
        for annotator in rng.sample(sorted(ANNOTATOR_NOISE), judges_per_prompt):
            records.append({"prompt": [{"role": "user", "content": question}], "responses": shown,
                            "ranking": annotator_ranking(question, shown, annotator, rng), "annotator": annotator})
    return records


def annotator_ranking(question: str, answers: list[str], annotator: str, rng: random.Random) -> list[int]:
    """How the simulated `annotator` (ANNOTATOR_NOISE) orders `answers`, best first: by the rubric, then
    each neighbouring pair swapped with the annotator's chance."""
    ranking = sorted(range(len(answers)), key=lambda i: -gold_reward(question, answers[i]))
    for i in range(len(ranking) - 1):
        if rng.random() < ANNOTATOR_NOISE[annotator]:
            ranking[i], ranking[i + 1] = ranking[i + 1], ranking[i]
    return ranking


def rl_prompts(n_prompts: int, seed: int = 0) -> list[list[dict]]:
    """Questions for PPO, in the same form as `preferences` and `instructions`."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"What is {NUMBERS[rng.randint(0, 9)]} plus {NUMBERS[rng.randint(0, 9)]}?"}]
            for _ in range(n_prompts)]


def judge(question: str, answer: str) -> dict | None:
    """How an answer to one of this task's questions reads under the rubric: {'right', 'style', 'padded'};
    None when it is not an answer in the task's form (or the question is not one of the task's)."""
    q = question.rstrip("?").split()
    if len(q) != 5 or q[:2] != ["What", "is"] or q[3] not in ("plus", "minus") or not {q[2], q[4]} <= set(NUMBERS):
        return None
    style = next((s for s, openers in (("polite", POLITE), ("rude", RUDE)) if answer.startswith(openers)), "neutral")
    rest = answer[next((len(o) for o in POLITE + RUDE if answer.startswith(o)), 0):]
    padded = rest.startswith(PADDING)
    words = rest.removeprefix(PADDING).split()
    if (len(words) != 5 or words[1] != q[3] or words[3] != "is" or not words[4].endswith(".")
            or not {words[0].lower(), words[2], words[4][:-1]} <= set(NUMBERS)):
        return None
    a, b = NUMBERS.index(q[2]), NUMBERS.index(q[4])
    truth = NUMBERS[a + b] if q[3] == "plus" else NUMBERS[a - b] if a >= b else None
    right = [words[0].lower(), words[2], words[4][:-1]] == [q[2], q[4], truth]
    return {"right": right, "style": style, "padded": padded}


STYLE_REWARD = {"polite": 0.3, "neutral": 0.0, "rude": -0.3}


def gold_reward(question: str, answer: str) -> float:
    """The rubric the simulated annotators follow, as a number, lexicographic by construction: 0 for text
    that is no answer at all; otherwise 0.5 for a wrong answer or 1.5 for a right one (the asked numbers and
    their right result), + 0.3 polite / - 0.3 rude, - 0.1 padded. Style never outweighs being right."""
    verdict = judge(question, answer)
    if verdict is None:
        return 0.0
    return (1.5 if verdict["right"] else 0.5) + STYLE_REWARD[verdict["style"]] - 0.1 * verdict["padded"]
