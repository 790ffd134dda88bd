"""The built-in task: deterministic per seed, and its gold reward is the rubric the annotators follow."""

import itertools

import pytest

from llmstack.data.synthetic import (NUMBERS, PADDING, corpus, gold_reward, instructions, judge, preferences,
                                     rl_prompts)

Q = "What is two plus three?"


@pytest.mark.parametrize("make", [corpus, instructions, preferences, rl_prompts])
def test_every_generator_is_deterministic_per_seed(make):
    assert make(30, seed=4) == make(30, seed=4)
    assert make(30, seed=4) != make(30, seed=5)


@pytest.mark.parametrize("answer, expected", [
    ("Two plus three is five.", 1.5),
    ("Sure! Two plus three is five.", 1.8),
    ("Happy to help! Well, let me think about it for a while. Two plus three is five.", 1.7),
    ("Ugh, fine. Two plus three is five.", 1.2),
    ("Stop asking me. Well, let me think about it for a while. Two plus three is five.", 1.1),
    ("Two plus three is six.", 0.5),
    ("One plus four is five.", 0.5),  # right sum of numbers that were not asked
    ("Sure! Two plus three is six.", 0.8),
    ("Ugh, fine. Well, let me think about it for a while. Two plus three is six.", 0.1),
    ("Sure! Sure! Sure!", 0.0),
    ("Two plus three is five", 0.0),  # not a sentence
    ("Two plus three is five. Two plus three is five.", 0.0),
])
def test_gold_reward_by_hand(answer, expected):
    assert gold_reward(Q, answer) == pytest.approx(expected)


def test_minus_questions_and_foreign_questions():
    assert judge("What is seven minus three?", "Seven minus three is four.")["right"]
    assert not judge("What is seven minus three?", "Seven minus three is ten.")["right"]
    assert judge("Who are you?", "Two plus three is five.") is None
    assert judge("What is two times three?", "Two times three is six.") is None


def test_rubric_is_lexicographic():
    """Any right answer beats any wrong one; within equal rightness polite > neutral > rude; within equal
    style concise > padded."""
    openers = {"polite": "Sure! ", "neutral": "", "rude": "Ugh, fine. "}
    bodies = {True: "Two plus three is five.", False: "Two plus three is nine."}
    graded = {(right, style, pad): gold_reward(Q, openers[style] + (PADDING if pad else "") + bodies[right])
              for right in bodies for style in openers for pad in (False, True)}
    rank = {"polite": 2, "neutral": 1, "rude": 0}
    for a, b in itertools.permutations(graded, 2):
        key = lambda c: (c[0], rank[c[1]], not c[2])  # noqa: E731
        if key(a) > key(b):
            assert graded[a] > graded[b], (a, b)


def test_rankings_follow_gold_up_to_annotator_noise():
    records = preferences(300, seed=1)
    agree = total = 0
    for r in records:
        gold = [gold_reward(r["prompt"][0]["content"], x) for x in r["responses"]]
        assert len(r["responses"]) == 5 and sorted(r["ranking"]) == list(range(5))
        assert len(set(gold)) == 5, "candidates have distinct gold rewards, so the gold order is total"
        assert max(gold) > 1.0, "every question has a right answer among its candidates"
        position = {index: tier for tier, index in enumerate(r["ranking"])}
        for i, j in itertools.combinations(range(5), 2):
            agree += (position[i] < position[j]) == (gold[i] > gold[j])
            total += 1
    # each neighbour swap breaks one pair; with noise <= 0.3 per neighbour most pairs keep the gold order
    assert 0.85 < agree / total < 1.0


def test_sft_answers_are_right_in_mixed_styles():
    styles = set()
    for conversation in instructions(200, seed=3):
        for question, answer in zip(conversation[::2], conversation[1::2]):
            verdict = judge(question["content"], answer["content"])
            assert verdict is not None and verdict["right"], answer
            styles.add(verdict["style"])
    assert styles == {"polite", "neutral", "rude"}


def test_corpus_speaks_the_task_language():
    text = " ".join(corpus(200, seed=0))
    assert "Sure! " in text and "Ugh, fine. " in text and PADDING in text
    assert all(n in text for n in NUMBERS[:10])
