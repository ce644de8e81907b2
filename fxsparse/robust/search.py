"""Choose alpha on a validation split: robust accuracy under an attack, subject to a clean-accuracy budget.

`search_alpha` sees only the validation data it is given (the test split is for `fxsparse.evaluate`, one
call later), scores each alpha by robust accuracy under the chosen attack (BPDA by default: a plain gradient
attack rewards the alpha that hides gradients best) and keeps the alphas that lose at most `max_clean_drop`
clean accuracy against alpha = 0. Every configuration tried is in the returned table.

Strategies: "grid" tries `alphas`; "refine" then bisects around the best one `rounds` times. With
`per_stage`, a coordinate ascent follows: each stage (a group of sites) tries every grid alpha in turn while
the others keep theirs.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torch import nn

from fxsparse.controls import set_alpha
from fxsparse.errors import FxsparseValueError, SelectionError
from fxsparse.robust.evaluation import MODES, evaluate, example_fingerprints, iter_batches, parse_attack
from fxsparse.ops import meansparse_ops

DEFAULT_ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
SCORES = {"bpda": ("bpda",), "plain": ("plain",), "worst": MODES}


@dataclasses.dataclass
class Trial:
    """One configuration tried: its alphas (a float, or per stage), validation accuracies, admissibility."""

    phase: str
    alpha: Union[float, Dict[str, float]]
    clean: float
    robust: float
    allowed: bool


@dataclasses.dataclass
class SearchResult:
    alpha: Union[float, Dict[str, float]]  # what to pass to fxsparse.set_alpha: a float, or {site: alpha}
    clean: float                           # validation accuracies at the chosen alpha
    robust: float
    table: List[Trial]
    attack: str
    score: str
    max_clean_drop: float
    n_val: int
    stages: Dict[str, List[str]]
    fingerprints: frozenset = dataclasses.field(default=frozenset(), repr=False)

    @property
    def baseline(self) -> Trial:
        return self.table[0]

    def to_markdown(self) -> str:
        lines = ["| phase | alpha | val clean | val robust | within clean budget |", "|---|---|---|---|---|"]
        for t in self.table:
            alpha = t.alpha if isinstance(t.alpha, float) else ", ".join(f"{k}: {v:g}" for k, v in t.alpha.items())
            chosen = " **chosen**" if t.alpha == self._chosen_display() else ""
            lines.append(f"| {t.phase} | {alpha if isinstance(alpha, str) else f'{alpha:g}'}{chosen} | "
                         f"{100 * t.clean:.1f}% | {100 * t.robust:.1f}% | {'yes' if t.allowed else 'no'} |")
        return "\n".join(lines) + (f"\n\n{self.n_val} validation examples; score: {self.attack} "
                                   f"({self.score}); clean accuracy may drop by at most {100 * self.max_clean_drop:g} "
                                   "percentage point(s) from alpha = 0.\n")

    def _chosen_display(self):
        if isinstance(self.alpha, float):
            return self.alpha
        return {stage: self.alpha[sites[0]] for stage, sites in self.stages.items()}


def stage_of(site: str) -> str:
    """The stage a site belongs to: its path up to the first part with a digit ("stages.0", "layer1",
    "relu1", "blocks.3"), or its first part when none has one."""
    parts = site.split(".")
    for i, part in enumerate(parts):
        if re.search(r"\d", part):
            return ".".join(parts[: i + 1])
    return parts[0]


def _stages(sites: Sequence[str], per_stage) -> Dict[str, List[str]]:
    if per_stage is True or per_stage == "auto":
        out: Dict[str, List[str]] = {}
        for s in sites:
            out.setdefault(stage_of(s), []).append(s)
        return out
    if isinstance(per_stage, Mapping):
        import fnmatch

        out = {}
        for stage, patterns in per_stage.items():
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            hits = [s for s in sites if any(fnmatch.fnmatchcase(s, p) for p in patterns)]
            if not hits:
                raise SelectionError(f"stage {stage!r} ({patterns}) matches no site; sites: {list(sites)[:8]}")
            out[stage] = hits
        return out
    raise SelectionError(f"per_stage must be False, True / 'auto', or a mapping of stage name to site globs, "
                         f"got {per_stage!r}")


def search_alpha(
    model: nn.Module,
    val_data: Any,
    *,
    eps: float,
    norm: str = "linf",
    attack: str = "pgd",
    score: str = "bpda",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    max_clean_drop: float = 0.01,
    strategy: str = "grid",
    rounds: int = 2,
    per_stage: Union[bool, str, Mapping[str, Any]] = False,
    seed: int = 0,
    batch_size: int = 256,
    max_examples: Optional[int] = None,
    progress: Optional[bool] = None,
    apply: bool = True,
) -> SearchResult:
    """Pick alpha for a calibrated model on `val_data` (validation only; never the test split).

    Args:
        attack: the attack that scores an alpha, with options ("pgd:steps=20", "apgd-ce", "square").
        score: "bpda" (attack through straight-through gradients), "plain", or "worst" (an example counts
            as robust only if it survives both).
        max_clean_drop: the largest clean-accuracy loss (a fraction: 0.01 is one point) against alpha = 0.
        strategy: "grid", or "refine" (then bisect around the best grid alpha `rounds` times).
        per_stage: also tune one alpha per stage (True: stages from site names, see `stage_of`; or a mapping
            {stage name: site glob or globs}).
        apply: leave the model at the chosen alpha (otherwise restore the alphas it had).
    """
    if score not in SCORES:
        raise FxsparseValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
    if strategy not in ("grid", "refine"):
        raise FxsparseValueError(f"strategy must be 'grid' or 'refine', got {strategy!r}")
    grid = sorted({float(a) for a in alphas} | {0.0})
    if any(a < 0 for a in grid):
        raise SelectionError(f"alphas must be >= 0, got {list(alphas)}")
    ops = meansparse_ops(model)
    if not ops:
        raise SelectionError("the model has no MeanSparse operators; run fxsparse.prepare or sparsify first")
    parse_attack(attack)  # fail early on a bad attack name
    batches = list(iter_batches(val_data, batch_size, max_examples))  # iterated once: same batches per trial
    if not batches:
        raise FxsparseValueError("the validation data is empty")
    before = {name: float(op.alpha) for name, op in ops.items()}
    stages = _stages(list(ops), per_stage) if per_stage else {}
    table: List[Trial] = []

    def trial(phase: str, alpha, shown=None) -> Trial:
        set_alpha(model, alpha)
        report = evaluate(model, batches, eps=eps, norm=norm, attacks=["clean", attack], modes=SCORES[score],
                          seed=seed, progress=progress)
        clean = report["clean"].plain if report["clean"].plain is not None else report["clean"].bpda
        robust = report.worst(SCORES[score]) if score == "worst" else getattr(report.results[1], score)
        allowed = not table or clean >= table[0].clean - max_clean_drop - 1e-12
        table.append(Trial(phase, alpha if shown is None else shown, clean, robust, allowed))
        return table[-1]

    try:
        best_alpha, best = 0.0, trial("grid", 0.0)
        for a in grid[1:]:
            t = trial("grid", a)
            if t.allowed and t.robust > best.robust:
                best_alpha, best = a, t
        if strategy == "refine":
            best_alpha, best = _refine(trial, grid, best_alpha, best, rounds)
        chosen: Union[float, Dict[str, float]] = best_alpha
        if stages:
            chosen, best = _per_stage(trial, grid, stages, best_alpha, best)
    except BaseException:
        set_alpha(model, before)
        raise
    set_alpha(model, chosen if apply else before)
    fingerprints = frozenset(f for x, y in batches for f in example_fingerprints(x, y))
    return SearchResult(chosen, best.clean, best.robust, table, attack, score, max_clean_drop,
                        sum(len(y) for _, y in batches), stages, fingerprints)


def _refine(trial, grid, best_alpha, best, rounds):
    """Bisect between the best alpha and its neighbours, `rounds` times."""
    points = list(grid)
    for r in range(rounds):
        j = points.index(best_alpha)
        around = points[max(j - 1, 0): j + 2]
        mids = [round((a + b) / 2, 6) for a, b in zip(around, around[1:])]
        for a in mids:
            t = trial(f"refine {r + 1}", a)
            if t.allowed and t.robust > best.robust:
                best_alpha, best = a, t
        points = sorted(set(points) | set(mids))
    return best_alpha, best


def _per_stage(trial, grid, stages, start: float, best):
    """Coordinate ascent: one stage at a time over the grid, the others fixed; keeps strict improvements."""
    current = {stage: start for stage in stages}
    for stage in stages:
        for a in grid:
            if a == current[stage]:
                continue
            candidate = {**current, stage: a}
            per_site = {site: candidate[s] for s, sites in stages.items() for site in sites}
            t = trial(f"stage {stage}", per_site, shown=candidate)
            if t.allowed and t.robust > best.robust:
                current, best = candidate, t
    return {site: current[s] for s, sites in stages.items() for site in sites}, best
