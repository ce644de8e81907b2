"""Checks that an attack's numbers mean what they say: data inside `bounds`, a budget that fits them.

Attacks clip to `bounds` and measure `eps` in input units. Normalised images (values below 0), 0-255 pixels,
or `eps=8` meant as 8/255 give accuracies that are wrong without any error; these checks refuse them and
name the fix. They cost a min and a max per batch.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from fxsparse.errors import FxsparseTypeError, FxsparseValueError, InputRangeError

NORMS = ("linf", "l2")
MAX_LINF_FRACTION = 64 / 255  # an L-inf eps above this fraction of the input range is refused


def check_bounds(bounds: Sequence[float]) -> Tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise FxsparseTypeError(f"bounds must be a (low, high) pair of numbers, got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise FxsparseValueError(f"bounds must be finite with low < high, got {bounds!r}; images in [0, 1] use "
                                 "bounds=(0, 1)")
    return lo, hi


def check_budget(eps: float, norm: str, bounds: Sequence[float]) -> None:
    """eps and norm before any data: a finite eps >= 0, a known norm, and an L-inf eps that is a perturbation,
    not a rescaling of the image."""
    if norm not in NORMS:
        raise FxsparseValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise FxsparseValueError(f"eps must be a finite number >= 0, got {eps!r}")
    lo, hi = check_bounds(bounds)
    width = hi - lo
    if norm == "linf" and eps > MAX_LINF_FRACTION * width:
        meant = f"{eps:g}/255 = {eps / 255 * width:.4g}" if eps >= 1 else "8/255 = 0.0314"
        raise InputRangeError(
            f"L-inf eps={eps:g} is {eps / width * 255:.0f}/255 of the input range [{lo:g}, {hi:g}]: the attack "
            f"could repaint the image. Did you mean {meant}? eps is in input units (images in [0, 1]); budgets "
            f"above 64/255 of the range are refused")


def check_l2_budget(eps: float, x: torch.Tensor, bounds: Sequence[float]) -> None:
    """An L2 eps no larger than the diameter of the input box (`width * sqrt(values per example)`): beyond it
    every input in the box is within reach, so eps is surely in the wrong units. (L2 3.0 on 224 x 224 RGB has
    a diameter of 388; 0.5 on CIFAR, 55.)"""
    lo, hi = check_bounds(bounds)
    diameter = (hi - lo) * math.sqrt(x[0].numel()) if len(x) else math.inf
    if eps > diameter:
        raise InputRangeError(
            f"L2 eps={eps:g} is larger than the diameter ({diameter:.3g}) of the input box [{lo:g}, {hi:g}]^"
            f"{x[0].numel()}: every input is within reach. Give eps in input units on [0, 1] images "
            "(common values: 0.5 on CIFAR-10, 3.0 on ImageNet)")


def check_batch(x: torch.Tensor, bounds: Sequence[float], index: int) -> None:
    """Every value of batch `index` inside `bounds` (up to float rounding), or an error naming the fix."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise FxsparseTypeError(f"evaluation batch {index} must be a floating-point tensor of images, got "
                                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}; convert "
                                "images with x.float() / 255")
    if not x.numel():
        return
    lo, hi = check_bounds(bounds)
    slack = 1e-5 * (hi - lo)
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if low >= lo - slack and high <= hi + slack:
        return
    if not (math.isfinite(low) and math.isfinite(high)):
        why = "holds NaN or Inf: clean the data"
    elif low < lo and high < 8 * (hi - lo) + hi and low > lo - 8 * (hi - lo):
        why = ("looks normalised (mean/std): give [0, 1] images and put the normalisation inside the model: "
               "fxsparse.with_normalization(model, mean, std) (fxsparse.normalization_of(model) reads them from "
               "a timm model or torchvision weights)")
    elif high > hi and high <= 255 * (hi - lo) + lo + slack:
        why = "looks like 0-255 pixels: divide the images by 255"
    else:
        why = "give images in the bounds, or the bounds of your images (bounds=(low, high))"
    raise InputRangeError(f"evaluation batch {index} holds values in [{low:.4g}, {high:.4g}], outside the attack "
                          f"bounds [{lo:g}, {hi:g}]: the attacks would clip the images and the accuracies would be "
                          f"wrong. The data {why}")
