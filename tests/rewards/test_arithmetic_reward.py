"""``last_number_matches``: 1.0 when the response's last number equals the label, by hand."""

from __future__ import annotations

import pytest

from rlhf_ray.rewards import last_number_matches
from rlhf_ray.rewards.arithmetic import last_number
from rlhf_ray.rewards.functions import call_reward_function, load_reward_function


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("5", 5.0),
        ("The answer is 23.", 23.0),  # a final full stop is punctuation
        ("12 + 9 = 21!", 21.0),  # the last number, not the first
        ("-3", -3.0),
        ("x = \u22124", -4.0),  # a Unicode minus
        ("3-5", 5.0),  # a minus between digits is subtraction, not a sign
        ("1,234", 1234.0),  # thousands commas
        ("3, 5", 5.0),  # a comma and a space: two numbers
        ("5.0", 5.0),
        ("about 1.5 apples", 1.5),
        ("(40)", 40.0),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


def test_last_number_matches_scores_by_hand():
    responses = ["8 + 15 = 23", "The answer is 23.", "23 or 24", "twenty-three", "-23", "2,3"]
    assert last_number_matches([""] * 6, responses, [23] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert last_number_matches(["", ""], ["It is 1,000.", "7"], ["1000", "7"]) == [1.0, 1.0]


def test_configs_name_it_and_it_gets_the_label_column():
    fn = load_reward_function("rlhf_ray.rewards:last_number_matches")
    columns = [{"label": 5}, {"label": 7}]
    assert call_reward_function(fn, "x", ["a", "b"], ["5", "8"], columns) == [1.0, 0.0]
