"""Known-harmless output of our dependencies, silenced where it starts (docs/design.md, "Console").

Each filter names one message we know and have judged harmless; anything else still prints.
``quiet_dependencies`` runs in every process that trains or saves: each learner rank, on Ray or
in process (``engines.training.init_distributed``); ``quiet_vllm`` in every process that starts
a vLLM engine (``engines.vllm_engine.VLLMSampler``).
"""

from __future__ import annotations

import logging
import warnings

# DeepSpeed's ZeRO collectives call torch.distributed.all_gather_into_tensor and
# reduce_scatter_tensor, which torch 2.13 marks deprecated (a FutureWarning per rank).
TORCH_DIST_DEPRECATION = r"`torch\.distributed\.\w+` is deprecated"

# Ray warns that a local cluster it starts uses token authentication; that is what we want.
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"

# vLLM's renderer without a tokenizer (we pass token ids, skip_tokenizer_init; quiet_vllm):
# LLM() renders a chat once to warm up, which fails; and it has no EOS/BOS of its own (each
# request names its stop token).
VLLM_RENDERER_LOGGER = "vllm.renderers.base"
VLLM_CHAT_WARMUP = "Chat template warmup failed"
VLLM_NO_TOKENIZER_IDS = (
    "Using None for EOS token id because tokenizer is not initialized",
    "Using None for BOS token id because tokenizer is not initialized",
)


def quiet_dependencies() -> None:
    """Filter the torch.distributed deprecation warnings and turn off transformers' progress
    bars ("Writing model shards", one per save) in this process."""
    warnings.filterwarnings("ignore", message=TORCH_DIST_DEPRECATION, category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _NoTokenizerNotices(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" record when its cause is the tokenizer we
    skip on purpose, and its notices that it has no EOS/BOS id; any other failure of the
    warmup (or any other record) still prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in VLLM_NO_TOKENIZER_IDS:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            record.msg == VLLM_CHAT_WARMUP
            and isinstance(exc, ValueError)
            and "skip_tokenizer_init" in str(exc)
        )


def quiet_vllm() -> None:
    """Before a vLLM engine starts in this process. ``LLM()`` warms up chat-template rendering,
    which needs a tokenizer; our engines take token ids (``skip_tokenizer_init``) and never
    render a chat, so the warmup's ValueError and its traceback (one per engine start) say
    nothing. vLLM logs it as a warning with the traceback; only that record is dropped, with
    the notices that the missing tokenizer gives no EOS/BOS id (each request names its stop)."""
    logger = logging.getLogger(VLLM_RENDERER_LOGGER)
    if not any(isinstance(f, _NoTokenizerNotices) for f in logger.filters):
        logger.addFilter(_NoTokenizerNotices())


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
