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

Capture is quiet: what torch prints or logs while a path fails (tracebacks, guards, graphs) stays out of the
terminal, and the user gets one CaptureError with torch's error as its `__cause__` (`FXSPARSE_DEBUG=1` lets
torch's output through). Every captured graph carries an `InputGuard` pre-hook, so that a call the graph cannot
take (a keyword it has no input for, a size export fixed) is refused with our error, not torch's.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import logging
import operator
import sys
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import fx, nn

from fxsparse.config import is_debug, spatial_export_budget
from fxsparse.util import first_line
from fxsparse._meta import ACTIVATION_MODULE_META, CAPTURE_META, PATH_META, SHAPES_META
from fxsparse.errors import CaptureError, FxsparseValueError
from fxsparse.inputs import Call, as_call, bound_names
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
        # the tracer's own bookkeeping, restored on rollback (`num_calls` exists from torch 2.6 on)
        stack, calls = copy.copy(self.module_stack), dict(getattr(self, "num_calls", {}))
        path = self.path_of_module(m)
        try:
            out = super().call_module(m, forward, args, kwargs)
            self.report.traced_through.append(path)
            return out
        except Exception as exc:  # any tracing failure: keep it as a leaf instead
            self._rollback(anchor)
            self.module_stack = stack
            if hasattr(self, "num_calls"):
                self.num_calls = calls
            self.report.opaque_leaves[path] = first_line(exc)
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


def graph_inputs(gm: fx.GraphModule, call: Call) -> list:
    """The values of `gm`'s placeholders, in order, for `call` (what `gm(*call.args, **call.kwargs)` binds):
    through the input spec of an exported graph, by parameter name for an FX graph."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((list(call.args), dict(call.kwargs)), spec))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values, args = [], list(call.args)
    for node in placeholders:
        if args:
            values.append(args.pop(0))
        elif node.target in call.kwargs:
            values.append(call.kwargs[node.target])
        elif node.args:
            values.append(node.args[0])
        else:
            raise FxsparseValueError(f"example inputs give no value for the model input {node.target!r}")
    return values


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


def capture_export(model: nn.Module, example_inputs) -> fx.GraphModule:
    """`torch.export.export(strict=False)`: batch, height and width dynamic where the model allows them."""
    return _export(model, as_call(example_inputs))


_NOISY_LOGGERS = ("torch", "torch.fx", "torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export",
                  "torch._dynamo", "torch._subclasses", "torch._functorch", "torch._guards")


@contextlib.contextmanager
def quiet():
    """Capture attempts that fail (and fall back) print tracebacks (ShapeProp), log guards and dump graphs
    (export): keep all of it out of the user's terminal; the buffer holds what was printed. Our own error says
    what went wrong (its __cause__ has torch's); FXSPARSE_DEBUG=1 shows everything."""
    buffer = io.StringIO()
    if is_debug():
        yield buffer
        return
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dynamic_shapes(model: nn.Module, call: Call, dims: str):
    """Dim.AUTO on the first dimension ("batch"), and with "spatial" also on the last two of tensors of 3 or
    more dims (height and width of a batch, or of one image in a detector's list), for every tensor of the
    call. AUTO lets export specialise a dim where the model needs it (a channel count, position embeddings),
    so it costs nothing where the model fixes the size."""
    from torch.export import Dim

    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        auto = {0: Dim.AUTO}
        if dims == "spatial" and t.dim() >= 3:
            auto.update({t.dim() - 2: Dim.AUTO, t.dim() - 1: Dim.AUTO})
        return auto

    def tree(value):  # plain lists, tuples and dicts, the structure export compares with the inputs'
        if isinstance(value, (list, tuple)):
            return type(value)(tree(v) for v in value)
        if isinstance(value, dict):
            return {k: tree(v) for k, v in value.items()}
        return spec(value)

    args = [tree(a) for a in call.args]
    if not call.kwargs:
        return tuple(args)
    names = bound_names(model, call)
    if names is None:
        return None
    return {**dict(zip(names, args)), **{k: tree(v) for k, v in call.kwargs.items()}}


class _Overtime(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _Overtime in the body after `seconds` (SIGALRM, so only in the main thread on POSIX; elsewhere
    the body runs unbounded)."""
    import signal
    import threading

    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Overtime()

    import time

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    remaining = signal.setitimer(signal.ITIMER_REAL, seconds)[0]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:  # an outer timer (a caller's own time limit) keeps what was left of it
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.monotonic() - started), 1e-3))


def _export(model: nn.Module, call: Call) -> fx.GraphModule:
    from torch.export import export

    args, kwargs = tuple(call.args), dict(call.kwargs)
    notes: Dict[str, str] = {}

    def attempt(dims: Optional[str]):
        if dims is None:
            return export(model, args, kwargs, strict=False)
        shapes = _dynamic_shapes(model, call, dims)
        if dims != "spatial":
            return export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
        # Making height and width symbolic can cost export minutes of sympy simplification (timm's MobileViTv2:
        # 1.5 s with a dynamic batch, over 500 s with dynamic height and width too); past the budget
        # (config.spatial_export_budget) capture exports with a dynamic batch only and says so in its report.
        budget = spatial_export_budget()
        try:
            with _time_limit(budget):
                return export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
        except _Overtime:
            notes["dynamic_shapes"] = (
                f"height and width fixed at the example's: making them dynamic took export over "
                f"{budget:g} s (FXSPARSE_SPATIAL_EXPORT_BUDGET sets the budget); the batch stays "
                "dynamic")
            raise

    program, error = None, None
    for warmed in (False, True):
        if warmed:  # modules that cache tensors on their first eval forward (timm's TinyViT attention biases)
            with torch.no_grad():  # fill the cache for real; `model` is capture's own copy
                model(*args, **kwargs)
        for dims in ("spatial", "batch", None):
            if dims == "spatial" and "dynamic_shapes" in notes:
                continue  # over budget once: not again after the warm-up
            try:
                program = attempt(dims)
                break
            except Exception as exc:
                error = exc  # the last attempt's (static shapes, after a warm-up run) says the most
        if program is not None:
            break
    if program is None:
        raise error
    unlifted = program.module()
    # a plain GraphModule over the same graph: the exported module refuses .eval()/.train(), which calibration
    # and users call; the graph itself is the eval-mode program whatever the flag says
    gm = fx.GraphModule(unlifted, unlifted.graph, type(model).__name__)
    _mark_export_paths(gm, model)
    gm.meta[CAPTURE_META] = CaptureReport(path="export", reasons=notes)
    gm.register_forward_pre_hook(InputGuard(gm, [tuple(t.shape) for t in call.leaves()]), with_kwargs=True)
    return gm


def capture(
    model: nn.Module,
    example_inputs=None,
    method: str = "auto",
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """An eval-mode GraphModule of a deep copy of `model`; `gm.meta[CAPTURE_META]` says how and why.

    example_inputs: a tensor, the tuple of positional arguments (as torch.export takes them), or a dict of
    keyword tensors (fxsparse/inputs.py).
    method: "fx" (symbolic tracing), "export" (`torch.export`, needs example inputs), or "auto": FX when it
    captures the model with every activation visible; `torch.export` when FX fails or leaves no-trace modules
    opaque; FX with operators inside the opaque modules when export fails too.

    With `example_inputs`, the graph is checked by running it on them (fake tensors: no compute) and every
    node's shape is recorded for the splice pass (passes/shapes.py); a graph that does not run counts as a
    failed capture. What torch prints or logs on the way (a failed attempt's traceback, export's guards) is
    kept out of the terminal (FXSPARSE_DEBUG=1 lets it through); a failure raises one CaptureError whose
    __cause__ is torch's error.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    if method not in CAPTURE_METHODS:
        raise CaptureError(f"capture method must be one of {CAPTURE_METHODS}, got {method!r}")
    call = as_call(example_inputs) if example_inputs is not None else None
    with quiet():
        return _capture(model, call, method, concrete_args)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode (fxsparse never modifies the user's model), or our error saying why not."""
    try:
        return copy.deepcopy(model).eval()
    except Exception as exc:
        raise CaptureError(
            f"fxsparse works on a deep copy of {type(model).__name__} and cannot make one: {first_line(exc)}. "
            "A forward run with gradients can leave non-leaf tensors in module attributes (RAFT's correlation "
            "pyramid): run the model under torch.no_grad(), or rebuild it, before sparsifying") from exc


def _capture(original: nn.Module, call: Optional[Call], method: str, concrete_args) -> fx.GraphModule:
    model = copy_model(original)
    reasons: Dict[str, str] = {}
    errors: Dict[str, BaseException] = {}
    fx_gm = None
    if method in ("auto", "fx"):
        if concrete_args is None and call is not None:
            concrete_args = _unbound_defaults(model, call) or None
        try:
            fx_gm = capture_fx(model, concrete_args)
            if call is not None:
                fx_gm.meta[SHAPES_META] = propagate_shapes(fx_gm, graph_inputs(fx_gm, call))
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
            gm = _export(copy_model(original), call)
            gm.meta[SHAPES_META] = propagate_shapes(gm, graph_inputs(gm, call))
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


class InputGuard:
    """A forward pre-hook on a captured graph: inputs the graph cannot take are refused with our error, not
    torch's: a keyword the graph has no input for, or (exported graphs) a size that fails the conditions
    torch.export recorded (`_guards_fn`: "4 * H * W == 256" for a flatten into a Linear, "H == 224" where the
    model fixed the size). Sizes the model leaves free (batch, and height and width where it allows) pass."""

    def __init__(self, gm: fx.GraphModule, example_shapes=None):
        self.names, self.required = _input_names(gm), _input_names(gm, required=True)
        self.example_shapes = example_shapes

    def __call__(self, module, args, kwargs):
        if self.names is not None:
            given = set(self.names[:len(args)]) | set(kwargs)
            missing = [n for n in self.required if n not in given]
            if missing and len(args) <= len(self.names):
                raise FxsparseValueError(
                    f"the captured model needs the inputs {self.required}; {missing} missing: the graph is the "
                    "program the model ran on the example inputs given to fxsparse.prepare, which included "
                    f"{missing}. Pass them, or prepare without them to capture the program that does not use them")
            unknown = [k for k in kwargs if k not in self.names]
            if unknown:
                raise FxsparseValueError(
                    f"the captured model takes the inputs {self.names}, not {unknown}: the graph is the program "
                    f"the model ran on the example inputs given to fxsparse.prepare, which did not include "
                    f"{unknown}. Give them in example_inputs (a dict of keyword tensors) to capture the program "
                    "that uses them, or compute what needs them outside (a loss from the logits)")
        guards = getattr(module, "_guards_fn", None)
        if guards is None:
            return None
        try:
            values = graph_inputs(module, Call(tuple(args), dict(kwargs)))
        except Exception:
            return None  # the graph's own input check gives torch's error
        try:
            guards(*values)
        except AssertionError as exc:
            shapes = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
            report = getattr(module, "meta", {}).get(CAPTURE_META)
            fixed = report.reasons.get("dynamic_shapes") if report is not None else None
            why = (f"fxsparse fixed them: {fixed}" if fixed else
                   "The model fixes these sizes (a flatten into a Linear, position embeddings of one size)")
            raise FxsparseValueError(
                f"inputs of shape(s) {shapes} fail a condition torch.export recorded when it captured the model "
                f"on {self.example_shapes}: {str(exc).replace('Guard failed: ', '')}. {why}; prepare the model "
                "with example inputs of the size you will use") from exc
        return None


def _input_names(gm: fx.GraphModule, required: bool = False):
    try:
        params = inspect.signature(gm.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        return None
    return [p.name for p in params if not required or p.default is inspect.Parameter.empty]


def _finish(gm: fx.GraphModule, reasons: Dict[str, str]) -> fx.GraphModule:
    gm.eval()
    report = gm.meta[CAPTURE_META]
    report.reasons = {**dict(reasons), **report.reasons}  # the path's own notes ("dynamic_shapes") stay
    _guard(gm)
    return gm


def _guard(gm: fx.GraphModule) -> None:
    if not any(isinstance(h, InputGuard) for h in gm._forward_pre_hooks.values()):
        gm.register_forward_pre_hook(InputGuard(gm), with_kwargs=True)
