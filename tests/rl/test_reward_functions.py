"""Built-in reward functions and the checks on users' reward functions, against values written out by hand."""

import pytest
import torch

from llmstack.rl.experience import Experience
from llmstack.rl.reward_functions import (FunctionReward, LengthPenalty, answer_format, final_number, numeric_match,
                                          reward_function)
from llmstack.rl.rewards import RewardInputs


def inputs(completions, **columns):
    n = len(completions)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])[:n]
    exp = Experience(torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long),
                     torch.zeros(n, 4, dtype=torch.long), mask, torch.ones(n, dtype=torch.bool), torch.arange(n))
    return RewardInputs(exp, ["q"] * n, lambda e: completions, columns)


def test_final_number_reads_the_gsm8k_marker_before_any_later_number():
    assert final_number("She has 3 + 4 = 7 apples.\n#### 7") == 7.0
    assert final_number("#### 1,250 then 3 more") == 1250.0
    assert final_number("so the answer is 42.") == 42.0
    assert final_number("-3.5 degrees") == -3.5
    assert final_number("no digits here") is None


def test_numeric_match_compares_final_numbers_with_the_reference_answer():
    completions = ["... so 18 in all.\n#### 18", "I think 17", "#### 18.0", "eighteen"]
    answers = ["Janet sells 16 - 3 - 4 = 9 ... 9 * 2 = 18\n#### 18"] * 4
    assert numeric_match(["p"] * 4, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0]


def test_numeric_match_without_an_answer_column_names_what_it_needs():
    with pytest.raises(ValueError, match="needs the prompt records' 'answer' field.*records have: solution"):
        numeric_match(["p"], ["#### 1"], solution=["1"])


def test_answer_format_wants_the_marker_on_the_last_line():
    assert answer_format([], ["work\n#### 12", "#### 12 because", "12", "#### 3.5\n\n"]) == [1.0, 0.0, 0.0, 1.0]


def test_length_penalty_is_minus_tokens_over_the_limit():
    # masks hold 3, 1 and 4 response tokens
    assert LengthPenalty(4)(inputs(["a", "b", "c"])).tolist() == [-0.75, -0.25, -1.0]


def test_a_function_gets_completions_and_columns_and_gives_one_score_each():
    seen = {}

    def fn(prompts, completions, answer, **rest):
        seen.update(prompts=prompts, completions=completions, answer=answer, rest=rest)
        return [1, None, 0.5]

    scores = FunctionReward(fn, "mine")(inputs(["x", "y", "z"], answer=["1", "2", "3"], source=["a", "b", "c"]))
    assert scores.tolist() == [1.0, 0.0, 0.5]  # None: the function does not apply to that row
    assert seen == {"prompts": ["q"] * 3, "completions": ["x", "y", "z"], "answer": ["1", "2", "3"],
                    "rest": {"source": ["a", "b", "c"]}}


@pytest.mark.parametrize("bad, message", [([1.0], "returned 1 values for 2 completions"),
                                          ([1.0, float("nan")], r"returned nan for completion 1"),
                                          ([1.0, "high"], r"returned 'high' for completion 1"),
                                          (0.5, "returned float values")])
def test_a_function_returning_garbage_is_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=f"reward function shaky {message}"):
        FunctionReward(lambda prompts, completions, **c: bad, "shaky")(inputs(["x", "y"]))


def test_sources_are_named_by_builtin_name_or_import_path():
    assert reward_function("numeric_match", 8).name == "numeric_match"
    assert isinstance(reward_function("length_penalty", 8), LengthPenalty)
    assert reward_function("llmstack.evaluation.builtin_task:gold_reward", 8).name == "gold_reward"
    with pytest.raises(ValueError, match="'package.module:function'"):
        reward_function("gold_reward", 8)
