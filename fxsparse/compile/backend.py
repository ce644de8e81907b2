"""A `torch.compile` backend that applies the MeanSparse pass to the graphs Dynamo hands it.

For models that no capture path handles whole (Python control flow on tensor values, unsupported calls),
Dynamo still compiles them, as several graphs with breaks in between. The backend runs locate + splice on
each graph (site names are the module paths Dynamo records, normalised to read like the model's attributes)
and then delegates to Inductor (or any backend named by `compiler`).

Two phases, because statistics must exist before the operators can act:

    calib = fxsparse.backend()                       # no statistics: calibration mode, runs eagerly
    seen = torch.compile(model, backend=calib)
    for x in loader: seen(x)                         # each operator observes its input, output unchanged
    stats = calib.statistics()                       # {site: {"mean", "std", "count"}}

    fast = torch.compile(model, backend=fxsparse.backend(stats, alpha=0.2))

Statistics from a sparsified GraphModule work too: `fxsparse.backend(fxsparse.statistics(gm), alpha=0.2)`
(site names agree when the graphs agree). `set_alpha` on the backend changes every operator in place:
compiled code reads alpha as a buffer, so nothing recompiles.

Site names are made per Dynamo graph and then kept consistent across graphs by the call's source stack
(`stack_trace`): a graph break between two calls of the same module gives the second call the next free
name ("relu_1"), as one whole graph would, instead of pooling both calls' statistics under one name; a
recompiled graph finds its sites' names again.

Limits: Dynamo's graphs do not know the model's module names, so where the model has its own module named
like a suffixed site ("act_1" next to "act"), names can differ from a whole-graph capture's; and where a
break falls inside a block's forward, Dynamo compiles that frame once for every block, with paths relative
to the block, so those blocks' calls share one name and one set of statistics.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import fx, nn

from fxsparse.calibrate.stats import ChannelStats
from fxsparse.capture.export import annotate_module_paths
from fxsparse.operators import alpha_for_site, set_alpha
from fxsparse.util import free_name
from fxsparse.errors import BackendError, CalibrationError, FxsparseError, SelectionError
from fxsparse.ops import MeanSparse, mean_sparse_bounds, meansparse_ops
from fxsparse.passes.kinds import kind_of_module_class
from fxsparse._meta import SHAPE_META
from fxsparse.passes.locate import Selection, as_selection, locate
from fxsparse.passes.splice import splice

Statistics = Dict[str, Dict[str, torch.Tensor]]


def statistics(model: nn.Module) -> Statistics:
    """The calibrated statistics of every MeanSparse site of `model`, by site name (CPU tensors)."""
    out = {}
    for site, op in meansparse_ops(model).items():
        if op.calibrated:
            out[site] = {"mean": op.mean.detach().cpu().clone(), "std": op.std.detach().cpu().clone(),
                         "count": op.count.detach().cpu().clone()}
    return out


_PATH_RULES = [
    (re.compile(r"^L\['self'\]\.?"), ""),
    (re.compile(r"^L\['(\w+)'\]\.?"), ""),
    (re.compile(r"_modules\['([^']+)'\]"), r"\1"),
    (re.compile(r"\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
]
_GETATTR = re.compile(r"getattr\(([^()]*), '([^']+)'\)")


def module_path(dynamo_path: str) -> str:
    """"L['self'].layer1[0].relu" -> "layer1.0.relu" (Dynamo's source strings to attribute paths)."""
    path = str(dynamo_path)
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    for pattern, repl in _PATH_RULES:
        path = pattern.sub(repl, path)
    return path.strip(".")


def _annotate(gm: fx.GraphModule) -> None:
    """Module paths and shapes on every node, as capture and shape propagation leave them."""
    annotate_module_paths(gm, lambda node, path, cls: isinstance(cls, type) and kind_of_module_class(cls) is not None,
                          module_path)
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):
            node.meta[SHAPE_META] = tuple(int(s) for s in value.shape)


def _own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of Dynamo's graph (Dynamo reads its own graph again after the backend)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph, type(gm).__name__)


def _widen_to_input_dtypes(gm: fx.GraphModule) -> None:
    """Give each operator its input's dtype where that is wider than float32. Dynamo's graphs take parameters
    as inputs, so the splice pass finds no state to copy the dtype from and would leave a float64 model's
    operators in float32; narrower inputs (autocast) keep float32 state, as in a sparsified GraphModule."""
    for node in gm.graph.nodes:
        op = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(op, MeanSparse):
            value = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
            if (isinstance(value, torch.Tensor) and value.is_floating_point()
                    and torch.finfo(value.dtype).bits > torch.finfo(op.mean.dtype).bits):
                op.to(value.dtype)


def _state_as_inputs(gm: fx.GraphModule) -> List[torch.Tensor]:
    """Rewrite each MeanSparse call into `mean_sparse_bounds(x, mean, lo, hi, ...)` whose state tensors are extra
    graph inputs, and drop the submodules: the compiler behind Dynamo accepts only the parameters and buffers
    Dynamo itself registered. Returns the state tensors in input order (the modules' own buffers, so bounds
    refreshed in place by a new alpha are seen by the compiled code)."""
    state: List[torch.Tensor] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    last_input = placeholders[-1] if placeholders else None  # None: a graph without inputs, state goes first
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), MeanSparse):
            continue
        op = gm.get_submodule(node.target)
        inputs = []
        for field in ("mean", "lo", "hi"):
            where = (gm.graph.inserting_after(last_input) if last_input is not None
                     else gm.graph.inserting_before(next(iter(gm.graph.nodes))))
            with where:
                last_input = gm.graph.placeholder(f"fxsparse_{node.target.replace('.', '_')}_{field}")
            tensor = getattr(op, field)
            last_input.meta["example_value"] = tensor
            inputs.append(last_input)
            state.append(tensor)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(mean_sparse_bounds, (node.args[0], *inputs, op.dim, op.inplace))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return state


class MeanSparseBackend:
    """See the module docstring. Call it as a `torch.compile` backend."""

    def __init__(self, stats: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None, alpha=0.0, *,
                 select=None, compiler: Union[str, Callable] = "inductor", strict: bool = True):
        self.calibrating = stats is None
        self.stats = {k: dict(v) for k, v in (stats or {}).items()}
        self.alpha = alpha
        self.select = select
        self.compiler = compiler
        self.strict = strict
        self.ops: Dict[str, List[MeanSparse]] = {}
        self._accumulators: Dict[str, ChannelStats] = {}
        self._names: Dict[Tuple[str, Optional[str], int], str] = {}  # (path, call stack, rank) -> site name

    # -- the backend -------------------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs):
        """Dynamo wraps any exception a backend raises into its own `BackendCompilerFailed`; so a failure
        here is returned as a function that raises our error when the compiled frame runs (the user's call),
        where it reaches the user unwrapped."""
        try:
            return self._compile(gm, example_inputs)
        except Exception as exc:
            error = exc if isinstance(exc, FxsparseError) else BackendError(
                f"the fxsparse backend failed on a graph of {len(gm.graph.nodes)} nodes "
                f"({type(exc).__name__}: {exc}); run the model with fxsparse.backend(compiler='eager') to see "
                "whether the compiler behind it or the MeanSparse pass fails, and report it")
            if error is not exc:
                error.__cause__ = exc

            def fail(*args):
                raise error

            return fail

    def _compile(self, gm: fx.GraphModule, example_inputs):
        gm = _own_copy(gm)
        _annotate(gm)
        selection = as_selection(self.select)
        sites = locate(gm, Selection(kinds=selection.kinds))  # paths are filtered on the final names below
        occurrences: Dict[Tuple[str, Optional[str]], int] = {}
        for site in sites:
            stack = site.node.meta.get("stack_trace")
            seen = occurrences[(site.module_path, stack)] = occurrences.get((site.module_path, stack), -1) + 1
            site.name = self._site_name(site.name, site.module_path, stack, seen)
        sites = [s for s in sites if selection.takes_site(s.name, s.module_path)]
        if sites:
            splice(gm, sites)
            _widen_to_input_dtypes(gm)
        for site, op in meansparse_ops(gm).items():
            self.ops.setdefault(site, []).append(op)
            if self.calibrating:
                acc = self._accumulators.setdefault(site, ChannelStats(op.dim))
                op.observer = acc.update
            else:
                self._load(site, op)
        if self.calibrating:
            return gm.forward  # eager, so that the observers run
        inner = self.compiler if callable(self.compiler) else torch._dynamo.lookup_backend(self.compiler)
        if not meansparse_ops(gm):  # nothing to rewrite (e.g. a graph between breaks): the compiler alone
            return inner(gm, list(example_inputs))
        state = _state_as_inputs(gm)
        compiled = inner(gm, list(example_inputs) + state)

        def run(*args):
            return compiled(*args, *state)  # the operators' current mean/std/alpha, read at every call

        return run

    def _site_name(self, name: str, path: str, stack: Optional[str], occurrence: int) -> str:
        """A site's name across graphs. A call is identified by its module path, its source stack and its
        rank among the calls with that path and stack in its graph (a loop calls from one line); the same
        call keeps its name when Dynamo recompiles. A new call takes the name its own graph gave it (`path`
        with a call-count suffix) unless an earlier graph's call has that name, then the next free suffix."""
        key = (path, stack, occurrence)
        if key not in self._names:
            taken = set(self._names.values())
            self._names[key] = name if name not in taken else free_name(path, taken.__contains__, start=1)
        return self._names[key]

    def _load(self, site: str, op: MeanSparse) -> None:
        stat = self.stats.get(site)
        if stat is None:
            if self.strict:
                raise SelectionError(
                    f"no statistics for site {site!r} (known: {sorted(self.stats)[:5]}...); calibrate with "
                    "fxsparse.backend() first, or pass strict=False to leave such sites at alpha = 0")
            return
        mean, std = stat["mean"], stat["std"]
        if mean.numel() != op.channels:
            raise SelectionError(f"site {site!r}: statistics have {mean.numel()} channels, the graph has "
                                 f"{op.channels}")
        with torch.no_grad():
            op.mean.copy_(mean)
            op.std.copy_(std)
            op.count.fill_(float(stat.get("count", torch.tensor(1.0))))
            op.alpha.fill_(self._alpha_for(site))
            op.refresh_bounds()

    def _alpha_for(self, site: str) -> float:
        return alpha_for_site(self.alpha, site)

    # -- after calibration / while serving ---------------------------------------------------------------
    def statistics(self) -> Statistics:
        """Statistics gathered in calibration mode, by site name."""
        if not self.calibrating:
            return {k: dict(v) for k, v in self.stats.items()}
        missing = [s for s, acc in self._accumulators.items() if acc.mean is None]
        if not self._accumulators or missing:
            raise CalibrationError("run data through the compiled model before asking for statistics"
                                   + (f" (sites never reached: {missing[:5]})" if missing else ""))
        return {site: {"mean": acc.mean.float(), "std": acc.std.float(),
                       "count": torch.tensor(float(acc.count), dtype=torch.float64)}
                for site, acc in self._accumulators.items()}

    def operator_groups(self) -> Dict[str, List[MeanSparse]]:
        """The spliced operators of every graph compiled so far, by site (what fxsparse.set_alpha changes)."""
        if self.calibrating:
            raise CalibrationError("this backend is calibrating; build a new one with its statistics")
        return {site: list(ops) for site, ops in self.ops.items()}

    def set_alpha(self, alpha) -> None:
        """fxsparse.set_alpha(self, alpha): in place, no recompile; kept for the graphs compiled later."""
        set_alpha(self, alpha)


def backend(stats=None, alpha=0.0, **kwargs) -> MeanSparseBackend:
    """A `torch.compile` backend applying MeanSparse (see fxsparse/compile/backend.py); without `stats`, it calibrates."""
    return MeanSparseBackend(stats, alpha, **kwargs)
