"""A robustness curve: `evaluate(model, data, eps=[...])`, one evaluation per budget, as a table and a plot.

One eps says how robust a model is at one budget; a curve shows where robustness falls off, and a defence
that only hides gradients shows as a curve that does not reach 0 at large budgets. Each point is a full
`Evaluation` (every attack, both modes), run with the same seed and data; each budget is a ThreatModel
(fxsparse/robust/threat.py) with the curve's norm and bounds, all checked before the first point runs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from fxsparse.errors import FxsparseTypeError, FxsparseValueError
from fxsparse.robust.threat import ThreatModel


@dataclasses.dataclass
class RobustnessCurve:
    """One `Evaluation` per eps, in the order given; `worst` is the per-example worst case over all attacks."""

    evaluations: List[Any]

    @property
    def eps(self) -> List[float]:
        return [e.eps for e in self.evaluations]

    def __getitem__(self, index: int):
        return self.evaluations[index]

    def __len__(self) -> int:
        return len(self.evaluations)

    def worst(self) -> List[float]:
        return [e.worst() for e in self.evaluations]

    def to_dict(self) -> Dict[str, Any]:
        return {"eps": self.eps, "worst": self.worst(), "evaluations": [e.to_dict() for e in self.evaluations]}

    def to_markdown(self) -> str:
        first = self.evaluations[0]
        columns = [(r.attack, mode) for r in first.results for mode in ("plain", "bpda")
                   if getattr(r, mode) is not None and not (mode == "bpda" and r.attack == "clean")]
        head = ["eps"] + [f"{a} ({m})" if a != "clean" else a for a, m in columns] + ["worst case"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in self.evaluations:
            cells = [f"{e.eps:g}"] + [f"{100 * getattr(e[a], m):.1f}%" for a, m in columns] + [f"{100 * e.worst():.1f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        return f"Robustness curve ({first.norm}, {first.n} examples)\n\n" + "\n".join(lines) + "\n"

    def _repr_markdown_(self) -> str:  # a notebook shows the table
        return self.to_markdown()

    def plot(self, path=None, *, ax=None, size: Sequence[float] = (7.0, 4.5), dpi: int = 100):
        """Accuracy against eps, per attack (BPDA where run) and the worst case: a matplotlib Figure, drawn
        into `ax` when given, written to `path` only when given one (fxsparse/robust/plots.py's rules)."""
        from fxsparse.robust.plots import _figure, _finish

        own = ax is None
        fig, ax = _figure(size) if own else (ax.figure, ax)
        first = self.evaluations[0]
        for r in first.results:
            mode = "bpda" if r.bpda is not None and r.attack != "clean" else "plain"
            ax.plot(self.eps, [100 * getattr(e[r.attack], mode) for e in self.evaluations], "o-",
                    label=r.attack if mode == "plain" else f"{r.attack} (BPDA)")
        ax.plot(self.eps, [100 * w for w in self.worst()], "k--", label="worst case")
        ax.set_xlabel(f"eps ({first.norm})")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"robustness curve, {first.n} examples")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        return _finish(fig, path, dpi, own)


def robustness_curve(evaluate: Callable, model, data, eps: Sequence[float], **options) -> RobustnessCurve:
    """`evaluate` at each eps (what `fxsparse.evaluate(eps=[...])` dispatches to). A checkpoint file gets one
    file per eps (`path.eps<i>`); a baseline must be a RobustnessCurve over the same eps."""
    eps = list(eps)
    if not eps:
        raise FxsparseValueError("eps=[] gives no curve: give one or more budgets, e.g. eps=[1/255, 2/255, 4/255]")
    baseline = options.pop("baseline", None)
    if baseline is not None and not (isinstance(baseline, RobustnessCurve) and baseline.eps == [float(e) for e in eps]):
        raise FxsparseTypeError("a robustness curve's baseline must be the original model's curve over the same eps "
                                "(fxsparse.evaluate(original, data, eps=[...]))")
    checkpoint: Optional[str] = options.pop("checkpoint", None)
    given = options.pop("threat", None), options.pop("norm", None), options.pop("bounds", None)
    threats = [ThreatModel.resolve(given[0], e, *given[1:]) for e in eps]  # every budget checked before the first
    evaluations = []
    for i, threat in enumerate(threats):
        point = dict(options, baseline=baseline[i] if baseline is not None else None,
                     checkpoint=None if checkpoint is None else f"{os.fspath(checkpoint)}.eps{i}")
        evaluations.append(evaluate(model, data, threat=threat, **point))
    return RobustnessCurve(evaluations)
