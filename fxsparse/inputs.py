"""Example inputs for shape propagation when the user gives none."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from fxsparse.errors import FxsparseTypeError, FxsparseValueError


def _state_tensor(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return None


def default_input_shape(model: nn.Module) -> Tuple[int, ...]:
    """(C, H, W) from timm's pretrained_cfg, else from the first conv or linear layer (224 x 224 images)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, 224, 224)
        if isinstance(m, nn.Conv1d):
            return (m.in_channels, 128)
        if isinstance(m, nn.Conv3d):
            return (m.in_channels, 16, 112, 112)
        if isinstance(m, nn.Linear):
            return (m.in_features,)
    raise FxsparseValueError(f"cannot guess an input shape for {type(model).__name__}; pass example_inputs")


def default_example_inputs(model: nn.Module, batch: int = 2) -> Tuple[torch.Tensor, ...]:
    ref = _state_tensor(model)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    return (torch.randn(batch, *default_input_shape(model), device=device, dtype=dtype),)


def as_inputs(example_inputs) -> Tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if (isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str)
            and all(isinstance(t, torch.Tensor) for t in example_inputs)):
        return tuple(example_inputs)
    raise FxsparseTypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
                        " (pass a batch like the ones the model takes)")
