"""fxsparse: MeanSparse for any vision model, as a torch.fx pass.

The pipeline, one module a stage (read them in this order):

    capture   fxsparse/capture.py      nn.Module -> eval-mode GraphModule, every activation visible
    locate    passes/locate.py         activation calls of every kind (passes/kinds.py), selected
    shapes    passes/shapes.py         tensor shapes by fake-tensor propagation
    splice    passes/splice.py         a MeanSparse (fxsparse/ops.py) before each site, channel axis from
                                       passes/channel_axis.py
    calibrate fxsparse/calibrate.py    exact per-channel mean/std of each site's input over data
    controls  fxsparse/controls.py     set_alpha, straight_through
    audit     fxsparse/audit.py        one record per site: Markdown, JSON, networkx
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import fx, nn

from fxsparse.errors import CalibrationError, CaptureError, FxsparseError, SelectionError
from fxsparse.ops import MeanSparse, meansparse_ops
from fxsparse.passes.kinds import ActivationKind, activation_kinds, register_activation
from fxsparse.passes.locate import Selection, Site, locate
from fxsparse.passes.shapes import propagate_shapes
from fxsparse.passes.splice import splice
from fxsparse.capture import capture
from fxsparse.calibrate import batch_inputs, calibrate
from fxsparse.controls import set_alpha, straight_through
from fxsparse.audit import Audit, SiteRecord, audit
from fxsparse.inputs import as_inputs, default_example_inputs

__version__ = "0.1.0"

__all__ = [
    "sparsify", "prepare", "calibrate", "set_alpha", "audit", "straight_through", "register_activation",
    "MeanSparse", "FxsparseError", "CaptureError", "CalibrationError", "SelectionError", "Selection",
    "Audit", "SiteRecord", "ActivationKind", "activation_kinds", "capture", "locate", "splice",
]


def prepare(
    model: nn.Module,
    example_inputs: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
    select: Union[None, Selection, Mapping[str, Any], str, Sequence[str]] = None,
) -> fx.GraphModule:
    """Capture `model` and splice an uncalibrated MeanSparse (alpha = 0) in front of every selected activation.

    Args:
        example_inputs: inputs for shape propagation (default: a random batch of 2 at timm's configured input
            size, or 224 x 224 with the first conv's channels). Only shapes matter; nothing is trained.
        select: which sites: a list of kind names, or a Selection / dict with `kinds`, `include` and
            `exclude` (glob patterns over site names such as "layer4.*").
    """
    if not isinstance(model, nn.Module):
        raise FxsparseError(f"fxsparse works on torch.nn.Module objects, got {type(model).__name__}")
    gm = capture(model)
    sites = locate(gm, select)
    inputs = as_inputs(example_inputs) if example_inputs is not None else default_example_inputs(model)
    propagate_shapes(gm, inputs)
    return splice(gm, sites)


def _first_inputs(data: Iterable):
    """Example inputs from the first batch, and the data to calibrate on (the batch put back if consumed)."""
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError("calibration data is empty: give at least one batch") from None
    if iterator is data:  # a one-shot iterator: put the batch back
        data = itertools.chain([first], iterator)
    return batch_inputs(first), data


def sparsify(
    model: nn.Module,
    data: Iterable,
    alpha: Union[float, Mapping[str, float]] = 0.2,
    *,
    select=None,
    example_inputs=None,
    max_batches: Optional[int] = None,
    progress: Optional[bool] = None,
) -> fx.GraphModule:
    """One call: capture, locate, splice, calibrate on `data`, set `alpha`. The user's model is untouched."""
    if example_inputs is None:
        example_inputs, data = _first_inputs(data)
    gm = prepare(model, example_inputs, select)
    calibrate(gm, data, max_batches=max_batches, progress=progress)
    set_alpha(gm, alpha)
    return gm
