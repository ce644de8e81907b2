"""The results of `fxsparse.evaluate` and their views: per attack and column (AttackResult), and over every
attack (Evaluation: the worst case, which column found each loss, Markdown and JSON).

Each column keeps its per-example correctness, so the worst case is the exact per-example minimum over every
column of every attack, and two evaluations on the same data can be compared example by example
(fxsparse/robust/compare.py). The columns, in the order they run (MODES), are described in
fxsparse/robust/evaluation.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fxsparse.errors import FxsparseValueError
from fxsparse.robust.threat import ThreatModel

MODES = ("plain", "bpda", "smooth", "anneal", "transfer")
FULL_MODES = ("plain", "bpda")  # attack every example; the later modes attack the survivors only
MODE_TITLES = {"plain": "as is", "bpda": "BPDA (straight-through)", "smooth": "smooth band",
               "anneal": "annealed band", "transfer": "transfer from alpha 0"}


@dataclasses.dataclass
class AttackResult:
    """Accuracy under one attack, on the model as is (`plain`) and with BPDA gradients (`bpda`)."""

    attack: str
    options: Dict[str, Any]
    plain: Optional[float] = None
    bpda: Optional[float] = None
    smooth: Optional[float] = None
    anneal: Optional[float] = None
    transfer: Optional[float] = None
    bpda_note: str = ""  # why the surrogate columns repeat the plain one, when they do
    seconds: float = 0.0
    correct: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)
    attacked: Dict[str, int] = dataclasses.field(default_factory=dict)  # examples each column attacked
    adversarial: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)  # keep_adversarial

    def column(self, mode: str) -> Optional[float]:
        return getattr(self, mode)

    def found(self) -> Dict[str, int]:
        """Per column, the examples it broke that every earlier column (in MODES order) left robust."""
        out, alive = {}, None
        for mode in MODES:
            if mode not in self.correct:
                continue
            c = self.correct[mode]
            alive = torch.ones_like(c) if alive is None else alive
            out[mode] = int((alive & ~c).sum())
            alive = alive & c
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"attack": self.attack, "options": self.options,
                **{m: getattr(self, m) for m in MODES}, "found": self.found(), "attacked": dict(self.attacked),
                "bpda_note": self.bpda_note, "seconds": round(self.seconds, 2)}


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


@dataclasses.dataclass
class Evaluation:
    """Per-attack results with per-example correctness, so worst cases and paired comparisons are exact."""

    results: List[AttackResult]
    n: int
    eps: float
    norm: str
    seed: int
    operators: int
    bounds: Tuple[float, float] = (0.0, 1.0)  # with eps and norm: the threat model (`threat`)
    comparison: Any = dataclasses.field(default=None, repr=False)  # a Comparison, with evaluate(baseline=...)

    @property
    def threat(self):
        """The ThreatModel the attacks ran under (eps, norm, bounds)."""
        return ThreatModel(self.eps, self.norm, tuple(self.bounds))

    def __getitem__(self, attack: str) -> AttackResult:
        for r in self.results:
            if r.attack == attack:
                return r
        raise FxsparseValueError(f"{attack!r} was not run; ran {[r.attack for r in self.results]}: pass it in "
                                 "evaluate(attacks=...)")

    def worst(self, modes: Sequence[str] = MODES) -> float:
        """Accuracy when each example counts as robust only if every attack, in every mode given, failed: with
        the default modes, the per-example minimum over every column of every attack (the adaptive worst case).
        A survivors-only column (after "bpda") already includes the columns before it."""
        columns = [r.correct[m] for r in self.results for m in modes if m in r.correct]
        if not columns or not self.n:
            return float("nan")
        return float(torch.stack(columns).all(0).float().mean())

    def to_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "eps": self.eps, "norm": self.norm, "bounds": list(self.bounds), "seed": self.seed,
                "operators": self.operators,
                "attacks": [r.to_dict() for r in self.results],
                "worst": {m: self.worst((m,)) for m in self.modes()} | {"any": self.worst()},
                "found": self.found(),
                **({"comparison": self.comparison.to_dict()} if self.comparison is not None else {})}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def modes(self) -> List[str]:
        return [m for m in MODES if any(m in r.correct for r in self.results)]

    def found(self) -> Dict[str, int]:
        """Per column, the examples lost to it first, over the worst case of every attack (attack order, then
        MODES order): which column found each loss."""
        out = {m: 0 for m in self.modes()}
        alive = None
        for r in self.results:
            for mode in MODES:
                if mode in r.correct:
                    c = r.correct[mode]
                    alive = torch.ones_like(c) if alive is None else alive
                    out[mode] += int((alive & ~c).sum())
                    alive = alive & c
        return out

    def to_markdown(self) -> str:
        modes = self.modes()
        head = " | ".join(MODE_TITLES[m] for m in modes)
        lines = [f"| attack | {head} | worst | time |", "|" + "---|" * (len(modes) + 3)]
        for r in self.results:
            options = ", ".join(f"{k}={v}" for k, v in r.options.items())
            name = f"{r.attack} ({options})" if options else r.attack
            cells = []
            for m in modes:
                cell = _pct(r.column(m))
                if m != "plain" and r.bpda_note and r.column(m) is not None and r.attack != "clean":
                    cell += f" (same run: {r.bpda_note})"
                elif m in r.attacked and m not in FULL_MODES and r.bpda_note == "":
                    cell += f" ({r.attacked[m]} attacked)"
                cells.append(cell)
            worst = _pct(self._worst_of(r))
            lines.append(f"| {name} | {' | '.join(cells)} | {worst} | {r.seconds:.1f} s |")
        per_mode = [_pct(self.worst((m,))) if m in FULL_MODES else "" for m in modes]
        found = ", ".join(f"{MODE_TITLES[m]} {k}" for m, k in self.found().items() if k)
        lines.append(f"| worst case, every attack | {' | '.join(per_mode)} | {_pct(self.worst())} "
                     f"(losses found by: {found or 'none'}) | |")
        p = self.worst()
        half = 100 * 1.96 * math.sqrt(p * (1 - p) / self.n) if self.n and p == p else float("nan")
        note = (f"\n{self.n} examples, {self.norm} eps={self.eps:g}, seed {self.seed}, {self.operators} MeanSparse "
                f"operators. Robust to every attack in every column: {_pct(p)} (binomial 95% interval about "
                f"± {half:.1f} points). Columns after BPDA attack only the examples every earlier column left "
                "robust, so they are cumulative.\n")
        verdict = f"\n{self.comparison.to_markdown()}" if self.comparison is not None else ""
        return "\n".join(lines) + "\n" + note + verdict

    @staticmethod
    def _worst_of(r: AttackResult) -> Optional[float]:
        columns = list(r.correct.values())
        return float(torch.stack(columns).all(0).float().mean()) if columns and len(columns[0]) else None

    def _repr_markdown_(self) -> str:  # a notebook shows the table
        return self.to_markdown()
