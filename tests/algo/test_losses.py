import math

import pytest
import torch

from rlhf_ray.algo import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    aggregation_weight,
    entropy_from_logits,
    kl_loss,
    masked_mean,
    policy_loss,
    value_loss,
)


def test_policy_loss_hand_example_with_clipping():
    # ratios 1.1, 1.5, 0.5, 0.5 (+ an invalid 3.0); eps = 0.2 -> clip range [0.8, 1.2]
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 3.0]])
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -1.0]])
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0, 2.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # max(-A*rho, -A*clip(rho)):
    #   t0: max(-1.1, -1.1) = -1.1  inside the range
    #   t1: max(-3.0, -2.4) = -2.4  clipped (A>0, rho>1.2)
    #   t2: max( 0.5,  0.8) =  0.8  clipped (A<0, rho<0.8)
    #   t3: max(-0.5, -0.8) = -0.5  unclipped: pessimistic bound keeps rho (A>0, rho<0.8)
    # loss = (-1.1 - 2.4 + 0.8 - 0.5) / 4 = -0.8; clipfrac = 2/4; ratio_mean = 3.6/4 = 0.9
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.8)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    assert float(stats["ratio_mean"]) == pytest.approx(0.9)
    # approx_kl = 0.5 * mean(ln1.1^2, ln1.5^2, ln0.5^2, ln0.5^2)
    #           = 0.5 * (0.009084 + 0.164402 + 2 * 0.480453) / 4 = 0.141799
    assert float(stats["approx_kl"]) == pytest.approx(0.141799, abs=1e-6)
    # d loss / d logp_t = -A_t * rho_t / 4 where unclipped, 0 where clipped or invalid
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.275, 0.0, 0.0, -0.125, 0.0]]))


def test_value_loss_hand_example():
    values = torch.tensor([[1.0, 1.5, 1.5, 8.0]], requires_grad=True)
    old_values = torch.tensor([[0.9, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # eps = 0.2: clipped V = 1.0 (within 0.9 +- 0.2), 1.2, 1.2
    #   t0: max((1-2)^2, (1-2)^2)       = 1.0
    #   t1: max((1.5-1)^2, (1.2-1)^2)   = max(0.25, 0.04) = 0.25
    #   t2: max((1.5-2)^2, (1.2-2)^2)   = max(0.25, 0.64) = 0.64  clipped term wins
    # loss = 0.5 * (1 + 0.25 + 0.64) / 3 = 0.315; vf_clipfrac = 1/3
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.315)
    assert float(stats["vf_clipfrac"]) == pytest.approx(1 / 3)
    loss.backward()
    # d/dV of 0.5*(V-R)^2/3 = (V-R)/3 where unclipped: -1/3, 0.5/3; t2 clipped -> 0
    torch.testing.assert_close(values.grad, torch.tensor([[-1 / 3, 0.5 / 3, 0.0, 0.0]]))


def test_entropy_uniform_one_hot_and_hand_value():
    V = 5
    uniform = torch.full((1, 1, V), 3.7)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(V))
    one_hot = torch.tensor([[[100.0, 0.0, 0.0, 0.0, 0.0]]])
    assert entropy_from_logits(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    # logits (0, ln 3) -> p = (1/4, 3/4); H = 0.25 ln4 + 0.75 ln(4/3) = 0.346574 + 0.215762
    two_way = torch.tensor([[[0.0, math.log(3.0)]]])
    assert entropy_from_logits(two_way).item() == pytest.approx(0.562335, abs=1e-6)


def test_masked_entropy_averages_valid_tokens():
    logits = torch.stack([torch.zeros(4), torch.tensor([100.0, 0, 0, 0]), torch.zeros(4)])[None]
    mask = torch.tensor([[1, 1, 0]])
    # (ln 4 + 0) / 2 = 0.693147; the third (uniform) token is masked out
    mean = masked_mean(entropy_from_logits(logits), mask)
    assert mean.item() == pytest.approx(math.log(4) / 2, abs=1e-6)


# -- loss aggregation and the KL loss -----------------------------------------------------------

# per-token losses of two rows with 3 and 1 valid tokens; padded positions hold garbage (9)
AGG_LOSSES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
AGG_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),  # every token weighs 1/4
        ("seq_mean_token_mean", (6 / 3 + 4 / 1) / 2),  # every sequence weighs 1/2
        ("seq_mean_token_sum", (6 + 4) / 2),  # token sums, averaged over sequences
    ],
)
def test_aggregations_by_hand(agg, expected):
    assert float(aggregate_loss(AGG_LOSSES, AGG_MASK, agg)) == pytest.approx(expected)


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_rank_rescaling_gives_the_global_minibatch_loss_for_every_aggregation(agg):
    """What a learner rank does: loss_local * w_local * ranks / w_global, averaged over ranks,
    equals the loss over the whole minibatch (so any rank count takes the same step)."""
    torch.manual_seed(0)
    losses = torch.randn(8, 5)
    mask = (torch.arange(5)[None, :] < torch.randint(1, 6, (8, 1))).long()  # ragged
    world = 4
    total = aggregation_weight(mask, agg)
    per_rank = [
        aggregate_loss(losses[r::world], mask[r::world], agg)
        * aggregation_weight(mask[r::world], agg)
        * world
        / total
        for r in range(world)
    ]
    torch.testing.assert_close(sum(per_rank) / world, aggregate_loss(losses, mask, agg))


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="token_sum"):
        aggregate_loss(AGG_LOSSES, AGG_MASK, "token_sum")


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token_mean", -5 / 4),
        ("seq_mean_token_mean", -(1 + 2) / 2),
        ("seq_mean_token_sum", -(3 + 2) / 2),
    ],
)
def test_policy_loss_aggregates_by_hand(agg, expected):
    # ratio 1 everywhere: per-token loss is -A
    lp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, 1.0], [2.0, 7.0, 7.0]])
    loss, stats = policy_loss(lp, lp, adv, AGG_MASK, clip_eps=0.2, agg=agg)
    assert float(loss) == pytest.approx(expected)
    assert float(stats["ratio_mean"]) == pytest.approx(1.0)


def test_kl_loss_k3_and_k2_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # r = ref - logp = (-1, 0): k3 = exp(r) - 1 - r = (e^-1, 0); k2 = (logp - ref)^2 / 2 = (0.5, 0)
    assert float(kl_loss(logprobs, ref, mask, "k3").detach()) == pytest.approx(math.exp(-1) / 2)
    k2 = kl_loss(logprobs, ref, mask, "k2")
    assert float(k2.detach()) == pytest.approx(0.25)
    k2.backward()  # d/dlogp of mean (logp - ref)^2 / 2 = (logp - ref) / 2 on valid tokens
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.5, 0.0, 0.0]]))
