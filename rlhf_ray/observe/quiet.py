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

# vLLM's notices at each engine start that describe the settings we chose on purpose
# (engines/vllm_engine.py), by logger and the start of the message as printed: eager mode, one
# global seed (each request names its own), an in-process engine; on the CPU build, that it
# runs without Triton, without the preloaded allocator / OpenMP libraries it suggests for
# speed, and without letting torch.set_num_threads change the threads it pinned; and, when a
# second engine starts in one process (`--in-process` runs two rollout workers), that vLLM
# registers its own kernels again and sees the VLLM_DIST_IDENT it set itself. None is an error;
# any other warning of these loggers still prints.
VLLM_KNOWN_NOTICES = {
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    "vllm.triton_utils.dispatcher": ("Kernel vllm.",),
    "vllm.engine.arg_utils": ("The global random seed is set to",),
    "vllm.config.vllm": (
        "Enforce eager set",
        "Inductor compilation was disabled by user settings",
        "Model Runner V2 requires Triton",
    ),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type to float32"),
    "vllm.platforms.interface": ("Unknown vLLM environment variable detected: VLLM_DIST_IDENT",),
    "vllm.v1.worker.cpu_worker": (
        "libtcmalloc is not found in LD_PRELOAD",
        "libiomp is not found in LD_PRELOAD",
        "CPU backend doesn't allow to use `torch.set_num_threads`",
    ),
}


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


class _KnownNotices(logging.Filter):
    """Drops the records of one logger whose message, as printed, starts with one of
    ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _add_once(logger: logging.Logger, made: logging.Filter) -> None:
    if not any(type(f) is type(made) for f in logger.filters):
        logger.addFilter(made)


def quiet_vllm() -> None:
    """Before vLLM is imported in this process (some notices come at import).

    ``LLM()`` warms up chat-template rendering, which needs a tokenizer; our engines take token
    ids (``skip_tokenizer_init``) and never render a chat, so the warmup's ValueError and its
    traceback (one per engine start) say nothing. vLLM logs it as a warning with the
    traceback; only that record is dropped, with the notices that the missing tokenizer gives
    no EOS/BOS id (each request names its stop). The ``VLLM_KNOWN_NOTICES`` are dropped too;
    any other warning of vLLM still prints."""
    _add_once(logging.getLogger(VLLM_RENDERER_LOGGER), _NoTokenizerNotices())
    for name, starts in VLLM_KNOWN_NOTICES.items():
        _add_once(logging.getLogger(name), _KnownNotices(starts))


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
