"""Full weights as numpy arrays for the object store.

Shipping numpy arrays through ``ray.put`` is ~4x faster than torch tensors (measured on a ~100M GPT-2);
bfloat16, which numpy lacks, travels as an int16 view and is viewed back on arrival.
"""

from __future__ import annotations

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


def state_dict_from_numpy(weights: NumpyWeights) -> dict[str, torch.Tensor]:
    out = {}
    for name, (array, dtype) in weights.items():
        t = torch.from_numpy(np.array(array, copy=True))
        out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out
