"""Surrogate gradients for attacking through MeanSparse: which backward replaces the operator's own.

The forward is exact in every case; only the backward changes (fxsparse/ops.py holds the autograd functions):

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

import dataclasses
from typing import Tuple, Union

from fxsparse.errors import FxsparseValueError

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
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in KINDS:
        raise FxsparseValueError(f"unknown surrogate {name!r}; choose one of {KINDS} (e.g. 'smooth:tau=0.1')")
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in ("tau", "taus"):
            raise FxsparseValueError(f"surrogate option {item!r} in {spec!r}: write 'smooth:tau=0.1' or "
                                     "'anneal:taus=1/0.3/0.1'")
        options[key.strip()] = _taus(value, spec)
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
