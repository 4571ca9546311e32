"""Prompt and preference datasets (``datasets`` library), HH-RLHF parsing, prompt sampling."""

from rlhf_ray.data.preference import (
    DEFAULT_SYSTEM,
    PreferencePair,
    hh_pair,
    load_preferences,
    parse_hh_transcript,
    render_transcript,
)
from rlhf_ray.data.prompts import BUILTIN_PROMPTS, load_prompt_conversations, load_prompts
from rlhf_ray.data.sampler import PromptSampler

__all__ = [
    "BUILTIN_PROMPTS",
    "DEFAULT_SYSTEM",
    "PreferencePair",
    "PromptSampler",
    "hh_pair",
    "load_preferences",
    "load_prompt_conversations",
    "load_prompts",
    "parse_hh_transcript",
    "render_transcript",
]
