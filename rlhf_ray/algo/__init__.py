"""Pure PPO math over tensors: no config objects, no devices, no Ray (docs/design.md)."""

from rlhf_ray.algo.advantages import (
    compute_gae,
    explained_variance,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
)
from rlhf_ray.algo.comparison import (
    mean_difference_interval,
    mean_interval,
    prompts_to_exclude_half,
    sequence_kl,
    win_rate,
    win_rate_interval,
)
from rlhf_ray.algo.ensemble import ENSEMBLE_COMBINES, combine_ensemble, ensemble_std
from rlhf_ray.algo.estimators import (
    discounted_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_rewards,
)
from rlhf_ray.algo.kl import (
    AdaptiveKLController,
    FixedKLController,
    estimate_kl,
    kl_k1,
    kl_k2,
    kl_k3,
)
from rlhf_ray.algo.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    aggregation_weight,
    entropy_from_logits,
    kl_loss,
    policy_loss,
    value_loss,
)
from rlhf_ray.algo.normalize import RunningMoments, standardize
from rlhf_ray.algo.response import append_eos, apply_missing_eos_penalty, truncate_after_eos
from rlhf_ray.algo.sampling import (
    entropy_of_logprobs,
    entropy_of_scores,
    inverse_cdf_sample,
    label_logprobs,
    process_logits,
    row_uniforms,
)
from rlhf_ray.algo.stage_losses import bradley_terry_loss, sft_loss

__all__ = [
    "ENSEMBLE_COMBINES",
    "combine_ensemble",
    "ensemble_std",
    "LOSS_AGGREGATIONS",
    "AdaptiveKLController",
    "RunningMoments",
    "FixedKLController",
    "aggregate_loss",
    "aggregation_weight",
    "append_eos",
    "apply_missing_eos_penalty",
    "bradley_terry_loss",
    "compute_gae",
    "discounted_returns",
    "entropy_from_logits",
    "estimate_kl",
    "explained_variance",
    "grpo_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "sequence_kl",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_rewards",
    "sft_loss",
    "truncate_after_eos",
    "value_loss",
    "win_rate",
    "mean_interval",
    "win_rate_interval",
    "mean_difference_interval",
    "prompts_to_exclude_half",
    "entropy_of_logprobs",
    "entropy_of_scores",
    "inverse_cdf_sample",
    "label_logprobs",
    "process_logits",
    "row_uniforms",
    "standardize",
]
