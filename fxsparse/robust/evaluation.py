"""Robust accuracy, every attack in several columns, and the per-example worst case over all of them.

MeanSparse has a zero gradient inside its band, so a plain gradient attack is partly blinded by it and
overstates the defence. The columns (MODES), in the order they run:

    plain      the attack on the model as is
    bpda       through identity straight-through gradients (BPDA)
    smooth     through the smooth band's gradient (fxsparse/operators.py), tau 0.1
    anneal     through the smooth band, tau large to small, one pass per tau
    transfer   crafted on the model at alpha 0 (or on `transfer_from`), scored on the sparsified model

`plain` and `bpda` attack every example. The later, costlier columns attack only the examples still robust
after every earlier column of the same attack (as AutoAttack does), so their accuracy is cumulative: robust
to that column and every earlier one; the last column run is the attack's worst case, and `found` says which
column first broke each lost example. Square uses scores only, so it is the gradient-free check (its columns
are one run: the forward is the same and it takes no gradient).

    report = fxsparse.evaluate(gm, test_loader, eps=8 / 255, attacks=["clean", "pgd", "apgd-ce", "square"])
    print(report.to_markdown())

Attacks are named, with options after a colon: "pgd:steps=50,restarts=2", "square:queries=1000". The same
seed gives the same adversarial examples, and both columns start from the same random points.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fxsparse.util import model_device, progress_bar, split_spec
from fxsparse.robust import attacks as _attacks
from fxsparse.inputs import iter_batches
from fxsparse.robust.guards import check_batch, check_budget, check_evaluation_data, check_l2_budget, warn_if_chance
from fxsparse.robust.outputs import LogitsFn, as_classifier
from fxsparse.operators import straight_through
from fxsparse.operators import Surrogate, parse_surrogate
from fxsparse.calibrate.distributed import failing_together, rank_and_size
from fxsparse.errors import DistributedError, FxsparseTypeError, FxsparseValueError
from fxsparse.ops import meansparse_ops
from fxsparse.files.resume import ResumeFile
from fxsparse.robust.sharding import example_fingerprints, example_seeds, gather_examples

MODES = ("plain", "bpda", "smooth", "anneal", "transfer")
FULL_MODES = ("plain", "bpda")  # attack every example; the later modes attack the survivors only
SURROGATES = {"bpda": "identity", "smooth": "smooth:tau=0.1", "anneal": "anneal"}
MODE_TITLES = {"plain": "as is", "bpda": "BPDA (straight-through)", "smooth": "smooth band",
               "anneal": "annealed band", "transfer": "transfer from alpha 0"}


@dataclasses.dataclass(frozen=True)
class AttackKind:
    """A named attack: the function, whether it follows gradients, its default options."""

    fn: Optional[Callable]
    gradient: bool
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    per_example: bool = False  # takes `example_seeds`: its randomness does not depend on batches or ranks


ATTACKS: Dict[str, AttackKind] = {
    "clean": AttackKind(None, False),
    "pgd": AttackKind(_attacks.pgd, True, {"steps": 20}, per_example=True),
    "apgd-ce": AttackKind(partial(_attacks.apgd, loss="ce"), True),
    "apgd-dlr": AttackKind(partial(_attacks.apgd, loss="dlr"), True),
    "apgd-t": AttackKind(_attacks.apgd_targeted, True),
    "square": AttackKind(_attacks.square, False, {"queries": 1000}),
    "autoattack": AttackKind(_attacks.autoattack, True),
}


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_attack(spec: str) -> Tuple[str, Dict[str, Any]]:
    """"pgd:steps=50,restarts=2" -> ("pgd", {"steps": 50, "restarts": 2}), checked against ATTACKS."""
    name, items = split_spec(spec)
    if name not in ATTACKS:
        raise FxsparseValueError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    options = {}
    for item, key, text in items:
        if text is None:
            raise FxsparseValueError(f"attack option {item!r} in {spec!r} is not key=value: write "
                                     "options as 'pgd:steps=50,restarts=2'")
        options[key] = _value(text.strip())
    return name, {**ATTACKS[name].defaults, **options}


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
    comparison: Any = dataclasses.field(default=None, repr=False)  # a Comparison, with evaluate(baseline=...)

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
        return {"n": self.n, "eps": self.eps, "norm": self.norm, "seed": self.seed, "operators": self.operators,
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


def _predict_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) == y).cpu()  # model: a Logits wrapper (fxsparse/robust/outputs.py)


def _plan(attacks_to_run: Sequence[Union[str, Tuple[str, Mapping[str, Any]]]]) -> List[Tuple[str, Dict]]:
    plan = []
    for spec in attacks_to_run:
        if isinstance(spec, str):
            plan.append(parse_attack(spec))
        else:
            name, defaults = parse_attack(spec[0])
            plan.append((name, {**defaults, **dict(spec[1])}))
    if not plan:
        raise FxsparseValueError("give at least one attack (e.g. attacks=['clean', 'pgd'])")
    return plan


def _bpda_note(kind: AttackKind, operators: int) -> str:
    if not operators:
        return "no MeanSparse operators"
    if not kind.gradient:
        return "no gradient used"
    return ""


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    norm: str = "linf",
    attacks: Sequence[Union[str, Tuple[str, Mapping[str, Any]]]] = ("clean", "pgd"),
    modes: Sequence[str] = MODES,
    bounds: Tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 256,
    max_examples: Optional[int] = None,
    device=None,
    progress: Optional[bool] = None,
    search=None,
    logits: LogitsFn = None,
    baseline: Optional["Evaluation"] = None,
    checkpoint: Union[str, "os.PathLike[str]", None] = None,
    checkpoint_every: int = 1,
    survivors_only: bool = True,
    transfer_from: Optional[nn.Module] = None,
    keep_adversarial: bool = False,
    adversarial: Union[torch.Tensor, Mapping[str, torch.Tensor], None] = None,
) -> Evaluation:
    """Accuracy of `model` on `data` under each attack in every column of `modes`, and the worst case.

    Every batch must lie inside `bounds` (images in [0, 1] by default; normalised images: put the
    normalisation inside the model with `fxsparse.with_normalization`), and `eps` must fit them (an L-inf eps
    above 64/255 of the range, or an L2 eps beyond the input box's diameter, is refused): InputRangeError.

    Args:
        data: an (x, y) pair of tensors (split into `batch_size` batches) or an iterable of (x, y) batches.
        attacks: names from ATTACKS, with options after a colon ("pgd:steps=50"), or (name, options) pairs.
        modes: columns from MODES (see the module docstring): "plain" (the model as is), "bpda" (identity
            straight-through), "smooth" and "anneal" (smooth-band surrogate gradients), "transfer" (crafted on
            the model at alpha 0, or on `transfer_from`). All by default: `worst()` is then the adaptive worst
            case, and the cost of the later columns is bounded by the examples still robust.
        survivors_only: the columns after "bpda" attack only the examples still robust to every earlier column
            of the attack (default); False attacks every example in every column (standalone columns, slower).
        transfer_from: the model the "transfer" column crafts on (a user's base model; same inputs and
            classes); by default the sparsified model itself with every alpha set to 0 (restored exactly).
        keep_adversarial: keep each column's adversarial inputs (on the CPU) in `result.adversarial[mode]`,
            one per example (the clean input where the column did not attack it), to re-check elsewhere.
        adversarial: adversarial inputs made elsewhere, one per example of `data` in its order (a tensor, or
            {name: tensor}): each is scored as a row "given: name" (as RobustBench accepts outside
            evaluations) and counts in the worst case; each must lie in the eps-ball of its example and in
            `bounds` (FxsparseValueError otherwise).
        max_examples: evaluate on the first n examples only (AutoAttack on a subset).
        search: the SearchResult that chose alpha: the data must not share an example with its validation
            split (raises FxsparseError otherwise).
        logits: a function of the model's output that returns its (batch, classes) scores, for outputs other
            than a tensor, a tuple (first element), a dict or Hugging Face ModelOutput (`logits`).
        baseline: the Evaluation of the original model on the same data, eps and seed: the result then
            carries the paired comparison (`comparison`, in `to_markdown`): see `fxsparse.compare`.
        checkpoint: a file recording the finished batches every `checkpoint_every` batches (atomically; one file
            per rank); rerunning the same call resumes after them and gives the uninterrupted run's result.
            Deleted when the evaluation finishes.

    Under torch.distributed, `data` is this rank's shard (disjoint shards: DistributedSampler with
    drop_last=True, or fxsparse.tools.data.shard; without drop_last the sampler repeats a few examples to even
    the shards out, and those count twice) and every rank returns the result over the union of the shards (per-example outcomes gathered in rank order). PGD's
    random starts are drawn per example (fxsparse/robust/sharding.py), so its outcomes do not depend on the
    number of ranks or the batch size, up to floating-point differences between batch shapes. The reference
    attacks (APGD, Square, AutoAttack) draw per batch, from `seed`, the batch index and the rank: the same
    world size, batch size and data order give the same result.
    """
    if isinstance(eps, (list, tuple)):  # a robustness curve: one evaluation per eps (fxsparse/robust/curve.py)
        from fxsparse.robust.curve import robustness_curve

        return robustness_curve(evaluate, **{k: v for k, v in locals().items() if k != "robustness_curve"})
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise FxsparseValueError(f"modes must be a non-empty subset of {MODES}, got {tuple(modes)}")
    modes = tuple(m for m in MODES if m in modes)  # the run order: cheap full columns first
    norm = check_budget(eps, norm, bounds)  # 'Linf' / 'L2' as AutoAttack writes them, too
    plan = _plan(attacks)
    net = as_classifier(model, logits)
    source = None if transfer_from is None else as_classifier(transfer_from, logits)
    dev = torch.device(device) if device is not None else model_device(model)
    operators = len(meansparse_ops(model))
    live = any(bool(op.alpha != 0) for op in meansparse_ops(model).values())  # alphas are fixed during the run
    results = [AttackResult(name, {k: v for k, v in opts.items()}) for name, opts in plan]
    correct: List[Dict[str, List[torch.Tensor]]] = [{m: [] for m in modes} for _ in plan]
    kept: List[Dict[str, List[torch.Tensor]]] = [{m: [] for m in modes} for _ in plan]
    given = _given(adversarial)
    results += [AttackResult(f"given: {name}", {}) for name in given]
    correct += [{"plain": []} for _ in given]
    offset = 0
    total = None
    try:
        total = math.ceil(len(data[0]) / batch_size) if isinstance(data, (tuple, list)) and len(data) == 2 \
            and isinstance(data[0], torch.Tensor) else len(data)
    except TypeError:
        pass
    heldout = getattr(search, "fingerprints", None)
    data, classes = check_evaluation_data(model, net, data, batch_size=batch_size, max_examples=max_examples,
                                          heldout=heldout, device=dev)
    rank, world = rank_and_size()
    resume = None
    if checkpoint is not None:
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise FxsparseValueError(f"checkpoint_every must be a positive number of batches, got {checkpoint_every!r}")
        resume = ResumeFile(checkpoint, "evaluation", _run_config(model, plan, eps, norm, modes, bounds, seed,
                                                                   batch_size, max_examples))
    done, n = _restore(resume, results, correct, modes)
    was_training = model.training
    model.eval()
    try:
        with progress_bar(total, "evaluate", "batch", progress, leave=False) as bar, failing_together("evaluation", DistributedError):
            for index, (x, y) in enumerate(iter_batches(data, batch_size, max_examples)):
                if index < done:  # resuming: this batch's outcomes are in the checkpoint
                    bar.update(1)
                    continue
                if heldout:
                    shared = sum(f in heldout for f in example_fingerprints(x, y))
                    if shared:
                        raise FxsparseValueError(
                            f"the evaluation data shares {shared} example(s) with the validation data search_alpha "
                            "chose alpha on; evaluate on a held-out test split")
                check_batch(x, bounds, index)
                if norm == "l2" and index == 0:
                    check_l2_budget(eps, x, bounds)
                x, y = x.to(dev), y.to(dev)
                n += len(y)
                for k, adv in enumerate(given.values(), start=len(plan)):
                    correct[k]["plain"].append(_score_given(net, adv, offset, x, y, eps, norm, bounds))
                offset += len(y)
                for k, ((name, options), result) in enumerate(zip(plan, results)):
                    bar.set_postfix_str(name)
                    _run_one(net, ATTACKS[name], options, x, y, eps, norm, bounds, seed, index * world + rank,
                             modes, operators, result, correct[k], _Columns(survivors_only, source,
                                                                            kept[k] if keep_adversarial else None,
                                                                            live))
                bar.update(1)
                if resume is not None and (index + 1) % checkpoint_every == 0:
                    _save(resume, index + 1, n, results, correct)
    finally:
        model.train(was_training)
    for result, per_mode in zip(results, correct):
        for mode, parts in per_mode.items():
            if parts or world > 1:
                local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
                result.correct[mode] = gather_examples(local)
                setattr(result, mode, float(result.correct[mode].float().mean()) if len(result.correct[mode])
                        else float("nan"))
    for result, per_mode in zip(results, kept):
        result.adversarial = {m: torch.cat(parts) for m, parts in per_mode.items() if parts}
    n = sum(int(v) for v in gather_examples(torch.tensor([n])))
    if resume is not None:
        resume.discard()
    evaluation = Evaluation(results, n, float(eps), norm, seed, operators)
    warn_if_chance(evaluation, classes)  # a random-init model's table means nothing (fxsparse/robust/guards.py)
    if baseline is not None:
        from fxsparse.robust.compare import compare

        evaluation.comparison = compare(baseline, evaluation)
    return evaluation


def _given(adversarial) -> Dict[str, torch.Tensor]:
    if adversarial is None:
        return {}
    if isinstance(adversarial, torch.Tensor):
        return {"adversarial": adversarial}
    if isinstance(adversarial, Mapping) and all(isinstance(v, torch.Tensor) for v in adversarial.values()):
        return {str(k): v for k, v in adversarial.items()}
    raise FxsparseTypeError("adversarial must be a tensor of adversarial inputs, one per example, or a "
                            f"{{name: tensor}} mapping, got {type(adversarial).__name__}")


def _score_given(model, adv_all: torch.Tensor, offset: int, x, y, eps, norm, bounds) -> torch.Tensor:
    """Correctness on a user's adversarial inputs for this batch, after checking they are admissible."""
    adv = adv_all[offset:offset + len(y)]
    if adv.shape != x.shape:
        raise FxsparseValueError(f"the given adversarial inputs {offset}..{offset + len(y)} have shape "
                                 f"{tuple(adv.shape)}, the data {tuple(x.shape)}: give one per example, in order")
    adv = adv.to(x)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if bool((size > eps * (1 + 1e-5) + 1e-6).any()) or adv.min() < bounds[0] or adv.max() > bounds[1]:
        raise FxsparseValueError(f"given adversarial inputs {offset}..{offset + len(y)} leave the {norm} "
                                 f"eps={eps:g} ball (largest perturbation {float(size.max()):.4g}) or the "
                                 f"bounds {tuple(bounds)}: they would not be a valid attack")
    return _predict_correct(model, adv, y)


@dataclasses.dataclass
class _Columns:
    """How the columns of one evaluation run: survivors only or not, the transfer source, kept inputs."""

    survivors_only: bool = True
    source: Optional[nn.Module] = None  # the transfer column's model (None: the model at alpha 0)
    kept: Optional[Dict[str, List[torch.Tensor]]] = None
    live: bool = True  # some alpha is not 0 (at alpha 0 the operator is the identity: every column is one run)


@contextlib.contextmanager
def _alpha_zero(model: nn.Module):
    """Every MeanSparse at alpha 0 within the block (the original model); the alphas restored exactly after."""
    ops = list(meansparse_ops(model).values())
    saved = [op.alpha.clone() for op in ops]
    try:
        with torch.no_grad():
            for op in ops:
                op.alpha.zero_()
                op.refresh_bounds()
        yield model
    finally:
        with torch.no_grad():
            for op, a in zip(ops, saved):
                op.alpha.copy_(a)
                op.refresh_bounds()


def _craft(model, mode: str, kind: AttackKind, x, y, eps, norm, bounds, seed, options, source):
    """One column's adversarial inputs for (x, y)."""
    run = partial(kind.fn, eps=eps, norm=norm, bounds=bounds, seed=seed, **options)
    if mode == "plain":
        return run(model, x, y)
    if mode == "transfer":
        if source is not None:
            return run(source, x, y)
        with _alpha_zero(model):
            return run(model, x, y)
    surrogate = parse_surrogate(SURROGATES[mode])
    if surrogate.kind != "anneal":
        with straight_through(model, surrogate):
            return run(model, x, y)
    # the annealed schedule: one pass per tau, large to small, each on the examples the previous left robust
    adv = x.clone()
    alive = torch.ones(len(y), dtype=torch.bool)
    for tau in surrogate.taus:
        idx = alive.nonzero().flatten().to(x.device)
        if not len(idx):
            break
        part = {**options, "example_seeds": [options["example_seeds"][i] for i in idx.tolist()]} \
            if "example_seeds" in options else options
        with straight_through(model, Surrogate("smooth", (tau,))):
            adv[idx] = kind.fn(model, x[idx], y[idx], eps, norm=norm, bounds=bounds, seed=seed, **part)
        alive[idx.cpu()] = _predict_correct(model, adv[idx], y[idx])
    return adv


def _run_one(model, kind: AttackKind, options, x, y, eps, norm, bounds, seed, batch, modes, operators, result,
             correct, columns: Optional[_Columns] = None) -> None:
    """One attack on one batch, in each mode; the surrogate and transfer runs are skipped when they would
    repeat the plain one. The columns after "bpda" attack only the examples every earlier column left robust
    (the others count as lost, as they are). Attacks with per-example randomness get one seed per example;
    the others `seed` + the batch's number."""
    columns = columns or _Columns()
    note = _bpda_note(kind, operators) or ("" if columns.live else "every alpha is 0")
    # a transfer from another model is a real attack even on a model without operators
    real_transfer = columns.source is not None and kind.gradient
    runs = [m for m in modes if not (m != "plain" and note and "plain" in modes)
            or (m == "transfer" and real_transfer)]
    if kind.per_example:
        options = {**options, "example_seeds": example_seeds(x, y, seed)}
    else:
        seed = seed + batch
    alive = torch.ones(len(y), dtype=torch.bool)
    for mode in runs:
        start = time.perf_counter()
        if kind.fn is None:
            adv, outcome = x, _predict_correct(model, x, y)
        elif mode in FULL_MODES or not columns.survivors_only:
            adv = _craft(model, mode, kind, x, y, eps, norm, bounds, seed, options, columns.source)
            outcome = _predict_correct(model, adv, y)
        else:
            idx = alive.nonzero().flatten()
            adv, outcome = x.clone(), alive.clone()
            if len(idx):
                part = {**options, "example_seeds": [options["example_seeds"][i] for i in idx.tolist()]} \
                    if "example_seeds" in options else options
                dev_idx = idx.to(x.device)
                adv[dev_idx] = _craft(model, mode, kind, x[dev_idx], y[dev_idx], eps, norm, bounds, seed, part,
                                      columns.source)
                outcome[idx] = _predict_correct(model, adv[dev_idx], y[dev_idx])
        result.attacked[mode] = result.attacked.get(mode, 0) + (
            int(alive.sum()) if mode not in FULL_MODES and columns.survivors_only and kind.fn is not None
            else len(y))
        correct[mode].append(outcome)
        if columns.kept is not None:
            columns.kept[mode].append(adv.detach().cpu())
        alive &= outcome
        result.seconds += time.perf_counter() - start
    for mode in modes:
        if mode not in runs:
            correct[mode].append(correct["plain"][-1])
            if columns.kept is not None:
                columns.kept[mode].append(columns.kept["plain"][-1])
            result.bpda_note = note


def _run_config(model, plan, eps, norm, modes, bounds, seed, batch_size, max_examples) -> Dict[str, Any]:
    """What must match for a checkpoint to be resumed: the run's settings and the model's operators."""
    return {"attacks": [[name, {k: repr(v) for k, v in options.items()}] for name, options in plan],
            "eps": float(eps), "norm": norm, "modes": list(modes), "bounds": [float(b) for b in bounds],
            "seed": int(seed), "batch_size": int(batch_size), "max_examples": max_examples,
            "alphas": {name: float(op.alpha) for name, op in meansparse_ops(model).items()}}


def _save(resume: ResumeFile, batches: int, n: int, results: List[AttackResult], correct) -> None:
    tensors = {f"{k}/{mode}": torch.cat(parts) for k, per_mode in enumerate(correct)
               for mode, parts in per_mode.items() if parts}
    resume.save(tensors, {"batches": batches, "n": n, "seconds": [r.seconds for r in results],
                          "notes": [r.bpda_note for r in results]})


def _restore(resume: Optional[ResumeFile], results: List[AttackResult], correct, modes) -> Tuple[int, int]:
    """(batches done, examples done) from the checkpoint, its outcomes put back into `correct`."""
    if resume is None:
        return 0, 0
    tensors, progress = resume.load()
    if not progress:
        return 0, 0
    for k, per_mode in enumerate(correct):
        for mode in modes:
            if f"{k}/{mode}" in tensors:
                per_mode[mode].append(tensors[f"{k}/{mode}"])
    for result, seconds, note in zip(results, progress["seconds"], progress["notes"]):
        result.seconds, result.bpda_note = seconds, note
    return int(progress["batches"]), int(progress["n"])
