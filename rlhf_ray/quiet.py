"""Known-harmless output of our dependencies, silenced where it starts (docs/design.md, "Console").

Each filter names one message we know and have judged harmless; anything else still prints.
``quiet_dependencies`` runs in every process that trains or saves: each learner rank, on Ray or
in process (``engines.training.init_distributed``).
"""

from __future__ import annotations

import logging
import warnings

# DeepSpeed's ZeRO collectives call torch.distributed.all_gather_into_tensor and
# reduce_scatter_tensor, which torch 2.13 marks deprecated (a FutureWarning per rank).
TORCH_DIST_DEPRECATION = r"`torch\.distributed\.\w+` is deprecated"

# Ray warns that a local cluster it starts uses token authentication; that is what we want.
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_dependencies() -> None:
    """Filter the torch.distributed deprecation warnings and turn off transformers' progress
    bars ("Writing model shards", one per save) in this process."""
    warnings.filterwarnings("ignore", message=TORCH_DIST_DEPRECATION, category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def quiet_local_ray() -> None:
    """Before ``ray.init`` starts a local cluster: its token-authentication notice is known."""
    logging.getLogger(RAY_TOKEN_LOGGER).setLevel(logging.ERROR)


def skip_shm_comm_op() -> None:
    """Before ``deepspeed.init_distributed`` on CPU: no shared-memory comm op.

    DeepSpeed probes every op's compiler support, then builds (JIT, about 30 s cold) and loads a
    shared-memory all-reduce op in every CPU process, printing "built successfully" each time.
    Only its tensor-parallel inference all-reduce uses that op; ZeRO training goes through
    torch.distributed (gloo), so the op is declared unavailable and neither probe nor build runs.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
