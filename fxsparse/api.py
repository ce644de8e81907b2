"""The one-call entry points: `prepare` (capture, locate, splice) and `sparsify` (prepare, calibrate, set alpha)."""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import fx, nn

from fxsparse._meta import PREPARE_META
from fxsparse.calibrate import batch_inputs, calibrate
from fxsparse.capture import capture as capture_model
from fxsparse.controls import set_alpha
from fxsparse.errors import CalibrationError, FxsparseError, NoActivationWarning
from fxsparse.inputs import as_inputs, default_example_inputs
from fxsparse.ops import meansparse_ops
from fxsparse.passes.locate import Selection, as_selection
from fxsparse.passes.placement import place
from fxsparse.passes.placement import resolve as resolve_placement
from fxsparse.passes.splice import splice

def prepare_record(select: Any, inputs: Sequence[torch.Tensor], capture: Optional[str]) -> Dict[str, Any]:
    """What `prepare` was asked, as JSON-able data, so that `load` can ask it again."""
    sel = as_selection(select)
    return {
        "select": {"kinds": None if sel.kinds is None else list(sel.kinds),
                   "include": list(sel.include), "exclude": list(sel.exclude)},
        "input_shapes": [list(t.shape) for t in inputs],
        "input_dtypes": [str(t.dtype) for t in inputs],
        "capture": capture,
    }


def prepare(
    model: nn.Module,
    example_inputs: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
    select: Union[None, Selection, Mapping[str, Any], str, Sequence[str]] = None,
    *,
    capture: str = "auto",
    placement: Union[None, str, Sequence[str]] = None,
    channel_dims: Optional[Mapping[str, int]] = None,
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
        channel_dims: {site name or module-path glob: channel axis}, for sites whose axis the layout analysis
            cannot prove (fxsparse warns with a LayoutWarning naming them); it wins over the analysis.
    """
    if not isinstance(model, nn.Module):
        raise FxsparseError(f"fxsparse works on torch.nn.Module objects, got {type(model).__name__}")
    inputs = as_inputs(example_inputs) if example_inputs is not None else default_example_inputs(model)
    gm = capture_model(model, inputs, capture)  # graph + shapes, checked by running it on fake inputs
    sites = place(gm, select, placement)
    gm = splice(gm, sites, channel_dims)
    gm.meta[PREPARE_META] = prepare_record(select, inputs, capture)  # what fxsparse.load needs to redo this
    if channel_dims:
        gm.meta[PREPARE_META]["channel_dims"] = {str(k): int(v) for k, v in channel_dims.items()}
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
    channel_dims: Optional[Mapping[str, int]] = None,
    max_batches: Optional[int] = None,
    progress: Optional[bool] = None,
) -> fx.GraphModule:
    """One call: capture, locate, splice, calibrate on `data`, set `alpha`. The user's model is untouched."""
    if example_inputs is None:
        example_inputs, data = _first_inputs(data)
    gm = prepare(model, example_inputs, select, capture=capture, placement=placement, channel_dims=channel_dims)
    if not meansparse_ops(gm):  # prepare has warned: nothing to calibrate
        return gm
    calibrate(gm, data, max_batches=max_batches, progress=progress)
    set_alpha(gm, alpha)
    return gm
