"""Our estimators and losses against reference formulas written here, from the papers and the
peers' documented behaviour (veRL ``core_algos.py``, TRL, Dr. GRPO), on random masked inputs.

Each reference is a plain per-row Python loop over the valid tokens (responses padded on the
right, as ours are), so it shares no code and no vectorisation trick with ``rlhf_ray.algo``.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algo import (
    aggregate_loss,
    compute_gae,
    estimate_kl,
    grpo_advantages,
    masked_whiten,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)

B, T, ATOL = 6, 7, 1e-6


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20)
    lengths = torch.tensor([7, 1, 4, 5, 2, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return {
        "mask": mask,
        "lengths": lengths,
        "rewards": torch.randn(B, T, generator=g, dtype=torch.float64),
        "values": torch.randn(B, T, generator=g, dtype=torch.float64),
        "scores": torch.randn(B, generator=g, dtype=torch.float64),
        "logprobs": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "old_logprobs": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "advantages": torch.randn(B, T, generator=g, dtype=torch.float64),
        "returns": torch.randn(B, T, generator=g, dtype=torch.float64),
    }


def _valid(x: torch.Tensor, n: torch.Tensor) -> list[list[float]]:
    return [x[i, : int(n[i])].tolist() for i in range(len(n))]


def _close(ours: torch.Tensor, ref: list[list[float]], n: torch.Tensor) -> None:
    """Ours equals ``ref`` on valid tokens and is 0 on padding."""
    for i, row in enumerate(ref):
        torch.testing.assert_close(
            ours[i, : int(n[i])].double(), torch.tensor(row).double(), rtol=0, atol=ATOL
        )
        assert (ours[i, int(n[i]) :] == 0).all()


def _whiten(xs: list[float]) -> list[float]:
    """veRL ``masked_whiten``: unbiased variance of the valid elements, 1e-8 under the root."""
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return [(x - mean) / math.sqrt(var + 1e-8) for x in xs]


def test_gae_and_whitening_match_the_paper_recursion(inputs):
    """Schulman et al. 2016 eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l}, V = 0 after the last
    valid token; returns = A + V (veRL ``compute_gae_advantage_return``), then whitening over
    every valid token of the batch."""
    gamma, lam, n = 0.9, 0.8, inputs["lengths"]
    r, v = _valid(inputs["rewards"], n), _valid(inputs["values"], n)
    ref_adv, ref_ret = [], []
    for rr, vv in zip(r, v, strict=True):
        deltas = [
            rr[t] + gamma * (vv[t + 1] if t + 1 < len(vv) else 0.0) - vv[t] for t in range(len(vv))
        ]
        adv = [
            sum((gamma * lam) ** k * deltas[t + k] for k in range(len(deltas) - t))
            for t in range(len(deltas))
        ]
        ref_adv.append(adv)
        ref_ret.append([a + b for a, b in zip(adv, vv, strict=True)])
    adv, ret = compute_gae(inputs["rewards"], inputs["values"], inputs["mask"], gamma, lam)
    _close(adv, ref_adv, n)
    _close(ret, ref_ret, n)
    flat = _whiten([a for row in ref_adv for a in row])
    ref_white, k = [], 0
    for row in ref_adv:
        ref_white.append(flat[k : k + len(row)])
        k += len(row)
    _close(masked_whiten(adv, inputs["mask"]), ref_white, n)


def test_grpo_and_rloo_match_their_papers(inputs):
    """GRPO (Shao et al. 2024; veRL ``compute_grpo_outcome_advantage``): (r - mean) / (std +
    1e-6) with the group's unbiased std, or r - mean (Dr. GRPO); RLOO (Ahmadian et al. 2024):
    r minus the mean of the other n - 1 rewards. Every valid token gets its row's value."""
    n, scores, group = inputs["lengths"], inputs["scores"].tolist(), 3
    ref = {"grpo": [], "drgrpo": [], "rloo": []}
    for start in range(0, B, group):
        g = scores[start : start + group]
        mean = sum(g) / group
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (group - 1))
        for i, x in enumerate(g):
            ref["grpo"].append((x - mean) / (std + 1e-6))
            ref["drgrpo"].append(x - mean)
            ref["rloo"].append(x - (sum(g) - g[i]) / (group - 1))
    mask, s = inputs["mask"], inputs["scores"]
    ours = {
        "grpo": grpo_advantages(s, mask, group),
        "drgrpo": grpo_advantages(s, mask, group, norm_std=False),
        "rloo": rloo_advantages(s, mask, group),
    }
    for name, per_row in ref.items():
        _close(ours[name], [[a] * int(L) for a, L in zip(per_row, n, strict=True)], n)


def test_reinforce_pp_matches_its_paper(inputs):
    """REINFORCE++ (Hu 2025; veRL ``compute_reinforce_plus_plus_outcome_advantage``): G_t =
    sum_k gamma^k r_{t+k} per row, then whitened over every valid token of the batch."""
    gamma, n = 0.95, inputs["lengths"]
    r = _valid(inputs["rewards"], n)
    ref_ret = [
        [sum(gamma**k * row[t + k] for k in range(len(row) - t)) for t in range(len(row))]
        for row in r
    ]
    flat = _whiten([g for row in ref_ret for g in row])
    ref_adv, k = [], 0
    for row in ref_ret:
        ref_adv.append(flat[k : k + len(row)])
        k += len(row)
    adv, ret = reinforce_pp_advantages(inputs["rewards"], inputs["mask"], gamma)
    _close(ret, ref_ret, n)
    _close(adv, ref_adv, n)


def test_kl_estimators_match_schulman_and_verl_clamps(inputs):
    """Schulman (2020): with r = log pi_ref - log pi, k1 = -r, k2 = r^2 / 2, k3 = e^r - 1 - r;
    veRL clamps r to [-20, 20] and k3 to [-10, 10] (inputs here reach |r| = 6, so k3 > 10
    somewhere and the clamp is exercised)."""
    lp, ref, n = inputs["logprobs"] * 2, inputs["old_logprobs"], inputs["lengths"]
    expected = {"k1": [], "k2": [], "k3": []}
    for a_row, b_row in zip(_valid(lp, n), _valid(ref, n), strict=True):
        rs = [b - a for a, b in zip(a_row, b_row, strict=True)]
        expected["k1"].append([-x for x in rs])
        expected["k2"].append([x * x / 2 for x in rs])
        expected["k3"].append([min(10.0, math.exp(max(-20, min(20, x))) - 1 - x) for x in rs])
    for name, rows in expected.items():
        _close(estimate_kl(lp, ref, name) * inputs["mask"], rows, n)
    assert max(max(row) for row in expected["k3"]) == 10.0  # the clamp was reached


def test_k3_clamp_keeps_a_far_token_finite_and_bounded():
    """One token 200 nats less likely under the reference: unclamped k3 overflows to inf."""
    k3 = estimate_kl(torch.tensor([[-1.0, -0.5]]), torch.tensor([[-1.0, 199.5]]), "k3")
    assert torch.isfinite(k3).all() and k3[0, 1] == 10.0 and k3[0, 0] == 0.0


def _reference_per_token(lp, old, adv, eps, dual_clip):
    """PPO eq. 7 negated, log-ratio clamped to +-20 (veRL), and for A < 0 the dual clip
    min(., -A * c) (Ye et al. 2020 eq. 5; veRL ``compute_policy_loss``)."""
    ratio = math.exp(max(-20.0, min(20.0, lp - old)))
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - eps), 1 + eps))
    if dual_clip is not None and adv < 0:
        loss = min(loss, -adv * dual_clip)
    return loss


def _reference_aggregate(rows: list[list[float]], width: int, agg: str) -> float:
    """The four modes (DAPO / GRPO / Dr. GRPO; veRL ``agg_loss``) on per-token losses."""
    if agg == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if agg == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if agg == "seq_mean_token_sum":
        return sum(sum(r) for r in rows) / len(rows)
    return sum(sum(r) / width for r in rows) / len(rows)  # seq_mean_token_sum_norm


AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_the_reference_for_every_aggregation_and_clip(inputs, agg, dual_clip):
    n, eps = inputs["lengths"], 0.2
    lp, old, adv = inputs["logprobs"], inputs["old_logprobs"], inputs["advantages"]
    rows = [
        [_reference_per_token(a, o, g, eps, dual_clip) for a, o, g in zip(*r, strict=True)]
        for r in zip(_valid(lp, n), _valid(old, n), _valid(adv, n), strict=True)
    ]
    loss, _ = policy_loss(lp, old, adv, inputs["mask"], eps, agg, dual_clip)
    assert float(loss) == pytest.approx(_reference_aggregate(rows, T, agg), abs=ATOL)


def test_value_loss_matches_the_clipped_reference(inputs):
    """0.5 * token mean of max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    n, eps = inputs["lengths"], 0.2
    v, old, ret = inputs["values"], inputs["old_logprobs"], inputs["returns"]
    per = [
        (a, o, r)
        for row in zip(_valid(v, n), _valid(old, n), _valid(ret, n), strict=True)
        for a, o, r in zip(*row, strict=True)
    ]
    ref = (
        0.5
        * sum(max((a - r) ** 2, (o + min(max(a - o, -eps), eps) - r) ** 2) for a, o, r in per)
        / len(per)
    )
    loss, _ = value_loss(v, old, ret, inputs["mask"], eps)
    assert float(loss) == pytest.approx(ref, abs=ATOL)


def test_dual_clip_bounds_the_loss_of_a_negative_advantage_with_a_huge_ratio():
    """A = -1, ratio e^5 ~ 148: plain PPO's loss is 148 and has a gradient; dual-clip c = 3
    caps it at 3 with no gradient (and counts the token)."""
    lp = torch.tensor([[4.0]], requires_grad=True)
    old, adv, mask = torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1)
    plain, _ = policy_loss(lp, old, adv, mask, 0.2)
    assert float(plain) == pytest.approx(math.exp(5.0), rel=1e-5)
    capped, stats = policy_loss(lp, old, adv, mask, 0.2, dual_clip=3.0)
    assert float(capped) == pytest.approx(3.0) and float(stats["dual_clipfrac"]) == 1.0
    capped.backward()
    assert lp.grad is not None and float(lp.grad) == 0.0


def test_log_ratio_clamp_keeps_the_policy_loss_finite():
    """A log-ratio of 200 overflows exp to inf in float32 without veRL's +-20 clamp."""
    loss, _ = policy_loss(
        torch.tensor([[199.0]]),
        torch.tensor([[-1.0]]),
        torch.tensor([[-1.0]]),
        torch.ones(1, 1),
        0.2,
    )
    assert torch.isfinite(loss) and float(loss) == pytest.approx(math.exp(20.0), rel=1e-5)


def test_seq_mean_token_sum_norm_divides_by_the_constant_width_not_the_lengths():
    """Rows of 1 and 3 valid tokens, width 4, losses 1 per token: (1 + 3) / 4 / 2 = 0.5,
    whatever the lengths are; seq_mean_token_sum gives 2 (mean length times larger)."""
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    ones = torch.ones(2, 4)
    assert float(aggregate_loss(ones, mask, "seq_mean_token_sum_norm")) == pytest.approx(0.5)
    assert float(aggregate_loss(ones, mask, "seq_mean_token_sum")) == pytest.approx(2.0)
