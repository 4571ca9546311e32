"""Per-token KL estimators and the KL-coefficient (beta) controllers.

Estimators follow Schulman, "Approximating KL Divergence" (2020), for samples drawn from the
policy: with r = ref_logprobs - logprobs, k1 = -r, k2 = r^2 / 2 and k3 = (exp(r) - 1) - r.
k3 is clamped as veRL's ``kl_penalty`` clamps it (``core_algos.py``, "low_var_kl"): r to
[-K3_LOG_RATIO_CLAMP, +K3_LOG_RATIO_CLAMP] before the exponential, k3 to [-K3_CLAMP, K3_CLAMP]
after, so one token far outside the reference's support cannot overflow or dominate the loss.
"""

from __future__ import annotations

import torch

K3_LOG_RATIO_CLAMP = 20.0
"""|ref_logprobs - logprobs| is clamped to this before exp in k3 (veRL)."""
K3_CLAMP = 10.0
"""k3 is clamped to [-K3_CLAMP, K3_CLAMP] (veRL)."""


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log pi_ref(a); unbiased, can be negative per token. Shapes `(B, T)`."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi(a) - log pi_ref(a))^2 / 2; biased, low variance, >= 0. Shapes `(B, T)`.

    As a loss its gradient is that of the reverse KL (the estimator GRPO-style KL losses use)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (exp(r) - 1) - r, r = ref_logprobs - logprobs; unbiased and >= 0. Shapes `(B, T)`.

    r is clamped to +-K3_LOG_RATIO_CLAMP and k3 to +-K3_CLAMP (see the module docstring); the
    clamps bite only when the two log-probs differ by more than ~2.4 nats (k3 > 10)."""
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.expm1(log_ratio) - log_ratio).clamp(-K3_CLAMP, K3_CLAMP)


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def estimate_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate `(B, T)` by name ("k1", "k2" or "k3"); ValueError on any other name."""
    if estimator not in _ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {sorted(_ESTIMATORS)}"
        )
    return _ESTIMATORS[estimator](logprobs, ref_logprobs)


class FixedKLController:
    """A constant beta; `update` is a no-op so the driver treats both controllers alike."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive beta of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences", eq. 2).

    e = clip(current_kl / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    `n_steps` is the number of samples (episodes) the KL was measured over.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        # target and horizon come from the config on resume; only beta evolves.
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])
