"""The distribution the rollout samples from, shared by the sampler and the learner.

PPO's ratio ``pi_new / pi_old`` must be taken against the distribution that produced the
samples. With top-k / top-p that is the *processed* distribution, so the sampler's recorded
log-probs and the learner's old and new log-probs for the ratio go through ``process_logits``
(temperature, then top-k, then top-p: transformers' own warpers, in the order ``generate``
applies them). The KL to the reference (reward penalty, KL loss, ``ppo/kl``) and the entropy
use the full temperature-scaled distribution on both sides, as veRL and TRL do: the filtered
log-prob of a kept token is ``log p - log(kept mass)``, which would bias every KL estimate up
by ``-log(kept mass)`` per token (``models/logprobs.py``).

The sampler draws each row's token by inverse-CDF sampling (``inverse_cdf_sample``) with one
uniform per row and step from the row's own generator (``row_uniforms``), vectorised over the
batch: a row's sample depends on its seed and its probabilities, never on its batch-mates.

A token can be sampled from outside the learner's filtered set when float differences move it
across the top-k / top-p edge; ``label_logprobs`` then keeps that token in the set (so the
log-prob is finite) and reports it, so the run can count it.
"""

from __future__ import annotations

import torch


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """``logits (N, V)`` -> float32 processed scores ``(N, V)``: divided by ``temperature``,
    then every token outside the ``top_k`` largest and outside the smallest set whose
    probability reaches ``top_p`` set to ``-inf`` (0 / 1.0: that filter is off)."""
    # (imported here: transformers' generation package costs the driver seconds at start-up)
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)  # type: ignore[arg-type]
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)  # type: ignore[arg-type]
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)  # type: ignore[arg-type]
    return scores


def label_logprobs(
    scaled: torch.Tensor, processed: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) under the processed distribution, and whether the label was outside it.

    ``scaled (N, V)``: temperature-scaled logits; ``processed (N, V)``: the same after top-k /
    top-p (``-inf`` outside the set); ``labels (N,)``. A label outside the set is put back in
    with its scaled logit before the softmax, so its log-prob is finite.
    Returns ``(logprobs (N,), outside (N,) bool)``.
    """
    index = labels.unsqueeze(-1)
    outside = torch.isinf(processed.gather(-1, index)).squeeze(-1)
    if bool(outside.any()):
        processed = processed.scatter(-1, index, scaled.gather(-1, index))
    logprobs = torch.log_softmax(processed, dim=-1).gather(-1, index).squeeze(-1)
    return logprobs, outside


def entropy_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """Entropy ``(...)`` of ``softmax(scores (..., V))``; ``-inf`` scores (filtered tokens)
    contribute 0: H = -sum_{p > 0} p log p."""
    logp = torch.log_softmax(scores, dim=-1)
    # zero the log of filtered tokens BEFORE the product: 0 * -inf would make NaN gradients
    logp_kept = torch.where(torch.isinf(scores), torch.zeros_like(logp), logp)
    return -(logp.exp() * logp_kept).sum(-1)


def entropy_of_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy ``(...)`` from normalised ``logprobs (..., V)`` (a ``log_softmax``): the
    H = -sum_{p > 0} p log p of ``entropy_of_scores`` of the scores they came from (to float
    rounding), without a second log-softmax: one ``exp`` and a row-wise dot product. A row with
    ``-inf`` entries (p = 0, where ``0 * -inf`` is NaN) is summed again without them."""
    flat = logprobs.reshape(-1, logprobs.shape[-1])
    out = -torch.bmm(flat.exp().unsqueeze(1), flat.unsqueeze(2)).reshape(logprobs.shape[:-1])
    bad = torch.isnan(out)
    if bool(bad.any()):
        rows = logprobs[bad]
        out[bad] = -(rows.exp() * rows.clamp(min=torch.finfo(rows.dtype).min)).sum(-1)
    return out


def row_uniforms(generators: list[torch.Generator], steps: int) -> torch.Tensor:
    """``(N, steps)`` float64 uniforms in [0, 1), row ``i`` drawn from ``generators[i]`` only:
    one draw per row for a whole ``generate`` call, column ``t`` for its step ``t``."""
    if not generators:
        return torch.empty(0, steps, dtype=torch.float64)
    return torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in generators])


def inverse_cdf_sample(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``softmax``-normalised ``logprobs (N, V)``, row ``i`` chosen by
    ``uniforms[i]`` alone (``(N,)`` in [0, 1)): the first token whose cumulative probability
    (float64) exceeds ``u`` times the row's total. A token of probability 0 (filtered) is never
    chosen. Returns ``(N, 1)`` token ids.

    Vectorised over the batch, and a row's choice depends on its own probabilities and uniform
    only, not on which rows share its batch."""
    cdf = logprobs.exp().cumsum(-1, dtype=torch.float64)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    chosen = torch.searchsorted(cdf, target, right=True)
    return chosen.clamp(max=logprobs.shape[-1] - 1)
