"""A run-time coverage oracle, independent of the pass: did every activation the model executes get its operator?

`ActivationRecorder` is a `TorchDispatchMode` that sees every ATen op a forward executes, whatever the Python
spelling or capture path. It records an *activation event* for each op of a default activation kind (relu,
gelu, silu, hardtanh, elu, ...) and for composite activations recognised at run time (x * sigmoid(x),
x * sigmoid(c x), x * tanh(softplus(x)), x * (1 + erf(x / sqrt 2))). For the sparsified model it also notes
whether the tensor entering the activation is the output of a MeanSparse module (tracked by forward hooks),
or that output only moved or regrouped (view, reshape, permute).

`check_coverage(original, sparsified, inputs)` runs both and reports: the number of events in each (they must
match), how many of the sparsified model's events are fed by a MeanSparse, and where the uncovered ones are
(module path of the original model, same event order).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Set

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fxsparse._meta import CAPTURE_META
from fxsparse.ops import MeanSparse
from fxsparse.passes.kinds import activation_kinds
from fxsparse.passes.vocabulary import bare

aten = torch.ops.aten


def _activation_packets() -> Dict[object, str]:
    table = {}
    for kind in activation_kinds():
        if kind.default:
            for packet in kind.aten:
                table.setdefault(packet, kind.name)
    # ops the dispatcher reaches for composite-implicit activations (selu/celu -> elu, prelu -> _prelu_kernel)
    table.setdefault(aten.elu, "elu")
    if hasattr(aten, "_prelu_kernel"):
        table.setdefault(aten._prelu_kernel, "prelu")
    return table


# ops that only move or regroup elements (a site whose channels span several axes views them as one axis and
# back around its operator)
_MOVES = {aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.clone, aten.unflatten,
          aten.flatten}


@dataclasses.dataclass
class ActivationEvent:
    kind: str
    op: str
    module_path: str
    covered: bool


def _scalar(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class ActivationRecorder(TorchDispatchMode):
    """Records activation events; `fed_by` holds the ids of tensors that MeanSparse modules produced."""

    def __init__(self, path_stack: List[str], fed_by: Set[int]):
        super().__init__()
        self.table = _activation_packets()
        self.events: List[ActivationEvent] = []
        self.path_stack = path_stack
        self.fed_by = fed_by
        self.keep: List[torch.Tensor] = []  # keeps ids unique while the forward runs
        self.origin: Dict[int, tuple] = {}  # id(output) -> (op name, tensor input, scalar)

    def _event(self, kind: str, op: str, x) -> None:
        covered = isinstance(x, torch.Tensor) and id(x) in self.fed_by
        path = self.path_stack[-1] if self.path_stack else ""
        self.events.append(ActivationEvent(kind, op, path, covered))

    def _note(self, out, name: str, x, scalar=None) -> None:
        if isinstance(out, torch.Tensor):
            self.keep.append(out)
            self.origin[id(out)] = (name, x, scalar)

    def _composite(self, packet, args, out) -> None:
        name = bare(packet.__name__)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ("sigmoid", "tanh", "softplus", "erf") and tensors:
            self._note(out, name, tensors[0])
            if name == "erf":  # erf(x / sqrt 2): a GELU
                src = self.origin.get(id(tensors[0]))
                if src and src[0] == "scale" and src[2] is not None and math.isclose(src[2], 1 / math.sqrt(2),
                                                                                     rel_tol=1e-3):
                    self._event("gelu", "erf composite", src[1])
            return
        if name in ("mul", "div") and len(args) == 2:
            a, b = args
            if isinstance(a, torch.Tensor) and _scalar(b) is not None:
                c = _scalar(b) if name == "mul" else (1 / _scalar(b) if _scalar(b) else None)
                self._note(out, "scale", a, c)
                return
            if name == "mul" and len(tensors) == 2:
                for x, g in ((a, b), (b, a)):
                    gate = self.origin.get(id(g))
                    if gate is None:
                        continue
                    if gate[0] == "sigmoid" and gate[1] is x:
                        self._event("silu", "x*sigmoid(x) composite", x)
                        return
                    if gate[0] == "sigmoid":
                        scaled = self.origin.get(id(gate[1]))
                        if scaled and scaled[0] == "scale" and scaled[1] is x:
                            self._event("quick_gelu" if scaled[2] and math.isclose(scaled[2], 1.702, rel_tol=1e-3)
                                        else "silu", "x*sigmoid(cx) composite", x)
                            return
                    if gate[0] == "tanh":
                        inner = self.origin.get(id(gate[1]))
                        if inner and inner[0] == "softplus" and inner[1] is x:
                            self._event("mish", "x*tanh(softplus(x)) composite", x)
                            return

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "overloadpacket", None)
        kind = self.table.get(packet)
        if kind is not None:
            self._event(kind, packet.__name__, args[0] if args else kwargs.get("self"))
        elif packet in _MOVES and args and id(args[0]) in self.fed_by and isinstance(out, torch.Tensor):
            self.keep.append(out)  # an operator's output moved or reshaped: same values, still fed by it
            self.fed_by.add(id(out))
        elif packet is not None:
            self._composite(packet, args, out)
        return out


class _ModulePaths:
    """Forward hooks keeping the path of the module currently running (for locating uncovered events)."""

    def __init__(self, model: nn.Module):
        self.stack: List[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)
        return hook

    def _leave(self, module, args, out):
        if self.stack:
            self.stack.pop()

    def remove(self):
        for h in self.handles:
            h.remove()


def record_activations(model: nn.Module, inputs: Sequence[torch.Tensor]) -> List[ActivationEvent]:
    """Activation events of one eval forward of `model` on `inputs`."""
    fed_by: Set[int] = set()
    keep: List[torch.Tensor] = []

    def note_output(module, args, out):
        if isinstance(out, torch.Tensor):
            keep.append(out)
            fed_by.add(id(out))

    paths = _ModulePaths(model)
    handles = [m.register_forward_hook(note_output) for m in model.modules() if isinstance(m, MeanSparse)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), ActivationRecorder(paths.stack, fed_by) as recorder:
            model(*inputs)
    finally:
        model.train(was)
        paths.remove()
        for h in handles:
            h.remove()
    return recorder.events


@dataclasses.dataclass
class CoverageReport:
    original_events: int
    sparsified_events: int
    covered: int
    uncovered: List[ActivationEvent]

    @property
    def coverage(self) -> float:
        return self.covered / self.sparsified_events if self.sparsified_events else 1.0

    @property
    def complete(self) -> bool:
        return self.original_events == self.sparsified_events and self.covered == self.sparsified_events

    def summary(self) -> str:
        text = (f"{self.covered}/{self.sparsified_events} activation calls fed by MeanSparse "
                f"({100 * self.coverage:.1f}%); original model ran {self.original_events}")
        if self.uncovered:
            text += "; uncovered: " + ", ".join(f"{e.kind} at {e.module_path or '<root>'}" for e in self.uncovered[:5])
        return text


def check_coverage(original: nn.Module, sparsified: nn.Module, inputs: Sequence[torch.Tensor]) -> CoverageReport:
    """Compare activation events of `original` and `sparsified` on the same inputs (see the module docstring)."""
    before = record_activations(original, inputs)
    after = record_activations(sparsified, inputs)
    for event, where in zip(after, before):  # name uncovered events by the original model's module paths
        event.module_path = where.module_path
    uncovered = [e for e in after if not e.covered]
    return CoverageReport(len(before), len(after), len(after) - len(uncovered), uncovered)


@dataclasses.dataclass
class Verification:
    """What `verify` measured on one model."""

    capture: str
    sites: int
    exact: bool                 # alpha = 0 output bit-identical to the original
    report: CoverageReport
    finite_after_alpha: bool    # calibrated, alpha = 0.2: outputs finite

    @property
    def ok(self) -> bool:
        return self.exact and self.report.complete and self.finite_after_alpha


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _leaves(o)]
    return []


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(la, lb))


def verify(model: nn.Module, inputs: Sequence[torch.Tensor], **prepare_kwargs) -> Verification:
    """Sparsify `model` and check it: alpha = 0 exactness, oracle coverage, and a finite calibrated forward.
    The model runs in eval mode (a model left in train mode would update its BatchNorm statistics and compare
    batch statistics with the graph's eval-mode running ones); its modes are restored afterwards."""
    import fxsparse

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        gm = fxsparse.prepare(model, tuple(inputs), **prepare_kwargs)
        with torch.no_grad():
            exact = _same(gm(*inputs), model(*inputs))
        report = check_coverage(model, gm, inputs)
    finally:
        for m, training in modes:
            m.training = training
    sites = len(fxsparse.audit(gm))
    finite = True
    if sites:
        fxsparse.calibrate(gm, [tuple(inputs)], measure=False, progress=False)
        fxsparse.set_alpha(gm, 0.2)
        with torch.no_grad():
            finite = all(bool(torch.isfinite(t).all()) for t in _leaves(gm(*inputs)) if t.is_floating_point())
    return Verification(gm.meta[CAPTURE_META].path, sites, exact, report, finite)
