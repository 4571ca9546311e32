"""Full weights as numpy arrays for the object store.

Shipping numpy arrays through ``ray.put`` is ~4x faster than torch tensors (measured on a ~100M GPT-2);
bfloat16, which numpy lacks, travels as an int16 view and is viewed back on arrival.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

NumpyWeights = dict[str, tuple[np.ndarray, str]]


def state_dict_to_numpy(state: dict[str, torch.Tensor]) -> NumpyWeights:
    out: NumpyWeights = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            out[name] = (t.view(torch.int16).numpy(), "bfloat16")
        else:
            out[name] = (t.numpy(), str(t.dtype).removeprefix("torch."))
    return out


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A writable tensor of one shipped array (object-store arrays are read-only)."""
    t = torch.from_numpy(np.array(array, copy=True))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def state_dict_from_numpy(weights: NumpyWeights) -> dict[str, torch.Tensor]:
    return {name: _from_numpy(array, dtype) for name, (array, dtype) in weights.items()}


# ---------------------------------------------------------------------------------------------
# Buckets: the weights move a bounded slice at a time (``sync.bucket_mb``)


def weight_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a sync moves: every parameter (a tied one once) and every persistent buffer."""
    persistent = set(module.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    out.update(module.named_parameters())
    out.update((n, b) for n, b in module.named_buffers() if n in persistent)
    return out


def full_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the whole tensor, also when ZeRO-3 holds only a partition of it here."""
    return int(getattr(tensor, "ds_numel", tensor.numel())) * tensor.element_size()


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices of at most ``bucket_bytes`` each (a tensor larger
    than a bucket travels alone): ``plan_buckets([3, 3, 5, 1], 6) == [[0, 1], [2, 3]]``."""
    buckets: list[list[int]] = []
    used = bucket_bytes  # forces a new bucket for the first tensor
    for index, size in enumerate(sizes):
        if used + size > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(index)
        used += size
    return buckets


def load_targets(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s tensors a sync may write, by every name they have (tied ones too)."""
    targets: dict[str, torch.Tensor] = {}
    targets.update(module.named_parameters(remove_duplicate=False))
    targets.update(module.named_buffers(remove_duplicate=False))
    return targets


def check_known(names: Iterable[str], targets: dict[str, torch.Tensor]) -> None:
    """A ``KeyError`` naming the first few ``names`` that ``targets`` lacks."""
    missing = [name for name in names if name not in targets]
    if missing:
        raise KeyError(f"weights for unknown tensors: {missing[:5]}")


def load_weights(module: torch.nn.Module, weights: NumpyWeights) -> None:
    """Copy ``weights`` (a bucket or the whole model) into ``module``'s tensors by name, one
    tensor at a time (no second full copy). Unknown names raise."""
    targets = load_targets(module)
    check_known(weights, targets)
    with torch.no_grad():
        for name, (array, dtype) in weights.items():
            targets[name].copy_(_from_numpy(array, dtype))
