"""Before / after on the same examples: a paired comparison, per attack, with an exact McNemar test.

The original and the sparsified model are evaluated on the same examples with the same attack seeds, so their
per-example outcomes are paired. Only the discordant examples carry information: `gained` (wrong before,
right after) and `lost` (right before, wrong after). Under "no difference" each discordant example is a fair
coin, so the two-sided p-value is the exact binomial tail `2 * P(Bin(gained + lost, 1/2) <= min(gained, lost))`
(McNemar's exact test). A difference with p >= `level` (0.05) is reported as within noise.

    before = fxsparse.evaluate(model, test, eps=8 / 255)
    after = fxsparse.evaluate(gm, test, eps=8 / 255, baseline=before)   # after.comparison
    print(fxsparse.compare(before, after).to_markdown())
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from fxsparse.errors import FxsparseTypeError, FxsparseValueError

LEVEL = 0.05


def wilson(k: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value for `gained` vs `lost` discordant pairs (1.0 when there are none)."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    # the binomial(n, 1/2) tail in log space (log-sum-exp over lgamma terms): milliseconds at n = 50,000,
    # where the exact integer sum takes seconds
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    top = max(logs)
    log_tail = top + math.log(math.fsum(math.exp(v - top) for v in logs)) - n * math.log(2)
    return min(1.0, 2 * math.exp(log_tail))


def verdict(difference: float, p_value: float, level: float = LEVEL) -> str:
    if p_value >= level:
        return "within noise"
    return "better" if difference > 0 else "worse"


@dataclasses.dataclass
class PairedRow:
    """One attack and mode: accuracy before and after, the discordant counts, McNemar's p and the verdict."""

    attack: str
    mode: str
    before: float
    after: float
    gained: int  # wrong before, right after
    lost: int    # right before, wrong after
    n: int
    p_value: float
    verdict: str

    @property
    def difference(self) -> float:
        return self.after - self.before

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "difference": self.difference}


@dataclasses.dataclass
class Comparison:
    rows: List[PairedRow]
    n: int
    level: float = LEVEL

    def row(self, attack: str, mode: str = "bpda") -> PairedRow:
        """The row of `attack` (its label, e.g. "pgd (steps=20)", or its bare name: the first such row)."""
        for r in self.rows:
            if (r.attack == attack or r.attack.split(" (")[0] == attack) and r.mode == mode:
                return r
        raise FxsparseValueError(f"no row for {attack!r} ({mode}); rows: {[(r.attack, r.mode) for r in self.rows]}"
                                 ": evaluate that attack on both models")

    def to_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "level": self.level, "rows": [r.to_dict() for r in self.rows]}

    def to_markdown(self) -> str:
        lines = ["| attack | column | before | after | difference | gained / lost | McNemar p | verdict |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.attack} | {r.mode} | {100 * r.before:.1f}% | {100 * r.after:.1f}% | "
                         f"{100 * r.difference:+.1f} | {r.gained} / {r.lost} | {r.p_value:.3g} | {r.verdict} |")
        return ("\n".join(lines) + f"\n\nPaired on the same {self.n} examples (original vs sparsified; the original "
                f"has no operator, so its BPDA column is its plain one). gained: wrong before, right after; lost: the "
                f"reverse. Exact McNemar test on those; p >= {self.level:g} is within noise: no detectable "
                "difference.\n")


def label(result) -> str:
    """An attack with its options, as the tables show it: "pgd (steps=20)"; attacks pair by this label."""
    options = ", ".join(f"{k}={v}" for k, v in result.options.items())
    return f"{result.attack} ({options})" if options else result.attack


def _column(result, mode: str) -> Optional[torch.Tensor]:
    """The baseline's outcomes for `mode`: a model without operators ran each column as its plain one."""
    return result.correct.get(mode, result.correct.get("plain"))


def _row(attack: str, mode: str, before: torch.Tensor, after: torch.Tensor, level: float) -> PairedRow:
    gained = int((~before & after).sum())
    lost = int((before & ~after).sum())
    n = len(before)
    b, a = float(before.float().mean()), float(after.float().mean())
    p = mcnemar_exact(gained, lost)
    return PairedRow(attack, mode, b, a, gained, lost, n, p, verdict(a - b, p, level))


def compare(before, after, *, level: float = LEVEL) -> Comparison:
    """The paired comparison of two Evaluations of the same examples (original first, sparsified second):
    one row per attack both ran and per column of `after`, and a worst-case row (robust to every attack)."""
    # an Evaluation is recognised by its fields: evaluation.py imports this module, not the other way round
    if not all(hasattr(e, "results") and hasattr(e, "n") for e in (before, after)):
        raise FxsparseTypeError("compare takes two Evaluations (from fxsparse.evaluate), got "
                                f"{type(before).__name__} and {type(after).__name__}")
    same = {k: (getattr(before, k), getattr(after, k)) for k in ("n", "eps", "norm", "bounds", "seed")}
    differ = {k: v for k, v in same.items() if v[0] != v[1]}
    if differ:
        raise FxsparseValueError(f"the two evaluations are not paired (they differ in {differ}): evaluate both "
                                 "models on the same data with the same eps, norm, bounds and seed")
    rows: List[PairedRow] = []
    worst_before, worst_after = [], []
    by_label = {label(r): r for r in before.results}
    for r_after in after.results:
        r_before = by_label.get(label(r_after))
        if r_before is None:
            continue
        for mode in list(r_after.correct):  # every column the sparsified model ran: surrogates and transfer too
            a, b = r_after.correct.get(mode), _column(r_before, mode)
            if a is None or b is None or (mode != "plain" and r_after.bpda_note and "plain" in r_after.correct):
                continue  # no column, or one that repeats the plain one
            if len(a) != len(b):
                raise FxsparseValueError(f"{r_after.attack}: {len(b)} outcomes before, {len(a)} after: evaluate "
                                         "both models on the same data")
            rows.append(_row(label(r_after), mode, b, a, level))
            worst_before.append(b)
            worst_after.append(a)
    if not rows:
        raise FxsparseValueError("the two evaluations share no attack: run the same attacks on both")
    if len(rows) > 1:
        rows.append(_row("worst case, every attack", "both", torch.stack(worst_before).all(0),
                         torch.stack(worst_after).all(0), level))
    return Comparison(rows, after.n, level)
