"""LoRA (peft) on the policy, critic, SFT and reward models, and PEFT adapter directories as a
starting point. A value or reward model is a ``ScalarHeadModel`` around peft's wrapper
(``peft_inside``); its ``score`` head is a ``modules_to_save`` module, trained whole.

- ``attach_lora`` wraps a built model with fresh adapters (``config.LoraSpec``): only the
  adapters and ``modules_to_save`` keep ``requires_grad``, so an optimizer built over the
  trainable parameters (``engines.training.make_adamw``) holds state for them alone.
- An adapter directory (``adapter_config.json`` + weights) is read with peft's own loaders, and
  its keys are checked: every adapter tensor of the model must be in the file and every tensor
  of the file must land in the model. A key-prefix mismatch (an adapter saved from another
  wrapping of the model) is refused with the keys named, never loaded with ``strict=False``
  (which would silently keep the random or zero adapters).
- ``adapter_tensors`` is what a LoRA sync sends: the trainable tensors, by name.
- ``merged_weights`` is the merged model's every tensor under the plain model's names, for a
  vLLM worker that cannot serve the adapters itself and reloads merged weights instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlhf_ray.config.roles import ADAPTER_CONFIG, is_adapter_dir
from rlhf_ray.errors import UserError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# The attention and MLP projections by architecture (``config.model_type``); other
# architectures get peft's "all-linear" (every linear layer but the output head)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{
        kind: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")
    },
}
TASKS = {"causal": "CAUSAL_LM", "scalar": "SEQ_CLS"}


class AdapterMismatchError(UserError, ValueError):
    """An adapter directory's tensors do not match the model's adapters key for key."""


def default_targets(model_type: str) -> list[str] | str:
    """The modules that get adapters when ``lora.target_modules`` is null."""
    return DEFAULT_TARGETS.get(model_type, "all-linear")


def lora_config(lora: Any, model_type: str, kind: str = "causal") -> LoraConfig:
    """peft's ``LoraConfig`` of a ``config.LoraSpec`` for a model of ``model_type``; ``kind``
    "scalar" (value or reward model) trains the ``score`` head whole unless told otherwise."""
    from peft import LoraConfig

    to_save = lora.modules_to_save
    if to_save is None and kind == "scalar":
        to_save = ["score"]
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or default_targets(model_type),
        modules_to_save=to_save,
        task_type=TASKS[kind],
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights (in, out)
    )


def attach_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """``model`` with fresh adapters (B = 0: the same function as the base until trained); the
    base weights are frozen. Adapters are created from a fixed seed, so every rank and every
    worker builds the same ones."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, config)  # type: ignore[arg-type]


def adapter_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What changes in a LoRA model, by name: its trainable tensors (the adapters and
    ``modules_to_save``)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def merged_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every tensor of the merged model under the plain model's checkpoint names (tied ones
    under each name), ``model`` left as it is: a LoRA layer's base weight plus its
    ``get_delta_weight`` (peft's own merge, ``fan_in_fan_out`` included), a ``modules_to_save``
    copy in place of the module it replaces."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    name = model.active_adapter
    deltas = {
        f"{path}.base_layer.weight": module.get_delta_weight(name)
        for path, module in base.named_modules()
        if isinstance(module, LoraLayer) and name in module.lora_A
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        plain = key.replace(".base_layer.", ".").replace(f".modules_to_save.{name}.", ".")
        out[plain] = tensor + deltas[key] if key in deltas else tensor
    return out


def tied_modules_to_save(model: PeftModel) -> list[str]:
    """The ``modules_to_save`` entries of ``model`` whose original weight is tied to another
    tensor (e.g. ``lm_head`` on tied embeddings): a merged plain model cannot hold the trained
    copy apart from the tensor it is tied to."""
    state = model.get_base_model().state_dict()
    originals = {k: t.data_ptr() for k, t in state.items() if ".original_module." in k}
    others = {t.data_ptr() for k, t in state.items() if k not in originals and t.numel()}
    return sorted({k.split(".original_module.")[0] for k, p in originals.items() if p in others})


def read_adapter_config(path: str) -> dict[str, Any]:
    with open(os.path.join(os.path.expanduser(path), ADAPTER_CONFIG)) as f:
        return json.load(f)


def adapter_base(spec: Any) -> str:
    """The base model of the adapter directory ``spec.path``: ``spec.adapter_base`` or the
    adapter's ``base_model_name_or_path``."""
    base = spec.adapter_base or read_adapter_config(spec.path).get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{spec.path} is a PEFT adapter whose adapter_config.json names no "
            "base_model_name_or_path: set model.adapter_base to the base model directory"
        )
    return base


def load_adapter(model: PeftModel, adapter_dir: str) -> None:
    """Load the adapter weights of ``adapter_dir`` into ``model`` (made with that directory's
    config), checked key for key (see the module docstring)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    weights = load_peft_weights(os.path.expanduser(adapter_dir), device="cpu")
    wanted = {n for n in model.state_dict() if ".lora_" in n or "modules_to_save" in n}
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(result.unexpected_keys)
    missing = sorted(wanted & set(result.missing_keys))
    if unexpected or missing:
        raise AdapterMismatchError(
            f"the adapter {adapter_dir} does not match the model's adapters: "
            f"{len(unexpected)} of its tensors have no place in the model (e.g. "
            f"{unexpected[:3]}), {len(missing)} of the model's adapter tensors are not in it "
            f"(e.g. {missing[:3]}). A key-prefix mismatch means the adapter was saved from "
            "another wrapping of the model; it is refused rather than loaded partially."
        )


def adapter_start(spec: Any, build_base: Callable[[Any], nn.Module]) -> PeftModel:
    """The adapter directory ``spec.path`` on its base, trainable: the base built by
    ``build_base(base_spec)``, the adapters loaded (checked) from the directory."""
    from peft import PeftConfig

    base = build_base(spec.model_copy(update={"path": adapter_base(spec)}))
    config = PeftConfig.from_pretrained(os.path.expanduser(spec.path))
    config.inference_mode = False
    model = attach_lora(base, config)  # type: ignore[arg-type]
    load_adapter(model, spec.path)
    return model


def merged_start(spec: Any, build_base: Callable[[Any], nn.Module]) -> nn.Module:
    """The adapter directory ``spec.path`` merged into its base: a plain model."""
    return adapter_start(spec, build_base).merge_and_unload()


def build_lora_model(
    spec: Any, lora: Any, build_base: Callable[[Any], nn.Module], kind: str = "causal"
) -> PeftModel:
    """A LoRA model to train or sample: the adapter directory ``spec.path`` trained further
    (``lora`` must then be null or agree with it), or ``build_base(spec)`` with fresh
    ``lora`` adapters."""
    if is_adapter_dir(spec.path) and not spec.merge_adapter:
        if lora is not None:
            check_same_shape(lora, read_adapter_config(spec.path), spec.path)
        return adapter_start(spec, build_base)
    model = build_base(spec)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return attach_lora(model, lora_config(lora, model_type, kind))


def check_same_shape(lora: Any, saved: dict[str, Any], path: str) -> None:
    """Training an adapter further keeps its shape: ``lora`` must agree with the saved one."""
    pairs = {"r": saved.get("r"), "alpha": saved.get("lora_alpha")}
    for field, value in pairs.items():
        if value is not None and float(getattr(lora, field)) != float(value):
            raise UserError(
                f"lora.{field} {getattr(lora, field)} differs from the adapter's {value} "
                f"({path}/{ADAPTER_CONFIG}): an adapter trained further keeps its shape; set "
                f"lora.{field}={value}, or lora=null, or model.merge_adapter=true to start a "
                "new adapter on the merged model"
            )


def peft_inside(module: nn.Module) -> tuple[PeftModel, str] | None:
    """The peft model of a LoRA learner's ``module`` and the prefix of its names in
    ``module``'s state dict: the module itself (a causal LM), or a ``ScalarHeadModel``'s
    ``seq_cls`` (a value or reward model); None without LoRA."""
    from peft import PeftModel

    for prefix, inner in (("", module), ("seq_cls.", getattr(module, "seq_cls", None))):
        if isinstance(inner, PeftModel):
            return inner, prefix
    return None


def is_lora(module: nn.Module) -> bool:
    return peft_inside(module) is not None


def export_base_path(spec: Any) -> str | None:
    """What an exported adapter names as its base: the base of an adapter trained further, the
    (merged) adapter directory a run started from, else the model path (None for a preset)."""
    if is_adapter_dir(spec.path) and not spec.merge_adapter:
        return adapter_base(spec)
    return spec.path


def export_lora(
    module: nn.Module, state: dict[str, torch.Tensor], directory: str, spec: Any, merged: bool
) -> None:
    """Write ``directory/adapter`` (a PEFT adapter directory: ``PeftModel.from_pretrained``
    loads it onto its base) and, when ``merged``, the merged model to ``directory`` (a plain
    ``AutoModelForCausalLM``, or ``...ForSequenceClassification`` with its trained head).
    ``state``: ``module``'s whole state dict (gathered on this rank, also under ZeRO-3). The
    merge runs on a CPU copy of the model built from its config and loaded from ``state``
    with every key matched, so the trained model is left as it is."""
    found = peft_inside(module)
    assert found is not None, "export_lora needs a LoRA model"
    model, prefix = found
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    config = model.peft_config["default"]
    config.base_model_name_or_path = export_base_path(spec)
    model.save_pretrained(os.path.join(directory, "adapter"), state_dict=state)
    if not merged:
        return
    base = model.get_base_model()
    with torch.random.fork_rng(devices=[]):
        skeleton = attach_lora(type(base)(base.config), config)
    skeleton.load_state_dict(state, strict=True)
    plain = skeleton.merge_and_unload()
    plain.save_pretrained(directory)
