"""Input normalisation inside the model, so that attacks and their budgets live on [0, 1] images.

Attacks clip to `bounds` and measure `eps` in input units: on images normalised outside the model (what timm
and torchvision pipelines produce) both are wrong, silently. The fix is to move the normalisation into the
model and feed it [0, 1] images:

    model = fxsparse.with_normalization(model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = fxsparse.with_normalization(model, *fxsparse.normalization_of(model))   # timm: pretrained_cfg
    model = fxsparse.with_normalization(model, *fxsparse.normalization_of(weights))  # torchvision weights
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import torch
from torch import nn

from fxsparse.errors import FxsparseTypeError, FxsparseValueError

Numbers = Union[float, Sequence[float], torch.Tensor]


def _as_vector(value: Numbers, what: str) -> torch.Tensor:
    if isinstance(value, str) or not isinstance(value, (int, float, Sequence, torch.Tensor)):
        raise FxsparseTypeError(f"{what} must be a number or a sequence of numbers (one per channel), got "
                                f"{type(value).__name__}")
    try:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FxsparseTypeError(f"{what} must be a number or a sequence of numbers (one per channel), got "
                                f"{value!r}") from exc
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise FxsparseValueError(f"{what} must hold finite numbers, one per channel, got {value!r}")
    return t


class Normalized(nn.Module):
    """`model((x - mean) / std)` with mean and std per channel (dim 1); extra arguments pass through."""

    def __init__(self, model: nn.Module, mean: Numbers, std: Numbers):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise FxsparseTypeError(f"with_normalization wraps a torch.nn.Module, got {type(model).__name__}: "
                                    "pass the model itself")
        mean, std = _as_vector(mean, "mean"), _as_vector(std, "std")
        if (std <= 0).any():
            raise FxsparseValueError(f"std must be > 0 in every channel, got {std.tolist()}")
        if mean.numel() != std.numel() and 1 not in (mean.numel(), std.numel()):
            raise FxsparseValueError(f"mean has {mean.numel()} values and std {std.numel()}: give one per channel")
        self.model = model
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x, *args, **kwargs):
        channels = self.mean.numel() if self.mean.numel() > 1 else self.std.numel()
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and channels > 1 and x.shape[1] != channels:
            # a Proxy under FX tracing is no Tensor: the check runs on real (and export's fake) tensors
            raise FxsparseValueError(f"with_normalization has {channels} channels of mean / std but the input has "
                                     f"{x.shape[1]} (shape {tuple(x.shape)}): give images with {channels} channels "
                                     "(grayscale into an RGB model broadcasts silently otherwise)")
        return self.model((x - self.mean) / self.std, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def with_normalization(model: nn.Module, mean: Numbers, std: Numbers) -> Normalized:
    """A module that normalises [0, 1] images with `mean` / `std` (per channel) and then calls `model`.

    Put it around a model trained on normalised images before `sparsify`, `evaluate` or `search_alpha`, and
    give them [0, 1] images: the attacks' bounds and eps then mean what they say. The wrapped model is not
    copied (its parameters are shared)."""
    return Normalized(model, mean, std)


def normalization_of(source: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) a model expects, from: a timm model (its `pretrained_cfg`), a timm `pretrained_cfg` or
    `resolve_data_config` dict, torchvision weights (`ResNet50_Weights.DEFAULT`: their `transforms()`), or a
    transform with `mean` and `std` attributes (torchvision's `Normalize`, `ImageClassification`)."""
    found = _find(source)
    if found is None:
        raise FxsparseValueError(
            f"cannot find the normalisation of a {type(source).__name__}: give a timm model or its pretrained_cfg, "
            "torchvision weights, or a transform with mean and std; or pass mean and std to "
            "fxsparse.with_normalization yourself")
    mean, std = (tuple(float(v) for v in _as_vector(t, name).tolist()) for t, name in zip(found, ("mean", "std")))
    return mean, std


def _find(source: Any):
    if isinstance(source, dict):
        if "mean" in source and "std" in source:
            return source["mean"], source["std"]
        return None
    if isinstance(source, nn.Module) and not hasattr(source, "mean"):
        cfg = getattr(source, "pretrained_cfg", None) or getattr(source, "default_cfg", None)
        return _find(dict(cfg)) if cfg else None
    if hasattr(source, "mean") and hasattr(source, "std"):
        return source.mean, source.std
    transforms = getattr(source, "transforms", None)  # torchvision weights
    if callable(transforms):
        try:
            return _find(transforms())
        except TypeError:
            return None
    return None

