"""fxsparse: MeanSparse for any vision model, as a torch.fx pass.

The pipeline, one module a stage (read them in this order):

    capture   fxsparse/capture.py      nn.Module -> eval-mode GraphModule, every activation visible (FX, or
                                       torch.export as fallback); shapes by fake-tensor propagation
                                       (passes/shapes.py)
    locate    passes/locate.py         activation calls of every kind (passes/kinds.py) and composite ones
                                       (passes/composites.py), selected
    splice    passes/splice.py         a MeanSparse (fxsparse/ops.py) before each site, channel axis from
                                       passes/channel_axis.py
    calibrate fxsparse/calibrate.py    exact per-channel mean/std of each site's input over data
    controls  fxsparse/controls.py     set_alpha, straight_through
    placement passes/placement.py      policies beyond "before every activation": residual joins, MLP
                                       outputs, presets for ConvNeXt and Swin
    evaluate  fxsparse/evaluation.py   clean / PGD / APGD / Square / AutoAttack, as is and with BPDA
    search    fxsparse/search.py       alpha chosen on a validation split
    audit     fxsparse/audit.py        one record per site: Markdown, JSON, networkx
    coverage  fxsparse/coverage.py     run-time oracle: every executed activation fed by a MeanSparse?
"""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import fx, nn

from fxsparse.errors import (CalibrationError, CaptureError, FxsparseError, NoActivationWarning, PersistenceError,
                             SelectionError)
from fxsparse.ops import MeanSparse, meansparse_ops
from fxsparse.passes.kinds import ActivationKind, activation_kinds, register_activation
from fxsparse.passes.locate import Selection, Site, locate
from fxsparse.passes.splice import splice
from fxsparse.passes.placement import PRESETS, place, residual_joins
from fxsparse.passes.placement import resolve as resolve_placement
from fxsparse.capture import capture
from fxsparse.capture import capture as capture_model
from fxsparse.calibrate import PREPARE_META, batch_inputs, calibrate
from fxsparse.controls import set_alpha, straight_through
from fxsparse.audit import Audit, SiteRecord, audit
from fxsparse.backend import MeanSparseBackend, backend, statistics
from fxsparse.inputs import as_inputs, default_example_inputs
from fxsparse.persist import load, prepare_record, save
from fxsparse.evaluation import Evaluation, evaluate
from fxsparse.search import SearchResult, search_alpha

__version__ = "0.1.0"

__all__ = [
    "sparsify", "prepare", "calibrate", "set_alpha", "audit", "straight_through", "register_activation",
    "MeanSparse", "FxsparseError", "CaptureError", "CalibrationError", "SelectionError", "Selection",
    "Audit", "SiteRecord", "ActivationKind", "activation_kinds", "capture", "locate", "splice",
    "backend", "MeanSparseBackend", "statistics", "save", "load", "PersistenceError", "NoActivationWarning",
    "evaluate", "Evaluation", "search_alpha", "SearchResult", "place", "PRESETS", "residual_joins",
]


def prepare(
    model: nn.Module,
    example_inputs: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
    select: Union[None, Selection, Mapping[str, Any], str, Sequence[str]] = None,
    *,
    capture: str = "auto",
    placement: Union[None, str, Sequence[str]] = None,
) -> fx.GraphModule:
    """Capture `model` and splice an uncalibrated MeanSparse (alpha = 0) in front of every selected activation.

    Args:
        example_inputs: inputs for shape propagation (default: a random batch of 2 at timm's configured input
            size, or 224 x 224 with the first conv's channels). Only shapes matter; nothing is trained.
        select: which sites: a list of kind names, or a Selection / dict with `kinds`, `include` and
            `exclude` (glob patterns over site names such as "layer4.*").
        capture: "auto" (FX, falling back to torch.export; see fxsparse.capture), "fx" or "export".
        placement: where operators go (passes/placement.py): "activations" (default), "residual",
            "residual_branch", "mlp_out", a preset ("convnext", "swin"), or a list of them.
    """
    if not isinstance(model, nn.Module):
        raise FxsparseError(f"fxsparse works on torch.nn.Module objects, got {type(model).__name__}")
    inputs = as_inputs(example_inputs) if example_inputs is not None else default_example_inputs(model)
    gm = capture_model(model, inputs, capture)  # graph + shapes, checked by running it on fake inputs
    sites = place(gm, select, placement)
    gm = splice(gm, sites)
    gm.meta[PREPARE_META] = prepare_record(select, inputs, capture)  # what fxsparse.load needs to redo this
    if placement is not None:
        gm.meta[PREPARE_META]["placement"] = list(resolve_placement(placement))
    if not sites:
        where = "activation" if placement is None else f"site for placement {list(resolve_placement(placement))}"
        warnings.warn(NoActivationWarning(
            f"{type(model).__name__} has no {where} that the selection takes, so fxsparse returns the captured "
            "model unchanged (no MeanSparse operators); check `select`, or add the model's activation with "
            "fxsparse.register_activation"), stacklevel=2)
    return gm


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
    capture: str = "auto",
    placement: Union[None, str, Sequence[str]] = None,
    max_batches: Optional[int] = None,
    progress: Optional[bool] = None,
) -> fx.GraphModule:
    """One call: capture, locate, splice, calibrate on `data`, set `alpha`. The user's model is untouched."""
    if example_inputs is None:
        example_inputs, data = _first_inputs(data)
    gm = prepare(model, example_inputs, select, capture=capture, placement=placement)
    if not meansparse_ops(gm):  # prepare has warned: nothing to calibrate
        return gm
    calibrate(gm, data, max_batches=max_batches, progress=progress)
    set_alpha(gm, alpha)
    return gm
