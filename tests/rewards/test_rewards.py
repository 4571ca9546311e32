"""Rule-based rewards and loading ``reward.function`` from a user's module."""

from __future__ import annotations

import math
import re
import sys

import pytest

from rlhf_ray.rewards.functions import (
    call_reward_function,
    load_reward_function,
    lowercase_fraction,
)


def test_lowercase_fraction_hand_numbers():
    responses = ["abc", "aBc", "a b", "ABC!", "", "é a", "hello, world"]
    expected = [1.0, 2 / 3, 1.0, 0.0, 0.0, 2 / 3, 11 / 12]
    assert lowercase_fraction(["p"] * len(responses), responses) == pytest.approx(expected)


def test_lowercase_fraction_ignores_prompts():
    assert lowercase_fraction(["ABC", "xyz"], ["ab", "AB"]) == [1.0, 0.0]


def test_default_reward_function_loads():
    assert load_reward_function("rlhf_ray.rewards:lowercase_fraction") is lowercase_fraction


@pytest.fixture
def user_module(tmp_path, request, monkeypatch):
    """A reward module in a directory of its own, with a name no other test uses; ``sys.path``
    and ``sys.modules`` are restored afterwards."""
    name = "user_rewards_" + re.sub(r"\W", "_", request.node.name)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / f"{name}.py").write_text(
        "def length(prompts, responses):\n"
        "    return [float(len(r)) for r in responses]\n"
        "\n"
        "NOT_CALLABLE = 3\n"
    )
    yield name, str(tmp_path)
    sys.modules.pop(name, None)


def test_load_from_search_path(user_module):
    name, directory = user_module
    fn = load_reward_function(f"{name}:length", [directory])
    assert fn(["p", "q"], ["ab", ""]) == [2.0, 0.0]


def test_missing_module_is_named(user_module):
    _, directory = user_module
    with pytest.raises(ValueError) as info:
        load_reward_function("no_such_reward_module:score", [directory])
    assert "no_such_reward_module" in str(info.value)
    assert "reward.function" in str(info.value)


def test_module_outside_the_search_path_is_not_found(user_module):
    name, _ = user_module
    with pytest.raises(ValueError, match=name):
        load_reward_function(f"{name}:length")


@pytest.mark.parametrize("attr", ["score", "NOT_CALLABLE"])
def test_missing_or_non_callable_attribute_is_named(user_module, attr):
    name, directory = user_module
    with pytest.raises(ValueError) as info:
        load_reward_function(f"{name}:{attr}", [directory])
    assert f"{name}:{attr}" in str(info.value)
    assert repr(attr) in str(info.value)


@pytest.mark.parametrize("bad", ["rlhf_ray.rewards", "rlhf_ray.rewards:", ":lowercase_fraction"])
def test_bad_form_is_named(bad):
    with pytest.raises(ValueError) as info:
        load_reward_function(bad)
    assert repr(bad) in str(info.value)
    assert "package.module:callable" in str(info.value)


def test_call_returns_floats():
    scores = call_reward_function(lambda p, r: [1, 2], "m:f", ["a", "b"], ["x", "y"])
    assert scores == [1.0, 2.0]
    assert all(isinstance(s, float) for s in scores)


def test_call_rejects_wrong_length():
    with pytest.raises(ValueError) as info:
        call_reward_function(lambda p, r: [1.0], "m:f", ["a", "b"], ["x", "y"])
    assert "'m:f'" in str(info.value)
    assert "1 scores for 2 responses" in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_call_rejects_non_finite_scores(bad):
    with pytest.raises(ValueError) as info:
        call_reward_function(lambda p, r: [0.5, bad, 1.0], "m:f", ["a"] * 3, ["x"] * 3)
    assert "'m:f'" in str(info.value)
    assert "[1]" in str(info.value)  # the offending row
