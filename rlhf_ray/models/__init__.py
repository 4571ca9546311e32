"""Model construction and log-probability helpers."""

from rlhf_ray.models.build import (
    ScalarHeadModel,
    build_causal_lm,
    build_scalar_model,
    default_device,
    disable_dropout,
    max_positions,
    preset_config,
)
from rlhf_ray.models.logprobs import (
    last_token_index,
    position_ids_from_mask,
    response_logprobs,
)
from rlhf_ray.models.score_stats import read_score_stats, write_score_stats
from rlhf_ray.models.weights import state_dict_from_numpy, state_dict_to_numpy

__all__ = [
    "ScalarHeadModel",
    "build_causal_lm",
    "build_scalar_model",
    "default_device",
    "disable_dropout",
    "last_token_index",
    "max_positions",
    "position_ids_from_mask",
    "preset_config",
    "read_score_stats",
    "response_logprobs",
    "state_dict_from_numpy",
    "state_dict_to_numpy",
    "write_score_stats",
]
