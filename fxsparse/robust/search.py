"""Choose alpha on a validation split: robust accuracy under an attack, subject to a clean-accuracy budget,
and no more alpha than the noise of the validation split justifies.

`search_alpha` sees only the validation data it is given (the test split is for `fxsparse.evaluate`, one
call later), scores each alpha by robust accuracy under the chosen attack (by default the adaptive worst
case: an example counts as robust only if it survives the attack as is, through identity BPDA, through the
smooth-band surrogates and by transfer from alpha 0, see `fxsparse.evaluate`; a plain gradient attack rewards
the alpha that hides gradients best, and identity BPDA overstates a thresholding operator) and keeps the
alphas that lose at most `max_clean_drop` clean accuracy against alpha = 0. Every configuration tried is in
the returned table, with 95% Wilson intervals.

The choice rule (RULE, also in `SearchResult.rule`): every alpha is scored on the same examples with the
same attack seeds, so two alphas are compared example by example. "Within noise of" means an exact McNemar
test on the examples one alpha keeps robust and the other does not gives p >= 0.05. Among the alphas inside
the clean budget, `best` has the highest robust accuracy; the pick is the smallest alpha within noise of
`best` and itself above alpha = 0 beyond noise (a smaller alpha changes the model less and costs less clean
accuracy). When `best` itself is within
noise of alpha = 0, the verdict is "no detectable gain" and the pick is 0 (the model unchanged); a
`SearchWarning` says so. A pick at the top of the grid also warns: larger alphas were not tried
(`strategy="refine"` extends the grid upward when the best alpha is at its top).

Strategies: "grid" tries `alphas`; "refine" then bisects around the best one `rounds` times (and adds larger
alphas when the best is the largest tried). With `per_stage`, a coordinate ascent follows from the pick:
each stage (a group of sites) tries every grid alpha in turn while the others keep theirs, and a change is
kept only when its gain over the current configuration is beyond noise (McNemar p < 0.05).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fxsparse.util import progress_bar
from fxsparse.operators import set_alpha
from fxsparse.calibrate.distributed import failing_together
from fxsparse.errors import DistributedError, FxsparseValueError, PersistenceError, SearchWarning, SelectionError
from fxsparse.robust.compare import LEVEL, mcnemar_exact, wilson
from fxsparse.robust.evaluation import MODES, evaluate, parse_attack
from fxsparse.files.resume import ResumeFile
from fxsparse.robust.attacks import reference_package
from fxsparse.robust.guards import score_attack, validation_batches
from fxsparse.robust.sharding import example_fingerprints, gather_strings
from fxsparse.robust.threat import RunSettings, ThreatModel
from fxsparse.robust.outputs import LogitsFn
from fxsparse.ops import meansparse_ops

DEFAULT_ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)  # shared by search_alpha, the demo and the CLI
SCORES = {"adaptive": MODES, "bpda": ("bpda",), "plain": ("plain",), "worst": ("plain", "bpda"),
          "smooth": ("smooth",), "transfer": ("transfer",)}
DEFAULT_SCORE = "adaptive"
# without the reference APGD: PGD with a cosine step schedule, APGD's momentum, best-iterate tracking and
# restarts (on the digits model, within 2 of 359 test examples of APGD-CE under BPDA: see the README)
FALLBACK_ATTACK = "pgd:steps=50,restarts=2,schedule=cosine,momentum=0.75"
RULE = ("the smallest alpha inside the clean budget whose robust accuracy is within noise of the best alpha's and "
        "above alpha 0's beyond noise (exact McNemar test, paired on the same examples: within noise when "
        f"p >= {LEVEL:g}); 0 when no alpha is above 0 beyond noise")
NO_GAIN = "no detectable gain"


def default_attack() -> str:
    """The search's default score attack: APGD-CE (reference implementation) when pyautoattack is installed,
    else FALLBACK_ATTACK. The default score runs it in every column of `fxsparse.evaluate` (score="adaptive")."""
    return "apgd-ce" if reference_package() is not None else FALLBACK_ATTACK  # pyautoattack or git autoattack


def paired_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact McNemar p-value of two per-example outcome vectors on the same examples."""
    return mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum()))


@dataclasses.dataclass
class Trial:
    """One configuration tried: its alphas (a float, or per stage), validation accuracies, admissibility,
    95% Wilson intervals, and McNemar p-values of its robust outcomes against alpha = 0 and the best."""

    phase: str
    alpha: Union[float, Dict[str, float]]
    clean: float
    robust: float
    allowed: bool
    n: int = 0
    clean_interval: Tuple[float, float] = (0.0, 1.0)
    robust_interval: Tuple[float, float] = (0.0, 1.0)
    p_vs_zero: float = 1.0
    p_vs_best: float = 1.0
    robust_correct: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "robust_correct"}


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
    verdict: str = ""                      # "gain beyond noise" or NO_GAIN
    best_alpha: Union[float, Dict[str, float], None] = None  # highest robust accuracy in the clean budget
    rule: str = RULE
    notes: List[str] = dataclasses.field(default_factory=list)  # the warnings raised, e.g. top of the grid

    @property
    def baseline(self) -> Trial:
        return self.table[0]

    @property
    def gain(self) -> bool:
        return self.verdict != NO_GAIN

    def plot(self, path=None, **options):
        """A matplotlib Figure of clean and robust validation accuracy against alpha, with intervals and the
        chosen alpha marked (the `plot` extra), written to `path` when given: fxsparse/robust/plots.py."""
        from fxsparse.robust.plots import plot_search

        return plot_search(self, path, **options)

    def to_markdown(self) -> str:
        lines = ["| phase | alpha | val clean (95% CI) | val robust (95% CI) | vs alpha 0: p | vs best: p | "
                 "within clean budget |", "|---|---|---|---|---|---|---|"]
        chosen = self._chosen_display()
        if isinstance(chosen, dict) and len(set(chosen.values())) == 1:  # every stage kept one alpha
            chosen = next(iter(chosen.values()))
        row = next((i for i, t in enumerate(self.table) if t.alpha == chosen), None)
        for i, t in enumerate(self.table):
            alpha = f"{t.alpha:g}" if isinstance(t.alpha, float) else ", ".join(f"{k}: {v:g}" for k, v in t.alpha.items())
            mark = " **chosen**" if i == row else ""
            lines.append(f"| {t.phase} | {alpha}{mark} | {_pct_ci(t.clean, t.clean_interval)} | "
                         f"{_pct_ci(t.robust, t.robust_interval)} | {t.p_vs_zero:.2g} | {t.p_vs_best:.2g} | "
                         f"{'yes' if t.allowed else 'no'} |")
        notes = "".join(f"\n\nNote: {n}" for n in self.notes if not n.startswith(NO_GAIN))  # the verdict says it
        return "\n".join(lines) + (f"\n\n{self.n_val} validation examples; score: {self.attack} "
                                   f"({self.score}); clean accuracy may drop by at most {100 * self.max_clean_drop:g} "
                                   f"percentage point(s) from alpha = 0. Rule: {self.rule}.\n\n"
                                   f"Verdict: {self.verdict_line()}{notes}\n")

    def verdict_line(self) -> str:
        zero = self.baseline
        if self.verdict == NO_GAIN:
            best = next((t for t in self.table if t.alpha == self.best_alpha), zero)
            return (f"{NO_GAIN}: the best alpha, {best.alpha:g} ({100 * best.robust:.1f}% robust), is within the "
                    f"noise of {self.n_val} validation examples of alpha = 0 ({100 * zero.robust:.1f}%, McNemar "
                    f"p = {best.p_vs_zero:.2g}); alpha = {self._alpha_text()} (the model unchanged)")
        return (f"alpha = {self._alpha_text()}: {100 * self.robust:.1f}% robust vs {100 * zero.robust:.1f}% at "
                f"alpha = 0 on validation, a gain beyond noise")

    def _alpha_text(self) -> str:
        a = self._chosen_display()
        return f"{a:g}" if isinstance(a, float) else ", ".join(f"{k}: {v:g}" for k, v in a.items())

    def _chosen_display(self):
        if isinstance(self.alpha, float):
            return self.alpha
        return {stage: self.alpha[sites[0]] for stage, sites in self.stages.items()}

    def _repr_markdown_(self) -> str:  # a notebook shows the table
        return self.to_markdown()


def _pct_ci(p: float, ci: Tuple[float, float]) -> str:
    return f"{100 * p:.1f}% ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"


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
    model: nn.Module, val_data: Any, *, eps: Optional[float] = None, norm: Optional[str] = None,
    attack: Optional[str] = None, score: str = DEFAULT_SCORE, alphas: Sequence[float] = DEFAULT_ALPHAS,
    max_clean_drop: float = 0.01, strategy: str = "grid", rounds: int = 2,
    per_stage: Union[bool, str, Mapping[str, Any]] = False, seed: int = 0, batch_size: int = 256,
    max_examples: Optional[int] = None, progress: Optional[bool] = None, apply: bool = True,
    bounds: Optional[Tuple[float, float]] = None, threat: Optional[ThreatModel] = None, logits: LogitsFn = None,
    checkpoint: Union[str, "os.PathLike[str]", None] = None,
) -> SearchResult:
    """Pick alpha for a calibrated model on `val_data` (validation only; never the test split), by the rule
    in the module docstring (RULE); the result says whether the gain over alpha = 0 is beyond noise.

    Args:
        eps, norm, bounds, threat: the threat model, as in `fxsparse.evaluate` (the keywords, or one
            `fxsparse.ThreatModel`); seed, batch_size, max_examples, logits also as there.
        attack: the attack that scores an alpha, with options ("apgd-ce", "pgd:steps=20", "square"); default
            `default_attack()`: APGD-CE, or a scheduled PGD with restarts without pyautoattack.
        score: "adaptive" (default: an example counts as robust only if it survives every column of
            `fxsparse.evaluate`: as is, identity BPDA, smooth and annealed surrogates, transfer from alpha 0;
            later columns attack the survivors only), or one column for comparison: "bpda" (identity
            straight-through), "plain", "smooth", "transfer", or "worst" (as is and BPDA, the old default's
            pair).
        max_clean_drop: the largest clean-accuracy loss (a fraction: 0.01 is one point) against alpha = 0.
        strategy: "grid", or "refine" (then bisect around the best grid alpha `rounds` times, and extend the
            grid upward while the best alpha is its largest).
        per_stage: also tune one alpha per stage (True: stages from site names, see `stage_of`; or a mapping
            {stage name: site glob or globs}).
        apply: leave the model at the chosen alpha (otherwise restore the alphas it had).
        checkpoint: a file recording every finished trial (atomically; one file per rank); rerunning the same
            call replays them without attacking again and gives the uninterrupted search's result. Deleted
            when the search finishes.

    Under torch.distributed, `val_data` is this rank's shard: every trial is scored over the union of the
    shards (see `fxsparse.evaluate`), so every rank takes the same decisions and returns the same result.
    One progress bar counts the trials (alphas x the attack), with the current alpha and its robust accuracy.
    """
    attack = score_attack(default_attack()) if attack is None else attack  # warns when it is the fallback
    grid = _check_search(score, strategy, alphas)
    settings = RunSettings.of(threat=threat, eps=eps, norm=norm, bounds=bounds, seed=seed, batch_size=batch_size,
                              max_examples=max_examples)
    ops = meansparse_ops(model)
    if not ops:
        raise SelectionError("the model has no MeanSparse operators; run fxsparse.prepare or sparsify first")
    parse_attack(attack)  # fail early on a bad attack name
    batches = validation_batches(val_data, settings.batch_size, settings.max_examples)  # the same every trial
    before = {name: float(op.alpha) for name, op in ops.items()}
    stages = _stages(list(ops), per_stage) if per_stage else {}
    with failing_together("search_alpha's checkpoint", DistributedError):  # a rank's own file can differ
        replay = _Replay(checkpoint, dict(attack=attack, score=score, max_clean_drop=float(max_clean_drop),
                                          sites=sorted(ops), **settings.to_dict()))
    trials = _Trials(model, batches, settings, attack, score, float(max_clean_drop), logits, progress, replay,
                     len(grid) + len(stages) * (len(grid) - 1))
    try:
        chosen, best, verdict = _run(trials, grid, strategy, rounds, stages)
    except BaseException:
        set_alpha(model, before)
        raise
    finally:
        trials.bar.close()
    set_alpha(model, chosen if apply else before)
    result = _result(trials, batches, chosen, best, verdict, stages)
    _warn(result)
    replay.discard()
    return result


def _check_search(score: str, strategy: str, alphas: Sequence[float]) -> List[float]:
    """The score and strategy known; the grid: the alphas (finite, >= 0) and 0, sorted."""
    if score not in SCORES:
        raise FxsparseValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
    if strategy not in ("grid", "refine"):
        raise FxsparseValueError(f"strategy must be 'grid' or 'refine', got {strategy!r}")
    try:
        grid = sorted({float(a) for a in alphas} | {0.0})
    except (TypeError, ValueError):
        raise SelectionError(f"alphas must be numbers, got {alphas!r}") from None
    if any(a < 0 or not math.isfinite(a) for a in grid):
        raise SelectionError(f"alphas must be finite and >= 0, got {list(alphas)}")
    return grid


class _Trials:
    """The search's trials, in order: each scores one configuration with `evaluate` on the validation batches
    (or replays it from the checkpoint) and adds a Trial to `table`; calling it runs one."""

    def __init__(self, model: nn.Module, batches, settings: RunSettings, attack: str, score: str,
                 max_clean_drop: float, logits: LogitsFn, progress: Optional[bool], replay: "_Replay", total: int):
        self.model, self.batches, self.settings, self.attack, self.score = model, batches, settings, attack, score
        self.max_clean_drop, self.logits, self.progress, self.replay = max_clean_drop, logits, progress, replay
        self.table: List[Trial] = []
        self.bar = progress_bar(total, "alpha search", "trial", progress)

    def _outcomes(self, phase: str, alpha) -> Tuple[torch.Tensor, torch.Tensor]:
        """(clean, robust) per-example correctness at `alpha`: replayed, or evaluated and recorded."""
        saved = self.replay.next(phase, alpha)
        if saved is not None:
            return saved
        set_alpha(self.model, alpha)
        modes = SCORES[self.score]
        report = evaluate(self.model, self.batches, threat=self.settings.threat, attacks=["clean", self.attack],
                          modes=modes, seed=self.settings.seed, progress=self.progress, logits=self.logits)
        clean_correct = next(iter(report["clean"].correct.values()))  # every column of "clean" is one run
        columns = report.results[1].correct
        robust_correct = torch.stack([columns[m] for m in modes if m in columns]).all(0)
        self.replay.record(phase, alpha, clean_correct, robust_correct)
        return clean_correct, robust_correct

    def __call__(self, phase: str, alpha, shown=None) -> Trial:
        clean_correct, robust_correct = self._outcomes(phase, alpha)
        table, n = self.table, len(robust_correct)
        clean, robust = float(clean_correct.float().mean()), float(robust_correct.float().mean())
        allowed = not table or clean >= table[0].clean - self.max_clean_drop - 1e-12
        t = Trial(phase, alpha if shown is None else shown, clean, robust, allowed, n,
                  wilson(int(clean_correct.sum()), n), wilson(int(robust_correct.sum()), n),
                  paired_p(robust_correct, table[0].robust_correct) if table else 1.0,
                  robust_correct=robust_correct)
        table.append(t)
        self.bar.update(1)
        shown_alpha = t.alpha if isinstance(t.alpha, float) else "per stage"
        self.bar.set_postfix_str(f"alpha {shown_alpha}: robust {100 * robust:.1f}%")
        return t


def _run(trials: _Trials, grid: List[float], strategy: str, rounds: int, stages) -> Tuple[Any, Trial, str]:
    """The grid, the refinement, the choice by RULE, then the per-stage ascent: (alpha, its trial, verdict)."""
    for a in grid:
        trials("grid", a)
    if strategy == "refine":
        _refine(trials, trials.table, grid, rounds)
    chosen, best, verdict = _choose(trials.table)
    if stages:
        chosen, best = _per_stage(trials, grid, stages, chosen, best)
    return chosen, best, verdict


def _result(trials: _Trials, batches, chosen, best: Trial, verdict: str, stages) -> SearchResult:
    """The SearchResult: the table with p-values against the best scalar alpha, and the validation examples'
    fingerprints (so `evaluate(search=...)` can refuse a test split that shares one)."""
    table = trials.table
    fingerprints = frozenset(gather_strings([f for x, y in batches for f in example_fingerprints(x, y)]))
    best_scalar = _best([t for t in table if isinstance(t.alpha, float)])
    for t in table:
        t.p_vs_best = paired_p(t.robust_correct, best_scalar.robust_correct)
    return SearchResult(chosen, best.clean, best.robust, table, trials.attack, trials.score, trials.max_clean_drop,
                        table[0].n, stages, fingerprints, verdict, best_scalar.alpha)


class _Replay:
    """The search's checkpoint: finished trials in order (their per-example outcomes); a rerun replays them.
    Trials come in a fixed order given their outcomes, so replaying the saved ones reproduces every decision;
    a trial asked for out of that order means the file belongs to another search, and is refused."""

    def __init__(self, path, config: Mapping[str, Any]):
        self.file = ResumeFile(path, "alpha search", config) if path is not None else None
        self.saved, self.done, self.index = {}, [], 0
        if self.file is not None:
            self.saved, progress = self.file.load()
            self.done = progress.get("trials", [])

    def next(self, phase: str, alpha):
        i, self.index = self.index, self.index + 1
        if i >= len(self.done):
            return None
        if self.done[i] != [phase, _json_alpha(alpha)]:
            raise PersistenceError(f"{self.file.path} records another search (trial {i} was {self.done[i]}, "
                                   f"this one is {[phase, _json_alpha(alpha)]}); delete it to start over")
        return self.saved[f"{i}/clean"], self.saved[f"{i}/robust"]

    def record(self, phase: str, alpha, clean: torch.Tensor, robust: torch.Tensor) -> None:
        if self.file is None:
            return
        i = len(self.done)
        self.done.append([phase, _json_alpha(alpha)])
        self.saved[f"{i}/clean"], self.saved[f"{i}/robust"] = clean, robust
        self.file.save(self.saved, {"trials": self.done})

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()


def _json_alpha(alpha):
    return {k: float(v) for k, v in alpha.items()} if isinstance(alpha, Mapping) else float(alpha)


def _best(trials: Sequence[Trial]) -> Trial:
    """The highest robust accuracy inside the clean budget (the smallest alpha among ties)."""
    allowed = [t for t in trials if t.allowed]
    return max(allowed, key=lambda t: (t.robust, -t.alpha))


def _choose(table: List[Trial]) -> Tuple[float, Trial, str]:
    """RULE: the smallest allowed alpha within noise of the best; 0 with NO_GAIN when the best is within
    noise of alpha = 0."""
    zero, best = table[0], _best(table)
    if best.robust <= zero.robust or paired_p(best.robust_correct, zero.robust_correct) >= LEVEL:
        return 0.0, zero, NO_GAIN
    near = [t for t in table if t.allowed and paired_p(t.robust_correct, best.robust_correct) >= LEVEL
            and paired_p(t.robust_correct, zero.robust_correct) < LEVEL and t.robust > zero.robust]
    pick = min(near, key=lambda t: t.alpha)
    return pick.alpha, pick, "gain beyond noise"


def _warn(result: SearchResult) -> None:
    """The verdict's and the grid's warnings, raised and kept in `result.notes`."""
    scalar = [t for t in result.table if isinstance(t.alpha, float)]
    best = _best(scalar)
    top = max(t.alpha for t in scalar)
    if result.verdict == NO_GAIN:
        result.notes.append(f"{NO_GAIN}: the best alpha inside the clean budget ({best.alpha:g}, "
                            f"{100 * best.robust:.1f}% robust) is within noise of alpha = 0 "
                            f"({100 * result.baseline.robust:.1f}%) on {result.n_val} validation examples; the "
                            "model is left unchanged (alpha = 0). More validation data can resolve smaller gains")
    if best.alpha == top and top > 0:
        result.notes.append(f"the best alpha ({top:g}) is the largest tried: larger alphas may do better; give "
                            "larger alphas or use strategy='refine', which extends the grid upward")
    for note in result.notes:
        warnings.warn(note, SearchWarning, stacklevel=3)


def _refine(trial, table: List[Trial], grid, rounds: int) -> None:
    """Bisect between the best alpha and its neighbours, `rounds` times; while the best is the largest alpha
    tried, also try 1.5 and 2 times it."""
    points = list(grid)
    for r in range(rounds):
        best = _best([t for t in table if isinstance(t.alpha, float)]).alpha
        j = points.index(best)
        around = points[max(j - 1, 0): j + 2]
        new = [round((a + b) / 2, 6) for a, b in zip(around, around[1:])]
        if best == points[-1] and best > 0:
            new += [round(1.5 * best, 6), round(2 * best, 6)]
        for a in new:
            if a not in points:
                trial(f"refine {r + 1}", a)
        points = sorted(set(points) | set(new))


def _per_stage(trial, grid, stages, start: float, best: Trial):
    """Coordinate ascent: one stage at a time over the grid, the others fixed; keeps a change only when its
    robust gain over the current configuration is beyond noise (McNemar p < LEVEL)."""
    current = {stage: start for stage in stages}
    for stage in stages:
        for a in grid:
            if a == current[stage]:
                continue
            candidate = {**current, stage: a}
            per_site = {site: candidate[s] for s, sites in stages.items() for site in sites}
            t = trial(f"stage {stage}", per_site, shown=candidate)
            if t.allowed and t.robust > best.robust and paired_p(t.robust_correct, best.robust_correct) < LEVEL:
                current, best = candidate, t
    return {site: current[s] for s, sites in stages.items() for site in sites}, best
