import pytest
import torch

from rlhf_ray.algo import (
    compute_gae,
    explained_variance,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
)


def test_masked_mean_ignores_invalid_and_supports_dim():
    x = torch.tensor([[1.0, 2.0, 99.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3 = 7/3; per row: 3/2 = 1.5 and 4/1 = 4
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))


def test_masked_var_bessel_and_too_few_elements():
    x = torch.tensor([[2.0, 4.0, 6.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 4; squared deviations 4, 0, 4 -> biased 8/3, unbiased 8/2 = 4
    assert masked_var(x, mask).item() == pytest.approx(4.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(8 / 3)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0, 0]]))


def test_masked_whiten_hand_example():
    x = torch.tensor([[2.0, 4.0, 6.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 4, unbiased var 4, std 2: (2-4)/2 = -1, 0, (6-4)/2 = 1; invalid -> 0
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False adds the mean 4 back: 3, 4, 5
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]])
    )


def test_masked_whiten_matches_torch_on_valid_elements():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64) * 3 + 2
    lengths = torch.tensor([7, 3, 1, 5])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    valid = x[mask.bool()]
    std = torch.sqrt(valid.var(unbiased=True) + 1e-8)
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out[mask.bool()], (valid - valid.mean()) / std)
    assert (out[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    torch.testing.assert_close(kept.mean(), valid.mean())
    torch.testing.assert_close(kept.std(), torch.tensor(1.0, dtype=torch.float64))


def test_gae_hand_example_gamma_1():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 9.9]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # gamma = 1, lam = 0.95; V past the last valid token is 0
    # t=2: delta = 1.0 + 0 - 0.3 = 0.7;             A2 = 0.7
    # t=1: delta = -0.2 + 0.3 - 0.4 = -0.3;         A1 = -0.3 + 0.95 * 0.7 = 0.365
    # t=0: delta = 0.1 + 0.4 - 0.5 = 0.0;           A0 = 0.95 * 0.365 = 0.34675
    # returns = A + V = 0.84675, 0.765, 1.0
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.34675, 0.365, 0.7, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.84675, 0.765, 1.0, 0.0]]))


def test_gae_hand_example_gamma_09_lam_08():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72
    # t=2: delta = 2.0 - 1.5 = 0.5;                  A2 = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35;       A1 = 0.35 + 0.72 * 0.5 = 0.71
    # t=0: delta = 1.0 + 0.9 * 1.0 - 0.5 = 1.4;      A0 = 1.4 + 0.72 * 0.71 = 1.9112
    # returns = 2.4112, 1.71, 2.0
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0]]))


def _reference_gae(rewards, values, length, gamma, lam):
    # TRL-style loop over one row truncated to its length, bootstrap 0 at the end.
    advantages, last_gae = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t < length - 1 else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last_gae = delta + gamma * lam * last_gae
        advantages[t] = last_gae
    return advantages


def test_gae_matches_reference_on_ragged_batch():
    torch.manual_seed(1)
    B, T, gamma, lam = 5, 9, 0.97, 0.9
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    lengths = [9, 1, 4, 7, 2]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    assert not adv.requires_grad and not ret.requires_grad
    for b, n in enumerate(lengths):
        expected = _reference_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        torch.testing.assert_close(adv[b, :n], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(ret[b, :n], adv[b, :n] + values[b, :n].detach())
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_kl_penalized_rewards_score_at_last_valid_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -0.1], [-0.4, -5.0, -5.0, -5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    # k1 row 0: 0.5, -1.0, 0.0 (last invalid -> 0); row 1: 0.2, then invalid
    # rewards row 0: -0.1 * k1 = -0.05, 0.1, 0.0, and +2.0 at t=2 -> -0.05, 0.1, 2.0, 0
    # rewards row 1: -0.1 * 0.2 = -0.02, +(-1.0) at t=0 -> -1.02, 0, 0, 0
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(
        rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-1.02, 0.0, 0.0, 0.0]])
    )


def test_kl_penalized_rewards_k3_and_empty_row():
    logprobs, ref_logprobs = torch.tensor([[-2.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    # r = ref - logp = 1, 0: k3 = (e - 1) - 1 = 0.718282, 0; rewards = -0.5 * k3, +3 at t=1
    rewards, kl = kl_penalized_rewards(
        torch.tensor([3.0]), logprobs, ref_logprobs, torch.ones(1, 2), 0.5, estimator="k3"
    )
    torch.testing.assert_close(kl, torch.tensor([[0.718282, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.359141, 3.0]]))
    with pytest.raises(ValueError, match=r"\[1\]"):
        kl_penalized_rewards(
            torch.zeros(2),
            torch.zeros(2, 2),
            torch.zeros(2, 2),
            torch.tensor([[1, 0], [0, 0]]),
            0.1,
        )


def test_explained_variance_hand_example():
    returns = torch.tensor([[1.0, 2.0, 3.0, 40.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # residual 0, 0, 1: var = ((1/3)^2 * 2 + (2/3)^2) / 3 = 2/9; var(returns) = 2/3
    # ev = 1 - (2/9) / (2/3) = 2/3
    assert explained_variance(values, returns, mask) == pytest.approx(2 / 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
