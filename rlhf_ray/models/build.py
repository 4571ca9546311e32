"""Build or load the four models: causal LMs (policy, reference, rollout) and scalar-head models
(value, reward).

Scalar-head models are Hugging Face sequence-classification models with one label, so a reward
model trained here loads anywhere with ``AutoModelForSequenceClassification`` and a reward model
trained elsewhere loads here. We read the head at every token (values) or at the last real token
(rewards) instead of letting HF pick the position.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from rlhf_ray.accelerator import default_device  # noqa: F401 (exported here too)
from rlhf_ray.config.roles import is_adapter_dir, trains_lora
from rlhf_ray.models.logprobs import last_token_index, position_ids_from_mask

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# transformers' model classes are imported inside the builders: importing them costs a few CPU
# seconds (torch._dynamo, torch.distributed.tensor), which a process that builds no model (the
# driver, a reward-function scorer) should not pay at start-up.

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSource(Protocol):
    """What model builders read from ``config.ModelSpec``."""

    path: str | None
    preset: str
    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    init_seed: int
    dtype: str


class SpecialIds(Protocol):
    """What model builders read from a tokenizer."""

    pad_id: int
    eos_id: int
    bos_id: int | None
    vocab_size: int


def preset_config(spec: ModelSource, tok: SpecialIds) -> PretrainedConfig:
    """A tiny GPT-2 or Llama config sized to the tokenizer, dropout off, special ids explicit."""
    from transformers import GPT2Config, LlamaConfig

    bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
    common: dict[str, Any] = dict(
        vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
        bos_token_id=bos,
        tie_word_embeddings=True,
    )
    if spec.preset == "gpt2-tiny":
        return GPT2Config(
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    if spec.preset == "llama-tiny":
        return LlamaConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=4 * spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions,
            attention_dropout=0.0,
            **common,
        )
    raise ValueError(f"unknown model preset {spec.preset!r}")


def max_positions(config: PretrainedConfig, default: int = 1024) -> int:
    """The longest sequence a model's position embeddings cover (``default`` if unbounded)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def disable_dropout(model: nn.Module) -> None:
    """PPO needs identical forwards for sampling, old and new logprobs: zero every dropout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            setattr(module, "attention_dropout", 0.0)  # noqa: B010 (not an nn.Module attr)
    model.eval()


def grow_vocabulary(model: PreTrainedModel, vocab_size: int) -> None:
    """Rows for the tokens our tokenizer added to a pretrained model's (its ``<|pad|>``).

    transformers draws new rows at random from the old rows' distribution, so the policy, the
    reference and the critic, each resizing in its own process, held different pad rows and the
    exported model depended on the process's RNG. Every new row is the mean of the old rows
    instead: the same in every process, and (input and output rows alike) a token the model
    gives a negligible probability (about 1e-8 on SmolLM2-135M)."""
    old = model.get_input_embeddings().num_embeddings  # (a ZeRO-3 weight's local shape is 0)
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    weights = list(
        {id(layer.weight): layer.weight for layer in layers if layer is not None}.values()
    )
    whole: Any = contextlib.nullcontext()
    if any(hasattr(w, "ds_id") for w in weights):  # ZeRO-3 partitions: gather, write, scatter
        import deepspeed

        whole = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with whole, torch.no_grad():
        for weight in weights:
            weight[old:] = weight[:old].mean(0, keepdim=True)


def _finish(
    model: PreTrainedModel, tok: SpecialIds, spec: ModelSource, device: torch.device | str
) -> PreTrainedModel:
    embeddings: Any = model.get_input_embeddings()
    if embeddings.num_embeddings < tok.vocab_size:
        grow_vocabulary(model, tok.vocab_size)
    model.config.pad_token_id = tok.pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_id
        model.generation_config.eos_token_id = tok.eos_id
    disable_dropout(model)
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        # (a ZeRO-3 model is partitioned already, on DeepSpeed's device and dtype)
        model.to(device=device, dtype=_DTYPES[spec.dtype])  # type: ignore[call-arg]  # in place
    return model


def build_causal_lm(
    spec: ModelSource, tok: SpecialIds, device: torch.device | str = "cpu", weights: bool = True
) -> PreTrainedModel:
    """The policy architecture with weights from ``spec.path`` or a seeded random preset.

    ``weights=False`` (a worker whose weights come by sync): a model at ``spec.path`` is built
    from its ``config.json`` alone, straight on ``device`` and in its dtype, with its
    parameters left uninitialised (``no_init_weights``; buffers such as rotary frequencies are
    computed as usual): no checkpoint is read. The caller must not use it before a sync."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.utils import logging as hf_logging

    if is_adapter_dir(spec.path):  # the model the adapter directory describes
        from rlhf_ray.models.lora import adapter_base, merged_start

        if not weights:  # the base's architecture is the merged model's
            base = cast(Any, spec).model_copy(update={"path": adapter_base(spec)})
            return build_causal_lm(base, tok, device, weights=False)
        return merged_start(spec, lambda base: build_causal_lm(base, tok, device))
    if spec.path is not None and not weights:
        config = AutoConfig.from_pretrained(spec.path)
        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[spec.dtype])
        model.tie_weights()  # (skipped with the init: a sync sends a tied weight once)
    elif spec.path is not None:
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per model is noise
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=_DTYPES[spec.dtype])
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(preset_config(spec, tok))
    return _finish(model, tok, spec, device)


def build_policy_lm(
    spec: ModelSource, lora: Any, tok: SpecialIds, device: torch.device | str = "cpu"
) -> nn.Module:
    """The policy as its learner trains it and its rollout workers sample it: a LoRA model
    (``models.lora.build_lora_model``) when ``lora`` is set or ``spec.path`` is an adapter
    directory trained further (``config.trains_lora``), else ``build_causal_lm``. A LoRA
    model's base is always read from its source: syncs send only the adapters."""
    if not trains_lora(lora, cast(Any, spec)):
        return build_causal_lm(spec, tok, device)
    from rlhf_ray.models.lora import build_lora_model

    return build_lora_model(spec, lora, lambda s: build_causal_lm(s, tok, device))


class ScalarHeadModel(nn.Module):
    """An LM backbone plus a scalar head (value model or reward model).

    Wraps a one-label ``AutoModelForSequenceClassification`` so that it saves and loads in the
    standard format; ``forward`` returns the head at every position, ``(B, T)``. With LoRA,
    ``seq_cls`` is peft's wrapper of it (adapters injected in place, the head a
    ``modules_to_save`` copy): ``hf_model`` is the model inside either way.
    """

    def __init__(self, seq_cls: nn.Module):
        super().__init__()
        self.seq_cls = seq_cls  # the only registered submodule: state_dict keys "seq_cls.*"
        if not isinstance(
            getattr(self.hf_model, "score", getattr(self.hf_model, "classifier", None)), nn.Module
        ):
            raise ValueError(f"{type(self.hf_model).__name__} has no `score`/`classifier` head")

    @property
    def hf_model(self) -> PreTrainedModel:
        """The sequence-classification model (the one inside peft's wrapper with LoRA)."""
        inner: Any = self.seq_cls
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    @property
    def backbone(self) -> nn.Module:
        return self.hf_model.base_model

    @property
    def head(self) -> nn.Module:
        hf: Any = self.hf_model
        return cast(nn.Module, getattr(hf, "score", None) or hf.classifier)

    @property
    def config(self) -> PretrainedConfig:
        return self.hf_model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def sequence_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The head at the last real token of each row: ``(B,)``."""
        values = self(input_ids, attention_mask)
        rows = torch.arange(values.shape[0], device=values.device)
        return values[rows, last_token_index(attention_mask)]

    def save_pretrained(self, directory: str, state_dict: dict | None = None) -> None:
        """Save as a one-label sequence-classification checkpoint."""
        if state_dict is not None:
            state_dict = {k.removeprefix("seq_cls."): v for k, v in state_dict.items()}
        cast(Any, self.seq_cls).save_pretrained(directory, state_dict=state_dict)


def build_scalar_model(
    spec: ModelSource, tok: SpecialIds, device: torch.device | str = "cpu", lora: Any = None
) -> ScalarHeadModel:
    """A value/reward model from ``spec.path`` (a sequence-classification or causal-LM
    checkpoint: the head is new in the latter case) or a seeded random preset. With ``lora``
    (or ``spec.path`` an adapter directory trained further, ``config.trains_lora``): LoRA
    adapters on it, the head trained whole (``models.lora``)."""
    if not trains_lora(lora, cast(Any, spec)):
        return ScalarHeadModel(seq_cls_model(spec, tok, device)).eval()
    from rlhf_ray.models.lora import build_lora_model

    peft = build_lora_model(spec, lora, lambda s: seq_cls_model(s, tok, device), "scalar")
    return ScalarHeadModel(peft).eval()


def seq_cls_model(
    spec: ModelSource, tok: SpecialIds, device: torch.device | str = "cpu"
) -> PreTrainedModel:
    """The one-label sequence-classification model of ``build_scalar_model`` (an adapter
    directory: merged into its base)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if is_adapter_dir(spec.path):
        from rlhf_ray.models.lora import merged_start

        return cast(Any, merged_start(spec, lambda base: seq_cls_model(base, tok, device)))
    if spec.path is not None:
        hf_logging.disable_progress_bar()
        config = AutoConfig.from_pretrained(spec.path)
        config.num_labels = 1
        config.pad_token_id = tok.pad_id
        with torch.random.fork_rng(devices=[]):  # a new head: the same on every rank and run
            torch.manual_seed(spec.init_seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.path, config=config, dtype=_DTYPES[spec.dtype]
            )
    else:
        config = preset_config(spec, tok)
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForSequenceClassification.from_config(config)
    return _finish(model, tok, spec, device)
