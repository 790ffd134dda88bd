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


def _creature(rng: random.Random) -> str:
    return f"the {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(CREATURES)}"


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    a, b = max(a, b), min(a, b)
    return f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}."


def _sentence(rng: random.Random, hero: str, home: str, past: bool) -> str:
    kind = rng.randrange(5)
    verb = rng.choice(VERBS)[1 if past else 0]
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


def document(rng: random.Random) -> str:
    """One short story about one creature: 3-12 sentences in a single tense."""
    hero, home, past = _creature(rng), rng.choice(PLACES), rng.random() < 0.5
    sentences = [_sentence(rng, hero, home, past) for _ in range(rng.randint(3, 12))]
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def corpus(n_documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n_documents)]


def _question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    a, b = max(a, b), min(a, b)
    return f"What is {NUMBERS[a]} minus {NUMBERS[b]}?", f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}."


def instructions(n_conversations: int, seed: int = 0) -> list[list[dict]]:
    """Question/answer conversations over the corpus's arithmetic, some with a second turn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_conversations):
        messages = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            question, answer = _question(rng)
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer[0].upper() + answer[1:]}]
        out.append(messages)
    return out


ANNOTATOR_NOISE = {"ann-a": 0.05, "ann-b": 0.15, "ann-c": 0.3}  # chance of swapping two neighbours


def _candidates(rng: random.Random, a: int, b: int) -> list[str]:
    """Answers in rubric order: right sum of the asked numbers, then concise over padded; then a wrong sum;
    then a sum of numbers that were not asked (the mistake a weak model makes: copying the wrong operand)."""
    right, wrong = NUMBERS[a + b], NUMBERS[(a + b + rng.randint(1, 5)) % len(NUMBERS)]
    other = (a + rng.randint(1, 9)) % 10
    pad = "Well, let me think about it for a while. "
    return [f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {right}.",
            f"{pad}{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {right}.",
            f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {wrong}.",
            f"{NUMBERS[other].capitalize()} plus {NUMBERS[b]} is {NUMBERS[other + b]}.",
            f"{pad}{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {wrong}."]


def preferences(n_prompts: int, seed: int = 0, judges_per_prompt: int = 2) -> list[dict]:
    """Ranking records: four answers per question ranked by simulated annotators who follow the rubric of
    `_candidates` with their own noise (ANNOTATOR_NOISE), so they disagree now and then."""
    rng = random.Random(seed)
    records = []
    for _ in range(n_prompts):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        answers = _candidates(rng, a, b)
        order = list(range(len(answers)))
        rng.shuffle(order)
        shown = [answers[i] for i in order]
        for annotator in rng.sample(sorted(ANNOTATOR_NOISE), judges_per_prompt):
            ranking = sorted(range(len(shown)), key=lambda i: order[i])
            for i in range(len(ranking) - 1):
                if rng.random() < ANNOTATOR_NOISE[annotator]:
                    ranking[i], ranking[i + 1] = ranking[i + 1], ranking[i]
            records.append({"prompt": [{"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"}],
                            "responses": shown, "ranking": ranking, "annotator": annotator})
    return records


def rl_prompts(n_prompts: int, seed: int = 0) -> list[list[dict]]:
    """Questions for PPO, in the same form as `preferences` and `instructions`."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"What is {NUMBERS[rng.randint(0, 9)]} plus {NUMBERS[rng.randint(0, 9)]}?"}]
            for _ in range(n_prompts)]


def gold_reward(question: str, answer: str) -> float:
    """The rubric the simulated annotators follow, as a number: 1 for restating the asked numbers with their
    right sum, +0.5 for not padding the answer; 0 for anything else (or a question this task did not ask)."""
    words = question.rstrip("?").split()
    if len(words) < 5 or words[3] != "plus" or words[2] not in NUMBERS or words[4] not in NUMBERS:
        return 0.0
    a, b = NUMBERS.index(words[2]), NUMBERS.index(words[4])
    body = answer.removeprefix("Well, let me think about it for a while. ")
    correct = body.lower() == f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    return (1.0 + 0.5 * (body == answer)) if correct else 0.0
