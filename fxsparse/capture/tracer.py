"""The FX path of capture: `ActivationTracer`, which keeps every activation visible.

`ActivationTracer` adds three ideas to `torch.fx.Tracer`:

1. Activation modules of every registered kind are leaves, so `nn.GELU`, timm's `GELU` and a user's own
   activation class each appear as one `call_module` node named by its module path.
2. timm's no-trace modules and functions are leaves, as in timm's own feature extraction, except that a
   no-trace module that *contains* an activation is traced through when that works; when it does not, the
   nodes recorded during the attempt are rolled back and the module stays a leaf (the splice pass then
   places the operator inside it, see `passes/splice.py`). The reason is kept in the capture report.
3. Every node records the module path it came from (`node.meta[PATH_META]`, fxsparse/_meta.py), the way torchvision's
   `NodePathTracer` qualifies node names, so sites can be named after the model's own attributes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import operator
import sys
from typing import Any, Callable, Dict, Optional, Tuple

from torch import fx, nn

from fxsparse.util import first_line
from fxsparse._meta import CAPTURE_META, PATH_META
from fxsparse.passes.kinds import activation_module_classes, python_activation_functions


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


def capture_fx(model: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """Symbolic tracing with `ActivationTracer` (`model` must already be the eval-mode copy)."""
    tracer = ActivationTracer()
    graph = tracer.trace(model, concrete_args=concrete_args)
    _drop_unused_get_attrs(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[CAPTURE_META] = tracer.report
    return gm
