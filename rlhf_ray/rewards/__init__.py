"""Rewards: the built-in reward functions and the loader of ``module:function`` paths
(``functions``), the length term (``length``), the remote service's client (``remote``), shaping
(``shaping``) and the composed weighted terms (``terms``).

The built-in functions are re-exported here so that the paths users write in configs,
``rlhf_ray.rewards:lowercase_fraction``, ``rlhf_ray.rewards:preference_overlap`` and
``rlhf_ray.rewards:last_number_matches`` and ``rlhf_ray.rewards:length_penalty``, name them.
"""

from rlhf_ray.rewards.arithmetic import last_number_matches
from rlhf_ray.rewards.functions import lowercase_fraction, preference_overlap
from rlhf_ray.rewards.length import length_penalty

__all__ = ["last_number_matches", "length_penalty", "lowercase_fraction", "preference_overlap"]
