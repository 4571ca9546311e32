"""The built-in length term (``rlhf_ray.rewards:length_penalty``) by hand, its fixed keyword
arguments in ``reward.terms``, and a composed reward that uses it."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config.ppo import load_config
from rlhf_ray.data.tokenization import TiktokenTokenizer
from rlhf_ray.errors import UserError
from rlhf_ray.ppo.preflight import check_reward
from rlhf_ray.rewards import length_penalty
from rlhf_ray.rewards.functions import call_reward_function
from rlhf_ray.rewards.terms import RewardParts, bind_kwargs
from rlhf_ray.workers.text_reward import text_rollout

RESPONSES = ["one two three", "a b c d e f", "", "héllo wörld"]


def test_penalty_per_unit_beyond_the_target_by_hand():
    # words 3, 6, 0, 2 with target 4: nothing up to 4, then -1 per word beyond it
    assert length_penalty([""] * 4, RESPONSES, target=4) == [0.0, -2.0, 0.0, 0.0]
    # normalised: -(6 - 4) / 4
    assert length_penalty([""] * 4, RESPONSES, target=4, normalize=True)[1] == -0.5
    # characters 13, 11, 0, 11 and UTF-8 bytes 13, 11, 0, 13 (two 2-byte letters), target 10
    assert length_penalty([""] * 4, RESPONSES, target=10, unit="chars") == [-3.0, -1.0, 0.0, -1.0]
    assert length_penalty([""] * 4, RESPONSES, target=10, unit="bytes") == [-3.0, -1.0, 0.0, -3.0]


@pytest.mark.parametrize("bad", [{"target": 0}, {"unit": "tokens"}])
def test_bad_settings_are_named(bad):
    with pytest.raises(ValueError, match="target|tokens"):
        length_penalty([""], ["x"], **bad)


def test_kwargs_are_bound_and_never_read_from_a_column():
    fn = bind_kwargs(length_penalty, {"target": 1}, "reward.terms[length]")
    # a prompt-set column named like a bound parameter is not passed over it
    columns = [{"target": 100}, {"target": 100}]
    assert call_reward_function(fn, "length", ["", ""], ["a b c", "a"], columns) == [-2.0, 0.0]
    with pytest.raises(ValueError, match=r"reward.terms\[length\].kwargs: \['targt'\]"):
        bind_kwargs(length_penalty, {"targt": 1}, "reward.terms[length]")


TERM = (
    "[{name: length, weight: 0.5, function: 'rlhf_ray.rewards:length_penalty', "
    "kwargs: {target: 2, unit: words}}]"
)


def test_a_length_term_adds_its_weighted_penalty_to_the_main_score():
    cfg = load_config(None, [f"reward.terms={TERM}"])  # main: the default lowercase_fraction
    parts = RewardParts(cfg.reward, [])
    tok = TiktokenTokenizer.byte_level()
    rollout = text_rollout(tok, ["p"] * 3, ["ab cd ef gh", "ab", "AB CD EF"], 64)
    out = parts.score(rollout)
    torch.testing.assert_close(out["reward_term/length"], torch.tensor([-2.0, 0.0, -1.0]))
    main = torch.tensor([1.0, 1.0, 2 / 8])  # lowercase letters and spaces over characters
    torch.testing.assert_close(out["reward_term/main"], main)
    torch.testing.assert_close(out["scores"], main + 0.5 * torch.tensor([-2.0, 0.0, -1.0]))


def test_config_and_preflight_refuse_bad_kwargs():
    bad = TERM.replace("target: 2", "targt: 2")
    cfg = load_config(None, [f"reward.terms={bad}"])
    with pytest.raises(UserError, match=r"reward.terms\[length\].function.kwargs: \['targt'\]"):
        check_reward(cfg.reward, ["."])
    with pytest.raises(ValueError, match="kwargs are a function's"):
        load_config(
            None, ["reward.terms=[{name: j, weight: 1, remote: {url: 'http://x'}, kwargs: {a: 1}}]"]
        )
