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
import dataclasses
import itertools
import warnings
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from fxsparse.util import first_line
from fxsparse._meta import PREPARE_META, SITE_META
from fxsparse.calibrate import calibrate, check_data_or_loop
from fxsparse.capture import check_method, copy_model, shapes_step
from fxsparse.capture import capture as capture_model
from fxsparse.passes.layout import analyze as analyze_layout
from fxsparse.operators import set_alpha
from fxsparse.errors import (CalibrationError, CaptureError, FxsparseTypeError, FxsparseValueError,
                             NoActivationWarning, SelectionError)
from fxsparse.inputs import Call, as_call, call_record, default_example_inputs, example_call
from fxsparse.ops import meansparse_ops
from fxsparse.passes.locate import Selection, as_selection
from fxsparse.passes.placement import DEFAULT as DEFAULT_PLACEMENT
from fxsparse.passes.placement import place
from fxsparse.passes.placement import resolve as resolve_placement
from fxsparse.passes.splice import splice


# -- the user's intent, as one object --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """What `prepare` is asked, validated once (as pt2e's quantizer config): which sites (`selection`), where
    the operators go (`placement`, resolved policy names), the channel axes the user decides (`channel_dims`,
    (site name or module-path glob, axis) pairs in order) and the capture path. `prepare`'s keywords build
    one; `gm.meta[PREPARE_META]` records it (with the example call) and `fxsparse.save` writes it, so that
    `fxsparse.load` can ask `prepare` the same again."""

    selection: Selection = Selection()
    placement: Tuple[str, ...] = DEFAULT_PLACEMENT
    channel_dims: Tuple[Tuple[str, int], ...] = ()
    capture: str = "auto"

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "selection", as_selection(self.selection))
        set_(self, "placement", resolve_placement(self.placement))
        dims = self.channel_dims.items() if isinstance(self.channel_dims, Mapping) else (self.channel_dims or ())
        for pair in dims:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], int) and not isinstance(pair[1], bool)):
                raise SelectionError(f"channel_dims must map site names or module-path globs to int axes "
                                     f"({{'layer1.*': 1}}), got the entry {pair!r}")
        set_(self, "channel_dims", tuple(dims))
        check_method(self.capture)

    @classmethod
    def of(cls, recipe: Optional["Recipe"] = None, **keywords) -> "Recipe":
        """The recipe `prepare` / `sparsify` work from: the one passed, or one built from the keywords given
        (None: left at its default), never both."""
        given = {k: v for k, v in keywords.items() if v is not None}
        if recipe is None:
            return cls(**{("selection" if k == "select" else k): v for k, v in given.items()})
        if not isinstance(recipe, Recipe):
            raise FxsparseTypeError(f"recipe must be a fxsparse.Recipe, got {type(recipe).__name__}")
        if given:
            raise FxsparseValueError(f"give recipe= or the keywords {sorted(given)}, not both: the recipe holds "
                                     "them (dataclasses.replace(recipe, ...) changes one)")
        return recipe

    def to_record(self) -> Dict[str, Any]:
        """The recipe as JSON-able data (what `save` writes)."""
        sel = self.selection
        return {"select": {"kinds": None if sel.kinds is None else list(sel.kinds),
                           "include": list(sel.include), "exclude": list(sel.exclude)},
                "placement": list(self.placement), "channel_dims": dict(self.channel_dims),
                "capture": self.capture}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Recipe":
        """The recipe `to_record` wrote (KeyError / TypeError where a field is missing or malformed)."""
        sel = record["select"]
        return cls(Selection(kinds=None if sel["kinds"] is None else tuple(sel["kinds"]),
                             include=tuple(sel["include"]), exclude=tuple(sel["exclude"])),
                   tuple(record["placement"]), tuple((str(k), v) for k, v in record["channel_dims"].items()),
                   record["capture"])


def prepare_record(recipe: Recipe, call: Call, model: nn.Module, submodule: Optional[str] = None,
                   model_inputs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What `gm.meta[PREPARE_META]` holds, written once: the recipe, the example call (shapes, nesting, input
    names) and, for a part, its path and the whole model's inputs."""
    record = {**recipe.to_record(), **call_record(call, model)}
    if submodule is not None:
        record.update(submodule=submodule, model_inputs=dict(model_inputs or {}))
    return record


def prepare(
    model: nn.Module,
    example_inputs: Union[None, torch.Tensor, Sequence[Any], Mapping[str, Any]] = None,
    select: Union[None, Selection, Mapping[str, Any], str, Sequence[str]] = None,
    *,
    capture: Optional[str] = None,
    placement: Union[None, str, Sequence[str]] = None,
    submodule: Optional[str] = None,
    channel_dims: Optional[Mapping[str, int]] = None,
    recipe: Optional[Recipe] = None,
) -> nn.Module:
    """Capture `model` and splice an uncalibrated MeanSparse (alpha = 0) in front of every selected activation.

    Args:
        example_inputs: the model's positional arguments as a tuple (`(a, b)` for two images, `([img],)` for a
            detector taking a list of images), a tensor, or a dict of keyword tensors (default: a random batch
            of 2 at timm's configured input size, or 224 x 224 with the first conv's channels). Only shapes
            matter; nothing is trained.
        select: which sites: a list of kind names, or a Selection / dict with `kinds`, `include` and
            `exclude` (glob patterns over site names such as "layer4.*").
        capture: "auto" (the default: FX, falling back to torch.export; see fxsparse.capture), "fx" or "export".
        placement: where operators go (passes/placement.py): "activations" (default), "residual",
            "residual_branch", "mlp_out", a preset ("convnext", "swin"), or a list of them.
        submodule: sparsify only this part (a module path such as "backbone"); `example_inputs` are then the
            whole model's inputs, and a copy of the whole model is returned with the part replaced.
        channel_dims: {site name or module-path glob: channel axis}, for sites whose axis the layout analysis
            cannot prove (fxsparse warns with a LayoutWarning naming them); it wins over the analysis.
        recipe: a fxsparse.Recipe holding select, placement, channel_dims and capture at once (instead of
            those keywords, not with them).

    Returns a GraphModule, or with `submodule` a copy of `model` holding one.
    """
    _check_module(model)
    recipe = Recipe.of(recipe, select=select, capture=capture, placement=placement, channel_dims=channel_dims)
    call = as_call(example_inputs) if example_inputs is not None else as_call(default_example_inputs(model))
    if submodule is not None:
        return _prepare_part(model, submodule, lambda m: m(*call.args, **call.kwargs), recipe)
    return _prepare_graph(model, call, recipe, stacklevel=3)


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise FxsparseTypeError(f"fxsparse works on torch.nn.Module objects, got {type(model).__name__}: build the "
                                "model first (e.g. timm.create_model(name)) and pass it")


def _prepare_graph(model: nn.Module, call: Call, recipe: Recipe, stacklevel: int = 3, submodule: Optional[str] = None,
                   model_inputs: Optional[Mapping[str, Any]] = None) -> fx.GraphModule:
    """The pass, step by step: capture -> propagate shapes -> layout -> place -> splice -> record."""
    shapes = shapes_step(call)  # every node's shape on fake inputs (passes/shapes.py); capture takes its next
    gm = capture_model(model, call, capture=recipe.capture, check=shapes)  # path when a graph's shapes fail
    analyze_layout(gm)  # every tensor's channel axis (passes/layout.py), before placement reads it
    sites = place(gm, recipe.selection, recipe.placement)
    gm = splice(gm, sites, dict(recipe.channel_dims))
    if not sites:
        where = ("activation" if recipe.placement == DEFAULT_PLACEMENT
                 else f"site for placement {list(recipe.placement)}")
        warnings.warn(NoActivationWarning(
            f"{type(model).__name__} has no {where} that the selection takes, so fxsparse returns the captured "
            "model unchanged (no MeanSparse operators); check `select`, or add the model's activation with "
            "fxsparse.register_activation"), stacklevel=stacklevel)
    gm.meta[PREPARE_META] = prepare_record(recipe, call, model, submodule, model_inputs)  # for fxsparse.load
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


def _prepare_part(model: nn.Module, path: str, run: Callable[[nn.Module], Any], recipe: Recipe) -> nn.Module:
    whole = copy_model(model)
    part = _submodule(whole, path)
    part_call, model_call = record_calls(whole, part, run)
    return splice_part(whole, path, part_call, call_record(model_call, model), recipe)


def splice_part(whole: nn.Module, path: str, part_call: Call, model_inputs: Mapping[str, Any], recipe: Recipe
                ) -> nn.Module:
    """Prepare the part of `whole` (the caller's copy) at `path` on `part_call` and put the GraphModule in its
    place; site names get the part's path as prefix ("backbone.body.layer1.0.relu")."""
    part = _submodule(whole, path)
    gm = _prepare_graph(part, part_call, recipe, stacklevel=4, submodule=path, model_inputs=model_inputs)
    for op in meansparse_ops(gm).values():
        op.site, op.module_path = f"{path}.{op.site}", f"{path}.{op.module_path}"
    for node in gm.graph.nodes:
        if SITE_META in node.meta:
            node.meta[SITE_META] = f"{path}.{node.meta[SITE_META]}"
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


def sparsify(
    model: nn.Module,
    data: Optional[Iterable],
    alpha: Union[float, Mapping[str, float]] = 0.2,
    *,
    select=None,
    example_inputs=None,
    forward_loop: Optional[Callable[[nn.Module], Any]] = None,
    submodule: Optional[str] = None,
    capture: Optional[str] = None,
    placement: Union[None, str, Sequence[str]] = None,
    channel_dims: Optional[Mapping[str, int]] = None,
    recipe: Optional[Recipe] = None,
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
    `prepare`) and returns a copy of the whole model; `select`, `capture`, `placement`, `channel_dims` or
    `recipe` say what to prepare, as in `prepare`. `checkpoint` / `checkpoint_every` make the calibration
    resumable (see `fxsparse.calibrate`).
    """
    _check_module(model)
    recipe = Recipe.of(recipe, select=select, capture=capture, placement=placement, channel_dims=channel_dims)
    check_data_or_loop(data, forward_loop)
    call = as_call(example_inputs) if example_inputs is not None else None
    if call is None and data is not None:
        first, data = _first_batch(data)
        call = example_call(model, first)
    if submodule is not None:
        run = (lambda m: m(*call.args, **call.kwargs)) if call is not None else forward_loop
        gm = _prepare_part(model, submodule, run, recipe)
    else:
        if call is None:  # the first call of the user's loop, on a copy
            copied = copy_model(model)
            call, _ = record_calls(copied, copied, forward_loop)
        gm = _prepare_graph(model, call, recipe, stacklevel=3)
    if not meansparse_ops(gm):  # prepare has warned: nothing to calibrate
        return gm
    calibrate(gm, data, forward_loop=forward_loop, max_batches=max_batches, progress=progress,
              checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    set_alpha(gm, alpha)
    return gm
