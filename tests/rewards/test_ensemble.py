"""Reward-model ensembles: the combination by hand, then two tiny reward models of different
seeds (one with its own BPE tokenizer) scored by one ``RewardScorer``: ``min`` and
``mean - k * std`` differ from ``mean`` per sample exactly as the formulas say, each member
scores what it scores alone, and the round's metrics report each member and the spread."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algo import combine_ensemble, ensemble_std
from rlhf_ray.config.ppo import TokenizerConfig, load_config
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import write_score_stats
from rlhf_ray.rewards.terms import reward_metrics
from rlhf_ray.workers.scorers import RewardScorer
from rlhf_ray.workers.text_reward import text_rollout
from tests.helpers.model_dirs import bpe_tokenizer, save_reward_model

BYTES = TokenizerConfig(kind="bytes")


def test_combinations_by_hand():
    scores = torch.tensor([[1.0, -2.0, 0.5], [3.0, -2.0, -0.5]])  # 2 members x 3 samples
    torch.testing.assert_close(combine_ensemble(scores, "mean"), torch.tensor([2.0, -2.0, 0.0]))
    torch.testing.assert_close(combine_ensemble(scores, "min"), torch.tensor([1.0, -2.0, -0.5]))
    # std with divisor M: |a - b| / 2 for two members
    torch.testing.assert_close(ensemble_std(scores), torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(
        combine_ensemble(scores, "mean_minus_std", k=2.0), torch.tensor([0.0, -2.0, -1.0])
    )
    with pytest.raises(ValueError, match="unknown ensemble combine 'max'"):
        combine_ensemble(scores, "max")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two reward models of seeds 1 and 2 (the second with its own BPE tokenizer), each with
    stored train-set statistics, as train-rm saves them."""
    root = tmp_path_factory.mktemp("ensemble")
    first = save_reward_model(root / "rm1", build_tokenizer(BYTES), init_seed=1)
    second = save_reward_model(root / "rm2", bpe_tokenizer(root / "bpe"), init_seed=2)
    write_score_stats(first, 0.25, 2.0)
    write_score_stats(second, -0.5, 0.5)
    return [str(first), str(second)]


def scorer(members, *overrides: str) -> RewardScorer:
    model = "[" + ", ".join(f"{{path: {m}}}" for m in members) + "]"
    cfg = load_config(None, ["reward.function=null", f"reward.model={model}", *overrides])
    return RewardScorer(cfg.reward, BYTES)


def rollout():
    texts = ["hello there", "A!", "what a day it is", "zzz", "", "ok ok ok"]
    return text_rollout(build_tokenizer(BYTES), ["Human: hi"] * len(texts), texts, 64)


def test_each_member_reads_its_own_encoding_and_is_standardised_by_its_statistics(members):
    batch = rollout()
    alone = [
        scorer([m, members[0]], "reward.ensemble.standardize=none").readers[0].scores(batch)
        for m in members
    ]
    assert scorer(members).readers[1].text_tokenizer is not None  # the BPE member reads text
    parts = scorer(members).score_parts(batch)
    torch.testing.assert_close(parts["reward_member/0"], (alone[0] - 0.25) / 2.0)
    torch.testing.assert_close(parts["reward_member/1"], (alone[1] + 0.5) / 0.5)
    assert not torch.allclose(parts["reward_member/0"], parts["reward_member/1"])


@pytest.mark.parametrize("standardize", ["model", "none"])
def test_min_and_mean_minus_k_std_differ_from_mean_as_the_formulas_say(members, standardize):
    batch = rollout()
    norm = f"reward.ensemble.standardize={standardize}"
    by = {
        combine: scorer(
            members, norm, f"reward.ensemble.combine={combine}", "reward.ensemble.k=1.5"
        ).score_parts(batch)
        for combine in ("mean", "min", "mean_minus_std")
    }
    a, b = by["mean"]["reward_member/0"], by["mean"]["reward_member/1"]
    mean, std = (a + b) / 2, (a - b).abs() / 2
    torch.testing.assert_close(by["mean"]["scores"], mean)
    torch.testing.assert_close(by["mean"]["reward_ensemble/std"], std)
    # min = mean - |a - b| / 2 = mean - std for two members; mean - k std moves by k std
    torch.testing.assert_close(by["min"]["scores"], torch.minimum(a, b))
    torch.testing.assert_close(by["mean"]["scores"] - by["min"]["scores"], std)
    torch.testing.assert_close(by["mean"]["scores"] - by["mean_minus_std"]["scores"], 1.5 * std)
    assert float(std.min()) > 0  # the members disagree on every sample
    metrics = reward_metrics(by["mean"])
    assert metrics["reward/member0_mean"] == pytest.approx(float(a.mean()))
    assert metrics["reward/member1_mean"] == pytest.approx(float(b.mean()))
    assert metrics["reward/ensemble_std"] == pytest.approx(float(std.mean()))


def test_a_term_may_be_a_reward_model(members):
    batch = rollout()
    terms = f"[{{name: judge, weight: -2.0, model: {{path: {members[1]}}}}}]"
    cfg = load_config(
        None, ["reward.function=null", f"reward.model.path={members[0]}", f"reward.terms={terms}"]
    )
    parts = RewardScorer(cfg.reward, BYTES).score_parts(batch)
    alone = scorer([members[1], members[0]], "reward.ensemble.standardize=none").readers[0]
    torch.testing.assert_close(parts["reward_term/judge"], alone.scores(batch))
    torch.testing.assert_close(
        parts["scores"], parts["reward_term/main"] - 2.0 * parts["reward_term/judge"]
    )


def test_ensemble_settings_are_checked():
    with pytest.raises(ValueError, match="an ensemble needs 2 or more models"):
        load_config(None, ["reward.function=null", "reward.model=[{path: a}]"])
    with pytest.raises(ValueError, match=r"members \[0, 1\] have no path"):
        load_config(None, ["reward.function=null", "reward.model=[{init_seed: 1}, {init_seed: 2}]"])
    with pytest.raises(ValueError, match="normalize 'model' reads one reward model"):
        load_config(
            None,
            [
                "reward.function=null",
                "reward.model=[{path: a}, {path: b}]",
                "reward.normalize=model",
            ],
        )
    with pytest.raises(ValueError, match="needs one reward.model"):
        load_config(
            None,
            [
                "reward.function=null",
                "reward.model=[{path: a}, {path: b}]",
                "value.init_from_reward=true",
            ],
        )
    single = load_config(None, ["reward.function=null", "reward.model.path=a"])
    assert single.reward.model.path == "a"  # a plain section stays valid
