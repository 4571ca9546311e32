import math

import pytest
import torch

from rlhf_ray.algo import AdaptiveKLController, FixedKLController, estimate_kl, kl_k1, kl_k3


def test_k1_and_k3_hand_numbers():
    logprobs = torch.tensor([[-1.0, -2.0, -0.7]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.7]])
    # k1 = logp - ref = 0.5, -1.0, 0
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs), torch.tensor([[0.5, -1.0, 0.0]]))
    # r = ref - logp = -0.5, 1, 0; k3 = e^r - 1 - r:
    # e^-0.5 - 1 + 0.5 = 0.606531 - 0.5 = 0.106531; e - 2 = 0.718282; 0
    torch.testing.assert_close(
        kl_k3(logprobs, ref_logprobs), torch.tensor([[0.106531, 0.718282, 0.0]])
    )


def test_k3_is_nonnegative():
    torch.manual_seed(0)
    logprobs, ref_logprobs = torch.randn(8, 16) * 3, torch.randn(8, 16) * 3
    assert (kl_k3(logprobs, ref_logprobs) >= 0).all()


def test_estimate_kl_dispatch():
    a, b = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    torch.testing.assert_close(estimate_kl(a, b, "k1"), kl_k1(a, b))
    torch.testing.assert_close(estimate_kl(a, b, "k3"), kl_k3(a, b))
    # k2 = (log p - log q)^2 / 2 = (−1 − (−2))^2 / 2 = 0.5
    torch.testing.assert_close(estimate_kl(a, b, "k2"), torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="k4"):
        estimate_kl(a, b, "k4")


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        # target 6, horizon 10000, n_steps 1000, so mult = 1 + e * 0.1
        (6.6, 0.202),  # e = 6.6/6 - 1 = 0.1 -> mult 1.01 -> 0.2 * 1.01
        (5.4, 0.198),  # e = 5.4/6 - 1 = -0.1 -> mult 0.99
        (9.0, 0.204),  # e = 0.5 clipped to 0.2 -> mult 1.02
        (0.0, 0.196),  # e = -1 clipped to -0.2 -> mult 0.98
    ],
)
def test_adaptive_controller_hand_numbers(current_kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=current_kl, n_steps=1000)
    assert ctl.value == pytest.approx(expected)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 1000)
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(3.0, 500)
    resumed.update(3.0, 500)
    assert math.isclose(resumed.value, ctl.value, rel_tol=0, abs_tol=0)
