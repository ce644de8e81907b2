"""Logits from whatever a classifier returns: a tensor, a tuple or list (first element), a dict or Hugging
Face `ModelOutput` (its `logits`), or what a user's `logits=` function picks out of the output.

Attacks and accuracy need class scores; a model that returns anything else is wrapped once in `Logits`, a
module, so that the reference attacks (which call `model(x)`), `straight_through` and `.eval()` work on it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from fxsparse.errors import FxsparseTypeError

LogitsFn = Optional[Callable[[Any], torch.Tensor]]


def logits_of(output: Any, logits: LogitsFn = None) -> torch.Tensor:
    """The (batch, classes) scores in a model's output; `logits(output)` when given."""
    found = logits(output) if logits is not None else _default(output)
    if not isinstance(found, torch.Tensor) or found.dim() != 2:
        what = type(found).__name__ if not isinstance(found, torch.Tensor) else f"a tensor of shape {tuple(found.shape)}"
        raise FxsparseTypeError(
            f"cannot read class scores from the model's output ({type(output).__name__}): got {what}, expected a "
            "(batch, classes) tensor; pass logits=, a function of the output that returns the scores "
            "(e.g. logits=lambda out: out['scores'])")
    return found


def _default(output: Any):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:  # dicts, Hugging Face ModelOutput
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


class Logits(nn.Module):
    """`logits_of(model(x))`: a classifier module whose output is its scores."""

    def __init__(self, model: nn.Module, logits: LogitsFn = None):
        super().__init__()
        if logits is not None and not callable(logits):
            raise FxsparseTypeError(f"logits must be a function of the model's output, got {type(logits).__name__}")
        self.model = model
        self.logits = logits

    def forward(self, x):
        return logits_of(self.model(x), self.logits)


def as_classifier(model: nn.Module, logits: LogitsFn = None) -> nn.Module:
    """`model` wrapped in `Logits` (once: a `Logits` without a new `logits=` is returned as is)."""
    if isinstance(model, Logits) and logits is None:
        return model
    return Logits(model, logits)
