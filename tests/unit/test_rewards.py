"""GRPO's reward functions: each built-in on hand-made cases, callables by module name, clear errors."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from tunesmith.config.schema import RewardFunction
from tunesmith.training.rewards import RewardError, final_answer, load_rewards, normalize_answer, score


def _load(*entries: dict) -> list:
    return load_rewards([RewardFunction(**entry) for entry in entries])


def _call(
    entry: dict, completions: list[str], ids: list[list[int]] | None = None, **columns: list
) -> list[float]:
    (reward,) = _load(entry)
    prompts = ["p"] * len(completions)
    return reward(prompts, completions, ids or [[0] * len(c) for c in completions], columns)


# ------------------------------------------------------------------------------------ built-ins


def test_regex_searches_by_default_and_fullmatch_demands_the_whole_completion():
    completions = ["The answer is 42.", "42", "  42\n", "forty-two"]
    searched = _call({"function": "regex", "args": {"pattern": "[0-9]+"}}, completions)
    assert searched == [1.0, 1.0, 1.0, 0.0]
    whole = _call({"function": "regex", "args": {"pattern": "[0-9]+", "fullmatch": True}}, completions)
    assert whole == [0.0, 1.0, 1.0, 0.0]  # surrounding whitespace is stripped first
    anchored = _call(
        {"function": "regex", "args": {"pattern": "^<think>.*</think>"}}, ["<think>x</think> 4", "4"]
    )
    assert anchored == [1.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The result is 12", "12", 1.0),  # the last line
        ("Let me think.\n\nThe sum is 7.\n12", 12, 1.0),  # a number column, the last line
        ("so \\boxed{\\frac{1}{2}} it is", "\\frac{1}{2}", 1.0),  # nested braces in \boxed{}
        ("first 3, then #### 1,000", "1000", 1.0),  # GSM8K's ####, thousands separator
        ("Answer: Paris.", "paris", 1.0),  # case and trailing punctuation
        ("answer: 4.0", "4", 1.0),  # numbers compare by value
        ("The answer is 12, I think", "12", 1.0),  # numeric answers: the last number of the last line
        ("12 or maybe 13", "12", 0.0),
        ("It is Paris", "Paris", 0.0),  # text answers: the whole final answer
        ("13", "12", 0.0),
        ("", "12", 0.0),
    ],
)
def test_exact_match_compares_the_final_answer(completion, answer, expected):
    got = _call({"function": "exact_match", "args": {"column": "solution"}}, [completion], solution=[answer])
    assert got == [expected]


def test_final_answer_and_normalisation():
    assert final_answer("a \\boxed{1} b \\boxed{2}") == "2"
    assert final_answer("x\n\n  y  \n") == "  y  "
    assert normalize_answer("  The  Cat. ") == "the cat"
    assert normalize_answer("$-3.50$") == "-3.5"
    assert normalize_answer("1e3") == "1000"


def test_length_penalty_counts_chars_or_tokens_beyond_the_limit():
    chars = _call(
        {"function": "length_penalty", "args": {"max_chars": 4}}, ["abc", "abcd", "abcdef", "a" * 12]
    )
    assert chars == [0.0, 0.0, -0.5, -2.0]
    tokens = _call(
        {"function": "length_penalty", "args": {"max_tokens": 2}}, ["x", "y"], ids=[[1, 2], [1, 2, 3]]
    )
    assert tokens == [0.0, -0.5]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"function": "regex"}, r"grpo.rewards\[0\].args.pattern: required"),
        ({"function": "regex", "args": {"pattern": "("}}, r"args.pattern: invalid regular expression"),
        (
            {"function": "regex", "args": {"pattern": "a", "full": True}},
            r"unknown argument\(s\) full for regex",
        ),
        ({"function": "regex", "args": {"pattern": 3}}, r"args.pattern: expected str, got int 3"),
        ({"function": "length_penalty", "args": {}}, "exactly one of max_chars or max_tokens"),
        ({"function": "length_penalty", "args": {"max_chars": 0}}, "max_chars: must be at least 1"),
        ({"function": "exact_match", "args": {"column": "completions"}}, "is not a data column name"),
    ],
)
def test_bad_built_in_arguments_name_the_key(entry, message):
    with pytest.raises(RewardError, match=message):
        _load(entry)


def test_exact_match_asks_for_its_column():
    (reward,) = _load({"function": "exact_match"})
    assert reward.columns == ("answer",)


# ------------------------------------------------------------------------------------ callables

MODULE = '''
def digits(prompts, completions, **kwargs):
    """Fraction of digit characters; checks it gets the columns and ids."""
    assert len(kwargs["completion_ids"]) == len(completions) == len(kwargs["answer"])
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

def named(prompts, completions, answer, bonus=0.0):
    return [float(c == a) + bonus for c, a in zip(completions, answer)]

def maybe(prompts, completions, **kwargs):
    return [None if c == "skip" else 1.0 for c in completions]

def short(prompts, completions, **kwargs):
    return [1.0]

def words(prompts, completions, **kwargs):
    return ["yes" for _ in completions]

def scalar(prompts, completions, **kwargs):
    return 1.0

def broken(prompts, completions, **kwargs):
    raise KeyError("answer")

def no_completions(prompts):
    return []

NOT_CALLABLE = 3
'''


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "myrewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "funcs.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "explodes.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myrewards.funcs"


def test_callables_get_prompts_completions_ids_columns_and_args(reward_module):
    columns = {"answer": ["12", "ab"], "level": ["easy", "hard"]}
    digits, named = _load(
        {"function": f"{reward_module}:digits"},
        {"function": f"{reward_module}:named", "args": {"bonus": 0.5}},
    )
    ids = [[1, 2], [3]]
    assert digits(["p", "q"], ["12", "a1"], ids, columns) == [1.0, 0.5]
    assert named(["p", "q"], ["12", "a1"], ids, columns) == [1.5, 0.5]  # only the keywords it names


def test_the_total_is_the_weighted_sum_and_none_does_not_apply(reward_module):
    rewards = _load(
        {"function": f"{reward_module}:maybe", "weight": 2.0},
        {"function": "regex", "weight": 0.5, "args": {"pattern": "k"}},
        {"function": "regex", "weight": 1.0, "args": {"pattern": "^s"}},
    )
    assert [r.name for r in rewards] == [f"{reward_module}:maybe", "regex", "regex#2"]
    total, per_function = score(rewards, ["p", "p"], ["skip", "ok"], [[1], [2]], {})
    assert math.isnan(per_function[0, 0]) and per_function[1].tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([0.5 + 1.0, 2.0 + 0.5]))


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (
            "nonexistent_pkg.rewards:fn",
            r"grpo.rewards\[0\].function: cannot import module 'nonexistent_pkg.rewards'",
        ),
        ("explodes:fn", r"importing module 'explodes' raised RuntimeError: import-time failure"),
        ("myrewards.funcs:missing", r"module 'myrewards.funcs' has no attribute 'missing'"),
        ("myrewards.funcs:NOT_CALLABLE", "is a int, not a callable"),
        ("myrewards.funcs:no_completions", "takes no completions argument"),
        ("/tmp/rewards.py:fn", "not a file path"),
        ("rewards.py", "neither a built-in"),
        ("os.system", "neither a built-in"),
    ],
)
def test_callables_that_cannot_load_say_why(function, message, reward_module):
    with pytest.raises(RewardError, match=message):
        _load({"function": function})


def test_unknown_args_for_a_callable_are_refused(reward_module):
    with pytest.raises(
        RewardError, match=r"grpo.rewards\[0\].args: myrewards.funcs:named takes no argument\(s\) scale"
    ):
        _load({"function": f"{reward_module}:named", "args": {"scale": 2}})
    with pytest.raises(RewardError, match="completions is passed by the trainer"):
        _load({"function": f"{reward_module}:digits", "args": {"completions": 2}})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("short", r"grpo.rewards\[0\] \(myrewards.funcs:short\) returned 1 values for 2 completions"),
        ("words", "returned str 'yes' at position 0; rewards are numbers"),
        ("scalar", "returned float; a reward function returns a list with one float per completion"),
        ("broken", r"grpo.rewards\[0\] \(myrewards.funcs:broken\) raised KeyError: 'answer'"),
    ],
)
def test_bad_results_name_the_entry(name, message, reward_module):
    (reward,) = _load({"function": f"{reward_module}:{name}"})
    with pytest.raises(RewardError, match=message):
        reward(["p", "q"], ["a", "b"], [[1], [2]], {})


def test_tensors_and_arrays_are_accepted_and_infinities_refused():
    import numpy as np

    from tunesmith.training.rewards import _check_values

    assert _check_values(torch.tensor([0.5, 1.0]), 2, "x") == [0.5, 1.0]
    assert _check_values(np.array([0.5, 1.0]), 2, "x") == [0.5, 1.0]
    assert _check_values([True, 0], 2, "x") == [1.0, 0.0]
    with pytest.raises(RewardError, match="must be finite"):
        _check_values([math.inf, 0.0], 2, "x")
