"""Capture: turn any nn.Module into an inference `torch.fx.GraphModule` in which every activation is visible.

`ActivationTracer` adds three ideas to `torch.fx.Tracer`:

1. Activation modules of every registered kind are leaves, so `nn.GELU`, timm's `GELU` and a user's own
   activation class each appear as one `call_module` node named by its module path.
2. timm's no-trace modules and functions are leaves, as in timm's own feature extraction, except that a
   no-trace module that *contains* an activation is traced through when that works; when it does not, the
   nodes recorded during the attempt are rolled back and the module stays a leaf (the splice pass then
   places the operator inside it, see `passes/splice.py`). The reason is kept in the capture report.
3. Every node records the module path it came from (`node.meta[PATH_META]`, fxsparse/_meta.py), the way torchvision's
   `NodePathTracer` qualifies node names, so sites can be named after the model's own attributes.

The user's model is never modified: it is deep-copied and traced in eval mode (MeanSparse is an inference
defence, and calibration uses eval statistics).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import operator
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import fx, nn

from fxsparse._meta import ACTIVATION_MODULE_META, CAPTURE_META, PATH_META, SHAPES_META
from fxsparse.errors import CaptureError
from fxsparse.passes.kinds import activation_module_classes, python_activation_functions
from fxsparse.passes.shapes import propagate_shapes



def _timm_notrace() -> Tuple[Tuple[type, ...], Tuple[Callable, ...]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but keep capture usable without it
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


def _leaf_function(fn: Callable) -> Callable:
    """`fn` recorded as one call_function node when any argument is a Proxy; called normally otherwise."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        proxies = []
        fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    wrapper.__fxsparse_wraps__ = fn
    return wrapper


@contextlib.contextmanager
def _functions_as_leaves(root: nn.Module, functions: Tuple[Callable, ...]):
    """Make `functions` single graph calls wherever the model's code reaches them: as globals of the Python
    modules that define the model's classes, and as attributes of its submodules (timm's `self.act_fn`).
    FX's own autowrap only patches the globals of the root's module."""
    wanted = {id(f) for f in functions}
    patched = []  # (namespace dict, name, original)
    namespaces = {id(ns): ns for ns in (
        vars(sys.modules[type(m).__module__]) for m in root.modules() if type(m).__module__ in sys.modules)}
    namespaces.update({id(m.__dict__): m.__dict__ for m in root.modules()})
    try:
        for ns in namespaces.values():
            for name, value in list(ns.items()):
                if id(value) in wanted and callable(value):
                    patched.append((ns, name, value))
                    ns[name] = _leaf_function(value)
        yield
    finally:
        for ns, name, value in reversed(patched):
            ns[name] = value


def _contains_activation(module: nn.Module) -> bool:
    classes = activation_module_classes()
    return any(isinstance(m, classes) for m in module.modules())


@dataclasses.dataclass
class CaptureReport:
    """How a model was captured: the path taken and the no-trace modules that stayed opaque, with why."""

    path: str = "fx"
    opaque_leaves: Dict[str, str] = dataclasses.field(default_factory=dict)
    traced_through: list = dataclasses.field(default_factory=list)
    reasons: Dict[str, str] = dataclasses.field(default_factory=dict)  # capture path -> why it was not used

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class _InPlaceProxy(fx.Proxy):
    """Records `x += y` as `operator.iadd(x, y)`, which runs in place: torch.fx's own Proxy falls back to
    `x + y`, so an alias of x (a saved skip tensor) would keep its old value in the captured graph."""

    def _inplace(self, op, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    def __iadd__(self, other):
        return self._inplace(operator.iadd, other)

    def __isub__(self, other):
        return self._inplace(operator.isub, other)

    def __imul__(self, other):
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other):
        return self._inplace(operator.itruediv, other)


class ActivationTracer(fx.Tracer):
    """An FX tracer that never hides an activation (see the module docstring)."""

    def __init__(self) -> None:
        leaf_classes, notrace_functions = _timm_notrace()
        self.leaf_functions = notrace_functions + python_activation_functions()
        super().__init__(autowrap_functions=self.leaf_functions)
        self._notrace_classes = leaf_classes
        self._activation_classes = activation_module_classes()
        self._force_leaf: set = set()
        self.report = CaptureReport()

    # -- leaves ------------------------------------------------------------------------------------------
    def _is_notrace(self, m: nn.Module) -> bool:
        return type(m) in self._notrace_classes

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._activation_classes):
            return True
        if self._is_notrace(m):
            return id(m) in self._force_leaf or not _contains_activation(m)
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if not (self._is_notrace(m) and not isinstance(m, self._activation_classes) and _contains_activation(m)):
            return super().call_module(m, forward, args, kwargs)
        if id(m) in self._force_leaf:
            return super().call_module(m, forward, args, kwargs)
        # A no-trace module that hides an activation: try to trace through it, roll back if that fails.
        anchor = self.graph._root.prev  # last node so far
        stack, calls = copy.copy(self.module_stack), dict(self.num_calls)
        path = self.path_of_module(m)
        try:
            out = super().call_module(m, forward, args, kwargs)
            self.report.traced_through.append(path)
            return out
        except Exception as exc:  # any tracing failure: keep it as a leaf instead
            self._rollback(anchor)
            self.module_stack, self.num_calls = stack, calls
            self.report.opaque_leaves[path] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self._force_leaf.add(id(m))
            return super().call_module(m, forward, args, kwargs)

    def _rollback(self, anchor: fx.Node) -> None:
        """Erase the nodes recorded after `anchor` (get_attr nodes stay: the tracer caches their proxies)."""
        added = []
        node = anchor.next
        while node is not self.graph._root:
            added.append(node)
            node = node.next
        for node in reversed(added):
            if node.op != "get_attr":
                node.users.clear()
                self.graph.erase_node(node)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with _functions_as_leaves(root, self.leaf_functions):
            return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    # -- naming ------------------------------------------------------------------------------------------
    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind in ("call_module", "get_attr"):
            node.meta[PATH_META] = str(target)
        else:
            node.meta[PATH_META] = self.scope.module_path
        return node


def _drop_unused_get_attrs(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


CAPTURE_METHODS = ("auto", "fx", "export")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _defaults_beyond(model: nn.Module, n_inputs: int) -> Dict[str, Any]:
    """Forward parameters the example call leaves at their defaults (`mask=None`), bound as concrete values so
    that the graph is the program `model(*inputs)` runs, not one with a placeholder for every argument."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def capture_fx(model: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """Symbolic tracing with `ActivationTracer` (`model` must already be the eval-mode copy)."""
    tracer = ActivationTracer()
    graph = tracer.trace(model, concrete_args=concrete_args)
    _drop_unused_get_attrs(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[CAPTURE_META] = tracer.report
    return gm


def _mark_export_paths(gm: fx.GraphModule, model: nn.Module) -> None:
    """Name ATen nodes by the innermost module that produced them (from `nn_module_stack`), and note when that
    module is itself an activation, so sites read the same as on the FX path."""
    from fxsparse.passes.kinds import kind_of_module

    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = ""
        if stack:
            path = list(stack.values())[-1][0]
            path = path if isinstance(path, str) else str(path)
        node.meta[PATH_META] = path
        if node.op == "call_function" and path:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            kind = kind_of_module(module)
            if kind is not None and kind.matches_aten(node.target):
                node.meta[ACTIVATION_MODULE_META] = True


def capture_export(model: nn.Module, example_inputs: Tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """`torch.export.export(strict=False)`, batch dimension dynamic where the model allows it."""
    from torch.export import Dim, export

    with _quiet(("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")):
        return _export(model, example_inputs)


@contextlib.contextmanager
def _quiet(names):
    """Export attempts that fail (and fall back) log pages of guards and graphs; keep them to errors."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: nn.Module, example_inputs: Tuple[torch.Tensor, ...]) -> fx.GraphModule:
    from torch.export import Dim, export

    args = tuple(example_inputs)
    dynamic = tuple({0: Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in args)
    attempts = [lambda: export(model, args, strict=False, dynamic_shapes=dynamic),
                lambda: export(model, args, strict=False)]
    program, first_error = None, None
    for warmed in (False, True):
        if warmed:  # modules that cache tensors on their first eval forward (timm's TinyViT attention biases)
            with torch.no_grad():  # fill the cache for real; `model` is capture's own copy
                model(*args)
        for attempt in attempts:
            try:
                program = attempt()
                break
            except Exception as exc:
                first_error = first_error or exc
        if program is not None:
            break
    if program is None:
        raise first_error
    unlifted = program.module()
    # a plain GraphModule over the same graph: the exported module refuses .eval()/.train(), which calibration
    # and users call; the graph itself is the eval-mode program whatever the flag says
    gm = fx.GraphModule(unlifted, unlifted.graph, type(model).__name__)
    _mark_export_paths(gm, model)
    gm.meta[CAPTURE_META] = CaptureReport(path="export")
    return gm


def capture(
    model: nn.Module,
    example_inputs: Optional[Tuple[torch.Tensor, ...]] = None,
    method: str = "auto",
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """An eval-mode GraphModule of a deep copy of `model`; `gm.meta[CAPTURE_META]` says how and why.

    method: "fx" (symbolic tracing), "export" (`torch.export`, needs example inputs), or "auto": FX when it
    captures the model with every activation visible; `torch.export` when FX fails or leaves no-trace modules
    opaque; FX with operators inside the opaque modules when export fails too.

    With `example_inputs`, the graph is checked by running it on them (fake tensors: no compute) and every
    node's shape is recorded for the splice pass (passes/shapes.py); a graph that does not run counts as a
    failed capture.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    if method not in CAPTURE_METHODS:
        raise CaptureError(f"capture method must be one of {CAPTURE_METHODS}, got {method!r}")
    original = model
    model = copy.deepcopy(original).eval()
    reasons: Dict[str, str] = {}
    fx_gm = None
    if method in ("auto", "fx"):
        if concrete_args is None and example_inputs is not None:
            concrete_args = _defaults_beyond(model, len(example_inputs)) or None
        try:
            fx_gm = capture_fx(model, concrete_args)
            if example_inputs is not None:
                fx_gm.meta[SHAPES_META] = propagate_shapes(fx_gm, example_inputs)
        except Exception as exc:
            reasons["fx"] = _first_line(exc)
            fx_gm = None
            if method == "fx":
                raise CaptureError(f"FX capture of {type(model).__name__} failed: {reasons['fx']}") from exc
        else:
            opaque = fx_gm.meta[CAPTURE_META].opaque_leaves
            if method == "fx" or not opaque or example_inputs is None:
                return _finish(fx_gm, reasons)
            reasons["fx"] = f"left {len(opaque)} no-trace module(s) opaque: {', '.join(sorted(opaque)[:3])}"
    if method in ("auto", "export") and example_inputs is not None:
        try:  # a fresh copy: tracing can leave proxies in module caches (timm's attention-bias caches)
            gm = capture_export(copy.deepcopy(original).eval(), example_inputs)
            gm.meta[SHAPES_META] = propagate_shapes(gm, example_inputs)
            return _finish(gm, reasons)
        except Exception as exc:
            reasons["export"] = _first_line(exc)
    elif method in ("auto", "export"):
        reasons["export"] = "no example inputs to export with"
    if fx_gm is not None:  # export failed where FX only left modules opaque: operators go inside them
        return _finish(fx_gm, reasons)
    if example_inputs is not None:
        _check_model_runs(original, example_inputs)
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise CaptureError(
        f"no capture path could turn {type(model).__name__} into a graph ({detail}). For FX, pass concrete_args "
        "for data-dependent arguments or register the failing submodule class with "
        "timm.layers.register_notrace_module; for torch.export, pass example_inputs the model accepts.")


def _check_model_runs(model: nn.Module, example_inputs: Tuple[torch.Tensor, ...]) -> None:
    """When every path failed: is it the inputs? Run a copy of the model on them and say so if it refuses."""
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(*example_inputs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
        raise CaptureError(
            f"{type(model).__name__} itself fails on example inputs of shapes {shapes}: {_first_line(exc)}. "
            "Pass example_inputs the model accepts (for timm models, the size in model.pretrained_cfg).") from exc


def _finish(gm: fx.GraphModule, reasons: Dict[str, str]) -> fx.GraphModule:
    gm.eval()
    gm.meta[CAPTURE_META].reasons = dict(reasons)
    return gm
