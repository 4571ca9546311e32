"""The console filter for vLLM drops exactly the records it names: the chat-template warmup's
failure caused by the tokenizer we skip on purpose, the no-EOS/BOS notices and the engine-start
notices about settings we chose (``VLLM_KNOWN_NOTICES``); any other failure of the warmup, or
other warning of those loggers, still prints, traceback and all."""

from __future__ import annotations

import logging
import sys

from rlhf_ray.observe.quiet import (
    VLLM_CHAT_WARMUP,
    VLLM_KNOWN_NOTICES,
    VLLM_RENDERER_LOGGER,
    quiet_vllm,
)


def _log_failure(logger: logging.Logger, exc: Exception) -> None:
    try:
        raise exc
    except Exception:
        logger.warning(VLLM_CHAT_WARMUP, exc_info=sys.exc_info())


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_only_the_skipped_tokenizers_warmup_failure_is_dropped():
    quiet_vllm()
    quiet_vllm()  # idempotent: one filter
    logger = logging.getLogger(VLLM_RENDERER_LOGGER)
    assert len(logger.filters) == 1
    # Our own handler on the logger itself: once vLLM is imported in this process (other test
    # modules do), its "vllm" logger stops propagating to the root, where caplog listens.
    kept_records = _Kept()
    logger.addHandler(kept_records)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        _log_failure(logger, ValueError("Tokenizer not available when `skip_tokenizer_init=True`"))
        logger.warning("Using None for EOS token id because tokenizer is not initialized")
        _log_failure(logger, ValueError("template syntax error"))
        _log_failure(logger, RuntimeError("skip_tokenizer_init"))
        logger.warning("something else")
    finally:
        logger.removeHandler(kept_records)
        logger.setLevel(level)
    kept = [(r.getMessage(), r.exc_info[1] if r.exc_info else None) for r in kept_records.records]
    assert [m for m, _ in kept] == [VLLM_CHAT_WARMUP, VLLM_CHAT_WARMUP, "something else"]
    assert [str(e) for _, e in kept[:2]] == ["template syntax error", "skip_tokenizer_init"]


def test_the_known_vllm_notices_are_dropped_and_other_warnings_of_their_loggers_kept():
    quiet_vllm()
    for name, starts in VLLM_KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        kept, level = _Kept(), logger.level
        logger.addHandler(kept)
        logger.setLevel(logging.INFO)  # whatever level vLLM's logging config gave its loggers
        try:
            for start in starts:
                logger.warning("%s (the rest of vLLM's message)", start)
            logger.warning("Node %s is not in available memory nodes %s.", 1, [0])
            logger.warning("Unknown vLLM environment variable detected: %s", "VLLM_TYPO")
        finally:
            logger.removeHandler(kept)
            logger.setLevel(level)
        assert [r.getMessage() for r in kept.records] == [
            "Node 1 is not in available memory nodes [0].",
            "Unknown vLLM environment variable detected: VLLM_TYPO",
        ], name
