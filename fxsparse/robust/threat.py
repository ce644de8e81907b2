"""The threat model (eps, norm, bounds) as one frozen, validated object, and the settings a run shares.

`evaluate`, `search_alpha` and the robustness curve each took eps, norm and bounds as loose keywords and
checked them in their own way; the attacks measure `eps` in input units and clip to `bounds`. A ThreatModel
is checked once, when it is made (a known norm, AutoAttack's "Linf" / "L2" spellings too; bounds low < high;
an eps >= 0 that is a perturbation of the range, not a rescaling of the image), and each attack's call site
takes its keywords from it (`threat.keywords()`), so every stage sees the same, canonical threat:

    threat = fxsparse.ThreatModel(8 / 255)                       # L-inf, images in [0, 1]
    fxsparse.evaluate(gm, test, threat=threat)                   # the same as eps=8 / 255
    fxsparse.search_alpha(gm, val, threat=ThreatModel(0.5, "L2"))

The public keywords keep working: `eps=..., norm=..., bounds=...` build one (`ThreatModel.resolve`); giving
both a ThreatModel and any of them is refused. `RunSettings` adds what `evaluate` and `search_alpha` share
besides the threat (seed, batch size, example cap), checked in one place.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from fxsparse.errors import FxsparseTypeError, FxsparseValueError, InputRangeError

NORMS = ("linf", "l2")
MAX_LINF_FRACTION = 64 / 255  # an L-inf eps above this fraction of the input range is refused
DEFAULT_NORM = "linf"
DEFAULT_BOUNDS = (0.0, 1.0)


def check_bounds(bounds: Sequence[float]) -> Tuple[float, float]:
    """(low, high) as floats: finite, low < high."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise FxsparseTypeError(f"bounds must be a (low, high) pair of numbers, got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise FxsparseValueError(f"bounds must be finite with low < high, got {bounds!r}; images in [0, 1] use "
                                 "bounds=(0, 1)")
    return lo, hi


def canonical_norm(norm: str) -> str:
    """'linf' or 'l2', from fxsparse's spelling or AutoAttack's and RobustBench's ('Linf', 'L2')."""
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in NORMS:
        raise FxsparseValueError(f"norm must be 'linf' or 'l2' (AutoAttack's 'Linf' / 'L2' also), got {norm!r}")
    return key


def _check_eps(eps: Any, norm: str, bounds: Tuple[float, float]) -> float:
    """A finite eps >= 0 and, for L-inf, a perturbation, not a rescaling of the image."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise FxsparseValueError(f"eps must be a finite number >= 0, got {eps!r}")
    lo, hi = bounds
    width = hi - lo
    if norm == "linf" and eps > MAX_LINF_FRACTION * width:
        meant = f"{eps:g}/255 = {eps / 255 * width:.4g}" if eps >= 1 else "8/255 = 0.0314"
        raise InputRangeError(
            f"L-inf eps={eps:g} is {eps / width * 255:.0f}/255 of the input range [{lo:g}, {hi:g}]: the attack "
            f"could repaint the image. Did you mean {meant}? eps is in input units (images in [0, 1]); budgets "
            f"above 64/255 of the range are refused")
    return float(eps)


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """What an attacker may do: move each input by at most `eps` in `norm` ("linf" or "l2"), staying inside
    `bounds`. Validated and made canonical on construction (norm lower case, floats)."""

    eps: float
    norm: str = DEFAULT_NORM
    bounds: Tuple[float, float] = DEFAULT_BOUNDS

    def __post_init__(self):
        norm = canonical_norm(self.norm)
        bounds = check_bounds(self.bounds)
        object.__setattr__(self, "eps", _check_eps(self.eps, norm, bounds))
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "bounds", bounds)

    @classmethod
    def resolve(cls, threat: Optional["ThreatModel"] = None, eps: Any = None, norm: Optional[str] = None,
                bounds: Optional[Sequence[float]] = None) -> "ThreatModel":
        """The threat of a public call: `threat` as given, or one built from the keywords (norm "linf" and
        bounds (0, 1) by default); both at once is refused, naming the clash."""
        given = [name for name, v in (("eps", eps), ("norm", norm), ("bounds", bounds)) if v is not None]
        if threat is not None:
            if not isinstance(threat, ThreatModel):
                raise FxsparseTypeError(f"threat must be a fxsparse.ThreatModel, got {type(threat).__name__}; or "
                                        "give eps=, norm= and bounds= instead")
            if given:
                raise FxsparseValueError(
                    f"both threat= and {', '.join(g + '=' for g in given)} were given: give the threat model once, "
                    f"as threat=ThreatModel(eps, norm, bounds) or as the eps=, norm=, bounds= keywords")
            return threat
        if eps is None:
            raise FxsparseTypeError("give the attack budget: eps= (in input units, e.g. eps=8 / 255), or "
                                    "threat=fxsparse.ThreatModel(eps, norm, bounds)")
        return cls(eps, DEFAULT_NORM if norm is None else norm, DEFAULT_BOUNDS if bounds is None else bounds)

    def keywords(self) -> Dict[str, Any]:
        """The attacks' keywords (fxsparse/robust/attacks.py: `attack(model, x, y, eps, *, norm, bounds, ...)`)."""
        return {"eps": self.eps, "norm": self.norm, "bounds": self.bounds}

    def to_dict(self) -> Dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "bounds": list(self.bounds)}

    def check_l2(self, x: torch.Tensor) -> None:
        """An L2 eps no larger than the diameter of the input box (`width * sqrt(values per example)`): beyond
        it every input in the box is within reach, so eps is surely in the wrong units. (L2 3.0 on 224 x 224
        RGB has a diameter of 388; 0.5 on CIFAR, 55.) Nothing to check for L-inf."""
        if self.norm != "l2":
            return
        lo, hi = self.bounds
        diameter = (hi - lo) * math.sqrt(x[0].numel()) if len(x) else math.inf
        if self.eps > diameter:
            raise InputRangeError(
                f"L2 eps={self.eps:g} is larger than the diameter ({diameter:.3g}) of the input box [{lo:g}, "
                f"{hi:g}]^{x[0].numel()}: every input is within reach. Give eps in input units on [0, 1] images "
                "(common values: 0.5 on CIFAR-10, 3.0 on ImageNet)")

    def perturbation(self, x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """Each example's perturbation size in this norm."""
        delta = (adv - x).flatten(1)
        return delta.abs().amax(1) if self.norm == "linf" else delta.norm(dim=1)

    def admits(self, x: torch.Tensor, adv: torch.Tensor) -> bool:
        """Whether every `adv` lies in the eps-ball of its `x` (up to float rounding) and in the bounds."""
        size = self.perturbation(x, adv)
        inside_ball = not bool((size > self.eps * (1 + 1e-5) + 1e-6).any())
        return inside_ball and float(adv.min()) >= self.bounds[0] and float(adv.max()) <= self.bounds[1]


def _check_count(name: str, value: Any, unit: str, *, optional: bool = False, positive: bool = True):
    """An integer (any Integral, numpy's too), positive when asked: a count of batches or examples, a seed."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (positive and value < 1):
        what = f"a positive {unit}" if positive else "an integer"
        raise FxsparseValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What `evaluate` and `search_alpha` share: the threat, the attacks' seed and the batching."""

    threat: ThreatModel
    seed: int = 0
    batch_size: int = 256
    max_examples: Optional[int] = None

    @classmethod
    def of(cls, *, threat=None, eps=None, norm=None, bounds=None, seed: int = 0, batch_size: int = 256,
           max_examples: Optional[int] = None) -> "RunSettings":
        """The public keywords, checked once for both calls."""
        threat = ThreatModel.resolve(threat, eps, norm, bounds)
        return cls(threat, _check_count("seed", seed, "", positive=False),
                   _check_count("batch_size", batch_size, "number of examples"),
                   _check_count("max_examples", max_examples, "number of examples", optional=True))

    def to_dict(self) -> Dict[str, Any]:
        """The settings a resume file must match."""
        return {"eps": self.threat.eps, "norm": self.threat.norm, "bounds": list(self.threat.bounds),
                "seed": self.seed, "batch_size": self.batch_size, "max_examples": self.max_examples}
