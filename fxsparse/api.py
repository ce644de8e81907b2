"""The one-call entry points: `prepare` (capture, locate, splice) and `sparsify` (prepare, calibrate, set alpha).

Inputs are read as fxsparse/inputs.py says: `example_inputs` is the tuple of the model's positional
arguments (as torch.export takes them) or a dict of keyword tensors; calibration data is an iterable of
batches or a `forward_loop` function that calls the model itself.

`submodule="backbone"` sparsifies one part of a model that no graph holds whole (a detector's data-dependent
heads): the whole model runs once on the example inputs (or the first call of `forward_loop`) with a pre-hook
on the part that records its inputs; the part alone is captured and spliced, and a copy of the whole model
comes back with the part replaced by the sparsified GraphModule.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import fx, nn

from fxsparse.util import first_line
from fxsparse._meta import PREPARE_META, SITE_META
from fxsparse.calibrate import calibrate
from fxsparse.capture import capture as capture_model
from fxsparse.capture import copy_model
from fxsparse.passes.layout import analyze as analyze_layout
from fxsparse.operators import set_alpha
from fxsparse.errors import (CalibrationError, CaptureError, FxsparseTypeError, FxsparseValueError,
                             NoActivationWarning)
from fxsparse.inputs import Call, as_call, call_record, default_example_inputs, forward_parameters, read_batch
from fxsparse.ops import meansparse_ops
from fxsparse.passes.locate import Selection, as_selection
from fxsparse.passes.placement import place
from fxsparse.passes.placement import resolve as resolve_placement
from fxsparse.passes.splice import splice


def prepare_record(select: Any, call: Call, capture: Optional[str], model: Optional[nn.Module] = None
                   ) -> Dict[str, Any]:
    """What `prepare` was asked, as JSON-able data, so that `load` can ask it again."""
    sel = as_selection(select)
    return {
        "select": {"kinds": None if sel.kinds is None else list(sel.kinds),
                   "include": list(sel.include), "exclude": list(sel.exclude)},
        **call_record(as_call(call), model),
        "capture": capture,
    }


def prepare(
    model: nn.Module,
    example_inputs: Union[None, torch.Tensor, Sequence[Any], Mapping[str, Any]] = None,
    select: Union[None, Selection, Mapping[str, Any], str, Sequence[str]] = None,
    *,
    capture: str = "auto",
    placement: Union[None, str, Sequence[str]] = None,
    submodule: Optional[str] = None,
    channel_dims: Optional[Mapping[str, int]] = None,
) -> nn.Module:
    """Capture `model` and splice an uncalibrated MeanSparse (alpha = 0) in front of every selected activation.

    Args:
        example_inputs: the model's positional arguments as a tuple (`(a, b)` for two images, `([img],)` for a
            detector taking a list of images), a tensor, or a dict of keyword tensors (default: a random batch
            of 2 at timm's configured input size, or 224 x 224 with the first conv's channels). Only shapes
            matter; nothing is trained.
        select: which sites: a list of kind names, or a Selection / dict with `kinds`, `include` and
            `exclude` (glob patterns over site names such as "layer4.*").
        capture: "auto" (FX, falling back to torch.export; see fxsparse.capture), "fx" or "export".
        placement: where operators go (passes/placement.py): "activations" (default), "residual",
            "residual_branch", "mlp_out", a preset ("convnext", "swin"), or a list of them.
        submodule: sparsify only this part (a module path such as "backbone"); `example_inputs` are then the
            whole model's inputs, and a copy of the whole model is returned with the part replaced.

        channel_dims: {site name or module-path glob: channel axis}, for sites whose axis the layout analysis
            cannot prove (fxsparse warns with a LayoutWarning naming them); it wins over the analysis.

    Returns a GraphModule, or with `submodule` a copy of `model` holding one.
    """
    _check_module(model)
    if submodule is not None:
        call = as_call(example_inputs) if example_inputs is not None else as_call(default_example_inputs(model))
        return _prepare_part(model, submodule, lambda m: m(*call.args, **call.kwargs), select, capture, placement,
                             channel_dims)
    call = as_call(example_inputs) if example_inputs is not None else as_call(default_example_inputs(model))
    return _prepare_graph(model, call, select, capture, placement, channel_dims, stacklevel=3)


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise FxsparseTypeError(f"fxsparse works on torch.nn.Module objects, got {type(model).__name__}: build the "
                                "model first (e.g. timm.create_model(name)) and pass it")


def _prepare_graph(model: nn.Module, call: Call, select, capture: str, placement, channel_dims=None,
                   stacklevel: int = 3
                   ) -> fx.GraphModule:
    gm = capture_model(model, call, capture)  # graph + shapes, checked by running it on fake inputs
    analyze_layout(gm)  # every tensor's channel axis (passes/layout.py), before placement reads it
    sites = place(gm, select, placement)
    gm = splice(gm, sites, channel_dims)
    gm.meta[PREPARE_META] = prepare_record(select, call, capture, model)  # what fxsparse.load needs to redo this
    if channel_dims:
        gm.meta[PREPARE_META]["channel_dims"] = {str(k): int(v) for k, v in channel_dims.items()}
    if placement is not None:
        gm.meta[PREPARE_META]["placement"] = list(resolve_placement(placement))
    if not sites:
        where = "activation" if placement is None else f"site for placement {list(resolve_placement(placement))}"
        warnings.warn(NoActivationWarning(
            f"{type(model).__name__} has no {where} that the selection takes, so fxsparse returns the captured "
            "model unchanged (no MeanSparse operators); check `select`, or add the model's activation with "
            "fxsparse.register_activation"), stacklevel=stacklevel)
    return gm


# -- a part of a model ---------------------------------------------------------------------------------------
class _Recorded(Exception):
    """Raised from the part's pre-hook: its inputs are recorded, the rest of the model need not run."""


def _submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        part = model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise FxsparseValueError(f"{type(model).__name__} has no submodule {path!r}; its children are {names[:12]} "
                            "(a dotted path like 'backbone.body' reaches deeper)") from None
    if part is model:
        raise FxsparseValueError("submodule='' is the whole model: leave submodule out")
    return part


def record_calls(model: nn.Module, part: nn.Module, run: Callable[[nn.Module], Any]):
    """(the part's first call, the whole model's first call) when `run(model)` runs: the model stops at the
    part's first call. Runs under no_grad; `model` should be the caller's own copy."""
    seen: Dict[str, Call] = {}

    def on_model(module, args, kwargs):
        seen.setdefault("model", Call(tuple(args), dict(kwargs)))

    def on_part(module, args, kwargs):
        seen["part"] = Call(tuple(args), dict(kwargs))
        raise _Recorded()

    handles = [part.register_forward_pre_hook(on_part, with_kwargs=True)]
    if part is not model:
        handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
    try:
        with torch.no_grad():
            run(model)
    except _Recorded:
        pass
    except Exception as exc:
        raise CaptureError(f"running {type(model).__name__} on the example inputs to record what "
                           f"{'it' if part is model else 'its part'} receives failed: "
                           f"{first_line(exc, 400)}") from exc
    finally:
        for h in handles:
            h.remove()
    if "part" not in seen:
        raise CaptureError(f"the model ran on the example inputs but never called the part to sparsify "
                           f"({type(part).__name__}); check submodule=")
    return seen["part"], seen.get("model", seen["part"])


def _prepare_part(model: nn.Module, path: str, run: Callable[[nn.Module], Any], select, capture, placement,
                  channel_dims=None) -> nn.Module:
    whole = copy_model(model)
    part = _submodule(whole, path)
    part_call, model_call = record_calls(whole, part, run)
    return splice_part(whole, path, part_call, call_record(model_call, model), select, capture, placement,
                       channel_dims)


def splice_part(whole: nn.Module, path: str, part_call: Call, model_inputs: Mapping[str, Any], select, capture,
                placement, channel_dims=None) -> nn.Module:
    """Prepare the part of `whole` (the caller's copy) at `path` on `part_call` and put the GraphModule in its
    place; site names get the part's path as prefix ("backbone.body.layer1.0.relu")."""
    part = _submodule(whole, path)
    gm = _prepare_graph(part, part_call, select, capture, placement, channel_dims, stacklevel=4)
    for op in meansparse_ops(gm).values():
        op.site, op.module_path = f"{path}.{op.site}", f"{path}.{op.module_path}"
    for node in gm.graph.nodes:
        if SITE_META in node.meta:
            node.meta[SITE_META] = f"{path}.{node.meta[SITE_META]}"
    gm.meta[PREPARE_META].update(submodule=path, model_inputs=dict(model_inputs))
    for key, value in vars(part).items():  # plain attributes the parent may read (backbone.out_channels)
        if (not key.startswith("_") and key not in vars(gm) and key != "training"
                and isinstance(value, (bool, int, float, str, tuple, list, dict, type(None)))):
            setattr(gm, key, copy.deepcopy(value))
    parent_path, _, name = path.rpartition(".")
    setattr(whole.get_submodule(parent_path) if parent_path else whole, name, gm)
    return whole


# -- sparsify ---------------------------------------------------------------------------------------------
class _OnePass:
    """The data with its first batch already taken: the first iteration resumes the same iterator (the
    first batch put back), later ones (calibration's second pass) start afresh."""

    def __init__(self, data: Iterable, first: Any, rest):
        self.data, self.pending = data, itertools.chain([first], rest)

    def __iter__(self):
        pending, self.pending = self.pending, None
        return pending if pending is not None else iter(self.data)

    def __len__(self):
        return len(self.data)


def _first_batch(data: Iterable):
    """(the first batch, the data to calibrate on): `data` is iterated once for both."""
    if isinstance(data, torch.Tensor):  # iterating it would give single examples, without the batch dimension
        raise FxsparseTypeError(f"calibration data is one tensor of shape {tuple(data.shape)}: wrap it in a list "
                                "([x], one batch) or give a DataLoader; an iterable of batches is expected")
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError("calibration data is empty: give at least one batch") from None
    if iterator is data:  # a one-shot iterator: put the batch back, no second pass
        return first, itertools.chain([first], iterator)
    return first, _OnePass(data, first, iterator)


TARGET_NAMES = ("labels", "label", "targets", "target")


def _call_of_batch(model: nn.Module, batch: Any) -> Call:
    """Example inputs read off a batch: the keys of a dict batch that name forward parameters, as keywords,
    except targets ('labels', 'target': Hugging Face models take them to compute a loss, which calibration
    does not need and the graph would then always require; give example_inputs to capture with them)."""
    if isinstance(batch, Mapping):
        params = [p for p in forward_parameters(model) or [] if p not in TARGET_NAMES]
        taken = {k: v for k, v in batch.items() if k in params and isinstance(v, torch.Tensor)}
        if taken:
            return Call((), taken)
    required = _required_parameters(model)
    if isinstance(batch, (tuple, list)) and len(required) > 1:
        raise CalibrationError(
            f"{type(model).__name__} takes {len(required)} inputs ({', '.join(required)}), but a "
            f"{type(batch).__name__} batch is read as (input, target): give dict batches "
            f"{{{', '.join(repr(k) + ': ...' for k in required)}}}, or example_inputs=({', '.join(required)}) "
            "with forward_loop=fn, where fn(model) calls the model on your batches")
    return read_batch(batch)


def _required_parameters(model: nn.Module):
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is inspect.Parameter.empty]


def sparsify(
    model: nn.Module,
    data: Optional[Iterable],
    alpha: Union[float, Mapping[str, float]] = 0.2,
    *,
    select=None,
    example_inputs=None,
    forward_loop: Optional[Callable[[nn.Module], Any]] = None,
    submodule: Optional[str] = None,
    capture: str = "auto",
    placement: Union[None, str, Sequence[str]] = None,
    channel_dims: Optional[Mapping[str, int]] = None,
    max_batches: Optional[int] = None,
    progress: Optional[bool] = None,
    checkpoint=None,
    checkpoint_every: int = 100,
) -> nn.Module:
    """One call: capture, locate, splice, calibrate, set `alpha`. The user's model is untouched.

    Calibration data is `data` (batches: tensors, (input, target) pairs, dicts keyed by the model's input
    names), or `forward_loop=fn` with `data=None`, where `fn(model)` calls the model on the user's own batches.
    Example inputs default to the first batch (or the first call of `forward_loop`); `data` is iterated
    once for them and the first calibration pass together. `submodule` sparsifies that part only (see
    `prepare`) and returns a copy of the whole model. `checkpoint` / `checkpoint_every` make the calibration
    resumable (see `fxsparse.calibrate`).
    """
    _check_module(model)
    if (data is None) == (forward_loop is None):
        raise CalibrationError("give calibration data or forward_loop=fn (fn(model) runs the model on your "
                               "batches), not " + ("both" if data is not None else "neither"))
    if forward_loop is not None and not callable(forward_loop):
        raise FxsparseTypeError(f"forward_loop must be a function fn(model), got {type(forward_loop).__name__}")
    call = as_call(example_inputs) if example_inputs is not None else None
    if call is None and data is not None:
        first, data = _first_batch(data)
        call = _call_of_batch(model, first)
    if submodule is not None:
        run = (lambda m: m(*call.args, **call.kwargs)) if call is not None else forward_loop
        gm = _prepare_part(model, submodule, run, select, capture, placement, channel_dims)
    else:
        if call is None:  # the first call of the user's loop, on a copy
            copied = copy_model(model)
            call, _ = record_calls(copied, copied, forward_loop)
        gm = _prepare_graph(model, call, select, capture, placement, channel_dims, stacklevel=3)
    if not meansparse_ops(gm):  # prepare has warned: nothing to calibrate
        return gm
    calibrate(gm, data, forward_loop=forward_loop, max_batches=max_batches, progress=progress,
              checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    set_alpha(gm, alpha)
    return gm
