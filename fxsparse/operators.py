"""Every spliced operator at once: alpha, and the surrogate gradient attacks see through it.

Surrogate gradients (straight_through) say which backward replaces the operator's own. The forward is exact
in every case; only the backward changes (fxsparse/ops.py holds the autograd functions):

    "identity"                 BPDA: the gradient passes as if the operator were not there
    "smooth:tau=0.1"           the gradient of the smooth band  mean + d * sigmoid((|d| - t) / (tau * t)),
                               d = x - mean, t = alpha * std (default tau 0.1)
    "anneal:taus=1/0.3/0.1"    the smooth band with tau large to small, one value per restart of an attack

Identity BPDA is not the strongest attack on a thresholding operator: inside the band the output does not
move, and a gradient that pretends it does points attacks at directions the model ignores. The smooth band's
slope is near 0 deep inside the band and near 1 outside, with a bump at the edge that shows where crossing it
pays.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import threading
import warnings
from typing import Iterator, Mapping, Tuple, Union

import torch
from torch import fx, nn

from fxsparse._meta import PREPARE_META
from fxsparse.errors import CalibrationError, FxsparseValueError, NoActivationWarning, SelectionError
from fxsparse.util import split_spec
from fxsparse.ops import meansparse_ops


def _check_alpha(value, where: str) -> float:
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise SelectionError(f"alpha for {where} must be a number, got {value!r}") from None
    if not math.isfinite(a) or a < 0:
        raise SelectionError(f"alpha for {where} must be finite and >= 0, got {a}: it is the band's half-width "
                             "in standard deviations (0 leaves the model unchanged; 0.1 to 0.5 is typical)")
    return a


def _resolve(groups: Mapping[str, list], key: str, missing_ok: bool = False) -> list:
    """Operators of the sites named by `key`: a site name, an operator's module name, or a glob over site
    names (`missing_ok`: none, for a backend whose later graphs may hold the site)."""
    stripped = key[: -len("_meansparse")] if key.endswith("_meansparse") else key
    for name in (key, stripped):
        if name in groups:
            return list(groups[name])
    if any(c in key for c in "*?["):
        hits = [op for name, ops in groups.items() if fnmatch.fnmatchcase(name, key) for op in ops]
        if hits:
            return hits
    if missing_ok:
        return []
    close = [n for n in groups if key.split(".")[0] in n][:5]
    raise SelectionError(f"no site named {key!r}" + (f"; similar: {close}" if close else "")
                         + "; fxsparse.audit(gm) lists the site names")


def alpha_for_site(alpha: Union[float, Mapping[str, float]], site: str, default: float = 0.0) -> float:
    """The alpha that `set_alpha(model, alpha)` gives `site` (a site it does not name: `default`)."""
    if not isinstance(alpha, Mapping):
        return _check_alpha(alpha, "every site")
    value = default
    for key, a in alpha.items():  # later keys win, as in set_alpha
        stripped = key[: -len("_meansparse")] if key.endswith("_meansparse") else key
        if site in (key, stripped) or any(c in key for c in "*?[") and fnmatch.fnmatchcase(site, key):
            value = _check_alpha(a, repr(key))
    return value


def _operator_groups(model) -> "tuple[dict, bool]":
    """{site: [operators]} and whether `model` is a compile backend (fxsparse.backend(...): every graph it
    compiled; duck-typed, the compile layer sits above this one)."""
    groups = getattr(model, "operator_groups", None)
    if callable(groups) and not isinstance(model, nn.Module):
        return groups(), True
    if not isinstance(model, nn.Module):
        raise SelectionError(f"set_alpha takes a prepared model or a fxsparse.backend, got {type(model).__name__}")
    return {site: [op] for site, op in meansparse_ops(model).items()}, False


def set_alpha(model, alpha: Union[float, Mapping[str, float]]):
    """Set alpha for every site (a float) or per site ({site name or glob: float}, later keys win).

    `model` is a prepared model or a `fxsparse.backend(stats)`: there alpha changes the operators of every
    graph compiled so far (a float: the calibrated ones) and is kept for the graphs it compiles later.
    Alpha is a buffer changed in place, so a compiled model picks it up without recompiling.
    """
    groups, is_backend = _operator_groups(model)
    if not groups and not is_backend and not (isinstance(model, fx.GraphModule) and PREPARE_META in model.meta):
        raise SelectionError("the model has no MeanSparse operators; run fxsparse.prepare or sparsify first")
    if isinstance(alpha, Mapping):
        plan = []
        for key, value in alpha.items():
            a = _check_alpha(value, repr(key))
            plan.extend((op, a) for op in _resolve(groups, key, missing_ok=is_backend))
    else:
        a = _check_alpha(alpha, "every site")
        plan = [(op, a) for ops in groups.values() for op in ops if not is_backend or op.calibrated]
        if not groups and not is_backend:
            warnings.warn(NoActivationWarning("the model has no MeanSparse operators (fxsparse.prepare found no "
                                              "selected activation); alpha changes nothing"), stacklevel=2)
    uncalibrated = [op.site for op, a in plan if a > 0 and not op.calibrated]
    if uncalibrated:
        raise CalibrationError(f"site(s) {uncalibrated[:5]} are not calibrated; run fxsparse.calibrate before "
                               "setting a non-zero alpha")
    with torch.no_grad():
        for op, a in plan:
            op.alpha.fill_(a)
            op.refresh_bounds()
    if is_backend:
        model.alpha = dict(alpha) if isinstance(alpha, Mapping) else a  # for the graphs it compiles later
    return model


KINDS = ("identity", "smooth", "anneal")
DEFAULT_TAU = 0.1
DEFAULT_SCHEDULE = (1.0, 0.3, 0.1, 0.03)


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """A parsed surrogate: its kind and the temperatures it runs at (one, or a schedule for "anneal")."""

    kind: str
    taus: Tuple[float, ...] = ()

    @property
    def backward(self) -> str:
        """The MeanSparse backward it selects: "identity" or "smooth"."""
        return "identity" if self.kind == "identity" else "smooth"

    def __str__(self) -> str:
        if self.kind == "identity":
            return "identity"
        if self.kind == "smooth":
            return f"smooth:tau={self.taus[0]:g}"
        return "anneal:taus=" + "/".join(f"{t:g}" for t in self.taus)


def _taus(text: str, spec: str) -> Tuple[float, ...]:
    try:
        taus = tuple(float(t) for t in text.split("/") if t.strip())
    except ValueError:
        taus = ()
    if not taus or not all(t > 0 and t == t and t != float("inf") for t in taus):
        raise FxsparseValueError(f"surrogate {spec!r}: temperatures must be positive numbers, got {text!r}")
    return taus


def parse_surrogate(spec: Union[str, Surrogate, None]) -> Surrogate:
    """"smooth:tau=0.3" -> Surrogate("smooth", (0.3,)); None and True mean "identity"."""
    if isinstance(spec, Surrogate):
        return spec
    if spec is None or spec is True:
        return Surrogate("identity")
    if not isinstance(spec, str):
        raise FxsparseValueError(f"a surrogate is a string such as 'smooth:tau=0.1', got {spec!r}")
    name, items = split_spec(spec)
    if name not in KINDS:
        raise FxsparseValueError(f"unknown surrogate {name!r}; choose one of {KINDS} (e.g. 'smooth:tau=0.1')")
    options = {}
    for item, key, value in items:
        if value is None or key not in ("tau", "taus"):
            raise FxsparseValueError(f"surrogate option {item!r} in {spec!r}: write 'smooth:tau=0.1' or "
                                     "'anneal:taus=1/0.3/0.1'")
        options[key] = _taus(value, spec)
    if name == "identity":
        if options:
            raise FxsparseValueError(f"surrogate {spec!r}: identity takes no temperature")
        return Surrogate("identity")
    taus = options.get("taus", options.get("tau"))
    if name == "smooth":
        if taus is not None and len(taus) != 1:
            raise FxsparseValueError(f"surrogate {spec!r}: smooth takes one tau; 'anneal:taus=...' takes several")
        return Surrogate("smooth", taus or (DEFAULT_TAU,))
    return Surrogate("anneal", taus or DEFAULT_SCHEDULE)


_ST_LOCK = threading.Lock()
_ST_DEPTH: "dict[int, int]" = {}


@contextlib.contextmanager
def straight_through(model: nn.Module, surrogate: Union[str, Surrogate] = "identity") -> Iterator[nn.Module]:
    """Within the block, every MeanSparse backpropagates through a surrogate gradient; forward is unchanged.

    surrogate: "identity" (BPDA, the default), "smooth:tau=0.1" (the smooth band's gradient at temperature tau)
    or a Surrogate (above); "anneal" schedules belong to attacks and run here at their last
    (smallest) tau. The kind is a Python attribute (one compiled graph per kind), tau a 0-d buffer changed in
    place (a new tau never recompiles). Nested and concurrent uses on the same model are counted: the switch
    goes off when the last one exits; an inner block's surrogate gives way to the outer one's on exit.
    """
    chosen = parse_surrogate(surrogate)
    ops = list(meansparse_ops(model).values())
    key = id(model)
    with _ST_LOCK:
        _ST_DEPTH[key] = _ST_DEPTH.get(key, 0) + 1
        before = [(op.straight_through, op.tau.clone()) for op in ops]
        for op in ops:
            op.straight_through = chosen.backward
            if chosen.taus:
                with torch.no_grad():
                    op.tau.fill_(chosen.taus[-1])
    try:
        yield model
    finally:
        with _ST_LOCK:
            _ST_DEPTH[key] -= 1
            last = _ST_DEPTH[key] == 0
            if last:
                del _ST_DEPTH[key]
            for op, (kind, tau) in zip(ops, before):
                op.straight_through = False if last else (kind or "identity")
                with torch.no_grad():
                    op.tau.copy_(tau)
