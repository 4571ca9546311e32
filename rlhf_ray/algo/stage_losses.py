"""Losses of the stages before PPO: supervised fine-tuning and Bradley-Terry reward modelling.

Stats are detached 0-dim tensors, as in ``algo.losses``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_ray.algo.advantages import masked_mean


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the tokens where ``loss_mask`` is 1 (the reply tokens).

    ``logprobs (B, T)``: log p(token t | tokens < t); ``loss_mask (B, T)``.
    """
    return masked_mean(-logprobs, loss_mask)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of scalar scores ``(B,)``: mean of ``-log sigmoid(chosen - rejected)``,
    the negative log-likelihood of the preference under P(chosen > rejected) = sigmoid(margin).

    Stats: ``accuracy`` (share of pairs with the chosen scored higher; a tie counts half, so
    equal scores read as chance), ``margin`` (mean of ``chosen - rejected``).
    """
    margin = chosen.float() - rejected.float()
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        wins = (margin > 0).float() + 0.5 * (margin == 0).float()
        stats = {"accuracy": wins.mean(), "margin": margin.mean()}
    return loss, stats
