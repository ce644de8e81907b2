"""Capture: turn any nn.Module into an inference `torch.fx.GraphModule` in which every activation is visible.

This module is the fallback policy; each path lives in its own module:

    tracer.py   FX symbolic tracing with `ActivationTracer` (activations and timm's no-trace modules as leaves)
    export.py   `torch.export` with dynamic sizes where the model allows them, within a time limit
    quiet.py    torch's prints, logs and warnings kept out of the terminal (FXSPARSE_DEBUG=1 lets them through)
    guard.py    the `InputGuard` every captured graph carries

"auto" takes FX when it captures the model with every activation visible, `torch.export` when FX fails or
leaves no-trace modules opaque, and FX with operators inside the opaque modules when export fails too. The
user's model is never modified: it is deep-copied and traced in eval mode (MeanSparse is an inference
defence, and calibration uses eval statistics). A failure raises one CaptureError with torch's error as its
`__cause__`; a call the graph cannot take is refused with our error, not torch's.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Dict, Optional

import torch
from torch import fx, nn

from fxsparse.util import first_line
from fxsparse._meta import CAPTURE_META, SHAPES_META
from fxsparse.errors import CaptureError
from fxsparse.inputs import Call, as_call
from fxsparse.passes.shapes import propagate_shapes
from fxsparse.capture.export import export_graph
from fxsparse.capture.guard import InputGuard, graph_inputs, guard
from fxsparse.capture.quiet import quiet
from fxsparse.capture.tracer import ActivationTracer, CaptureReport, capture_fx

__all__ = ["capture", "check_method", "copy_model", "shapes_step", "graph_inputs", "quiet", "ActivationTracer", "CaptureReport", "InputGuard",
           "CAPTURE_METHODS"]

CAPTURE_METHODS = ("auto", "fx", "export")


def _unbound_defaults(model: nn.Module, call: Call) -> Dict[str, Any]:
    """Forward parameters the example call leaves at their defaults (`mask=None`), bound as concrete values so
    that the graph is the program `model(*args, **kwargs)` runs, not one with a placeholder for every argument."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    given = set(call.kwargs)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given.update(p.name for p in positional[:len(call.args)])
    return {p.name: p.default for p in params if p.name not in given
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is not inspect.Parameter.empty}


def capture(
    model: nn.Module,
    example_inputs=None,
    capture: str = "auto",
    concrete_args: Optional[Dict[str, Any]] = None,
    *,
    check: Optional[Callable[[fx.GraphModule], None]] = None,
) -> fx.GraphModule:
    """An eval-mode GraphModule of a deep copy of `model`; `gm.meta[CAPTURE_META]` says how and why.

    example_inputs: a tensor, the tuple of positional arguments (as torch.export takes them), or a dict of
    keyword tensors (fxsparse/inputs.py).
    capture: "fx" (symbolic tracing), "export" (`torch.export`, needs example inputs), or "auto": FX when it
    captures the model with every activation visible; `torch.export` when FX fails or leaves no-trace modules
    opaque; FX with operators inside the opaque modules when export fails too.
    check: run on each candidate graph; one that raises counts as a failed capture, and the next path is
    tried. Default, with `example_inputs`: `shapes_step` (the graph runs on fake tensors, no compute, and
    every node's shape is recorded for the splice pass, passes/shapes.py); `prepare` names that step itself.

    What torch prints or logs on the way (a failed attempt's traceback, export's guards) is kept out of the
    terminal (FXSPARSE_DEBUG=1 lets it through); a failure raises one CaptureError whose __cause__ is torch's
    error.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    check_method(capture)
    call = as_call(example_inputs) if example_inputs is not None else None
    if check is None and call is not None:
        check = shapes_step(call)
    with quiet():
        return _capture(model, call, capture, concrete_args, check or (lambda gm: None))


def check_method(capture: str) -> str:
    """`capture` if it names a capture path, else the CaptureError saying which do."""
    if capture not in CAPTURE_METHODS:
        raise CaptureError(f"capture method must be one of {CAPTURE_METHODS}, got {capture!r}")
    return capture


def shapes_step(call: Call) -> Callable[[fx.GraphModule], None]:
    """The propagate-shapes step of `prepare`: every node's shape on fake inputs of `call`'s shapes
    (passes/shapes.py), and how they were found in `gm.meta[SHAPES_META]`; raises where the graph does not run."""
    def propagate(gm: fx.GraphModule) -> None:
        gm.meta[SHAPES_META] = propagate_shapes(gm, graph_inputs(gm, call))
    return propagate


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode (fxsparse never modifies the user's model), or our error saying why not."""
    try:
        return copy.deepcopy(model).eval()
    except Exception as exc:
        raise CaptureError(
            f"fxsparse works on a deep copy of {type(model).__name__} and cannot make one: {first_line(exc)}. "
            "A forward run with gradients can leave non-leaf tensors in module attributes (RAFT's correlation "
            "pyramid): run the model under torch.no_grad(), or rebuild it, before sparsifying") from exc


def _capture(original: nn.Module, call: Optional[Call], method: str, concrete_args, check) -> fx.GraphModule:
    model = copy_model(original)
    reasons: Dict[str, str] = {}
    errors: Dict[str, BaseException] = {}
    fx_gm = None
    if method in ("auto", "fx"):
        if concrete_args is None and call is not None:
            concrete_args = _unbound_defaults(model, call) or None
        try:
            fx_gm = capture_fx(model, concrete_args)
            check(fx_gm)
        except Exception as exc:
            reasons["fx"], errors["fx"] = first_line(exc), exc
            fx_gm = None
            if method == "fx":
                raise CaptureError(f"FX capture of {type(model).__name__} failed: {reasons['fx']}") from exc
        else:
            opaque = fx_gm.meta[CAPTURE_META].opaque_leaves
            if method == "fx" or not opaque or call is None:
                return _finish(fx_gm, reasons)
            reasons["fx"] = f"left {len(opaque)} no-trace module(s) opaque: {', '.join(sorted(opaque)[:3])}"
    if method in ("auto", "export") and call is not None:
        try:  # a fresh copy: tracing can leave proxies in module caches (timm's attention-bias caches)
            gm = export_graph(copy_model(original), call)
            check(gm)
            return _finish(gm, reasons)
        except Exception as exc:
            reasons["export"], errors["export"] = first_line(exc), exc
    elif method in ("auto", "export"):
        reasons["export"] = "no example inputs to export with"
    if fx_gm is not None:  # export failed where FX only left modules opaque: operators go inside them
        return _finish(fx_gm, reasons)
    if call is not None:
        _check_model_runs(original, call)
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    cause = errors.get("export", errors.get("fx"))
    raise CaptureError(
        f"no capture path could turn {type(model).__name__} into a graph ({detail}). If the model branches on "
        "its data (a detector: how many boxes survive), sparsify the part that can be captured, e.g. "
        "fxsparse.sparsify(model, data, submodule='backbone'), or compile the whole model with "
        "torch.compile(model, backend=fxsparse.backend(...)), which sparsifies every graph Dynamo captures. "
        "For FX, pass concrete_args for data-dependent arguments or register the failing submodule class with "
        "timm.layers.register_notrace_module; for torch.export, pass example_inputs the model accepts. "
        "Set FXSPARSE_DEBUG=1 to see torch's own messages.") from cause


def _check_model_runs(model: nn.Module, call: Call) -> None:
    """When every path failed: is it the inputs? Run a copy of the model on them and say so if it refuses."""
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(*call.args, **call.kwargs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in call.leaves()]
        raise CaptureError(
            f"{type(model).__name__} itself fails on example inputs of shapes {shapes}: {first_line(exc)}. "
            "Pass example_inputs the model accepts (for timm models, the size in model.pretrained_cfg).") from exc


def _finish(gm: fx.GraphModule, reasons: Dict[str, str]) -> fx.GraphModule:
    gm.eval()
    report = gm.meta[CAPTURE_META]
    report.reasons = {**dict(reasons), **report.reasons}  # the path's own notes ("dynamic_shapes") stay
    guard(gm)
    return gm
