"""The column runner of `fxsparse.evaluate`: the named attacks, and one attack on one batch in every column.

A column is one way of attacking the same model (MODES, fxsparse/robust/results.py): as is, through identity
straight-through gradients (BPDA), through the smooth band's surrogate gradient, through the annealed band,
and by transfer from alpha 0 (or from a user's model). The columns after "bpda" attack only the examples
every earlier column left robust. `Columns` holds the settings that travel together through one run (the
threat, the seed, the modes, survivors only, the transfer source); `Tally` collects one attack's per-example
outcomes over the batches. Adversarial inputs made elsewhere are scored by `score_given`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fxsparse.errors import FxsparseTypeError, FxsparseValueError
from fxsparse.operators import Surrogate, parse_surrogate, straight_through
from fxsparse.ops import meansparse_ops
from fxsparse.robust import attacks as _attacks
from fxsparse.robust.results import FULL_MODES, MODES, AttackResult
from fxsparse.robust.sharding import example_seeds
from fxsparse.robust.threat import RunSettings, ThreatModel
from fxsparse.util import split_spec

SURROGATES = {"bpda": "identity", "smooth": "smooth:tau=0.1", "anneal": "anneal"}


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


def plan_attacks(attacks_to_run: Sequence[Union[str, Tuple[str, Mapping[str, Any]]]]) -> List[Tuple[str, Dict]]:
    """The attacks to run, as (name, options) pairs, every name checked before any data is read."""
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


def check_modes(modes: Sequence[str]) -> Tuple[str, ...]:
    """The columns asked for, in the run order (cheap full columns first)."""
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise FxsparseValueError(f"modes must be a non-empty subset of {MODES}, got {tuple(modes)}")
    return tuple(m for m in MODES if m in modes)


@dataclasses.dataclass(frozen=True)
class Columns:
    """How the columns of one evaluation run: the shared settings, the modes, survivors only or not, the
    transfer source, whether adversarial inputs are kept."""

    settings: RunSettings
    modes: Tuple[str, ...] = MODES
    operators: int = 0  # MeanSparse operators in the model
    live: bool = True  # some alpha is not 0 (at alpha 0 the operator is the identity: every column is one run)
    survivors_only: bool = True
    source: Optional[nn.Module] = None  # the transfer column's model (None: the model at alpha 0)
    keep_adversarial: bool = False

    @property
    def threat(self) -> ThreatModel:
        return self.settings.threat


@dataclasses.dataclass
class Tally:
    """One attack's outcomes over the batches: per column, per-example correctness (and kept inputs)."""

    result: AttackResult
    correct: Dict[str, List[torch.Tensor]]
    kept: Dict[str, List[torch.Tensor]] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, name: str, options: Mapping[str, Any], modes: Sequence[str]) -> "Tally":
        return cls(AttackResult(name, dict(options)), {m: [] for m in modes}, {m: [] for m in modes})

    def add(self, mode: str, outcome: torch.Tensor, adv: Optional[torch.Tensor]) -> None:
        self.correct[mode].append(outcome)
        if adv is not None:
            self.kept[mode].append(adv)


def predict_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) == y).cpu()  # model: a Logits wrapper (fxsparse/robust/outputs.py)


def _bpda_note(kind: AttackKind, operators: int) -> str:
    if not operators:
        return "no MeanSparse operators"
    if not kind.gradient:
        return "no gradient used"
    return ""


def given_inputs(adversarial) -> Dict[str, torch.Tensor]:
    """evaluate(adversarial=...) as {row name: adversarial inputs, one per example}."""
    if adversarial is None:
        return {}
    if isinstance(adversarial, torch.Tensor):
        return {"adversarial": adversarial}
    if isinstance(adversarial, Mapping) and all(isinstance(v, torch.Tensor) for v in adversarial.values()):
        return {str(k): v for k, v in adversarial.items()}
    raise FxsparseTypeError("adversarial must be a tensor of adversarial inputs, one per example, or a "
                            f"{{name: tensor}} mapping, got {type(adversarial).__name__}")


def score_given(model, adv_all: torch.Tensor, offset: int, x, y, threat: ThreatModel) -> torch.Tensor:
    """Correctness on a user's adversarial inputs for this batch, after checking the threat admits them."""
    adv = adv_all[offset:offset + len(y)]
    if adv.shape != x.shape:
        raise FxsparseValueError(f"the given adversarial inputs {offset}..{offset + len(y)} have shape "
                                 f"{tuple(adv.shape)}, the data {tuple(x.shape)}: give one per example, in order")
    adv = adv.to(x)
    if not threat.admits(x, adv):
        size = threat.perturbation(x, adv)
        raise FxsparseValueError(f"given adversarial inputs {offset}..{offset + len(y)} leave the {threat.norm} "
                                 f"eps={threat.eps:g} ball (largest perturbation {float(size.max()):.4g}) or the "
                                 f"bounds {tuple(threat.bounds)}: they would not be a valid attack")
    return predict_correct(model, adv, y)


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


def _subset(options: Mapping[str, Any], idx: torch.Tensor) -> Mapping[str, Any]:
    """The options for the examples `idx` of the batch: their per-example seeds, when the attack takes them."""
    if "example_seeds" not in options:
        return options
    return {**options, "example_seeds": [options["example_seeds"][i] for i in idx.tolist()]}


def _craft(model, columns: Columns, mode: str, kind: AttackKind, x, y, seed: int, options):
    """One column's adversarial inputs for (x, y); the attack's keywords come from the threat."""
    threat = columns.threat.keywords()
    run = partial(kind.fn, **threat, seed=seed, **options)
    if mode == "plain":
        return run(model, x, y)
    if mode == "transfer":
        if columns.source is not None:
            return run(columns.source, x, y)
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
        with straight_through(model, Surrogate("smooth", (tau,))):
            adv[idx] = kind.fn(model, x[idx], y[idx], **threat, seed=seed, **_subset(options, idx))
        alive[idx.cpu()] = predict_correct(model, adv[idx], y[idx])
    return adv


def _column(model, columns: Columns, mode: str, kind: AttackKind, options, seed: int, x, y, alive):
    """(adversarial inputs, per-example correctness) of one column; survivors-only columns attack `alive`."""
    if kind.fn is None:
        return x, predict_correct(model, x, y)
    if mode in FULL_MODES or not columns.survivors_only:
        adv = _craft(model, columns, mode, kind, x, y, seed, options)
        return adv, predict_correct(model, adv, y)
    idx = alive.nonzero().flatten()
    adv, outcome = x.clone(), alive.clone()
    if len(idx):
        dev_idx = idx.to(x.device)
        adv[dev_idx] = _craft(model, columns, mode, kind, x[dev_idx], y[dev_idx], seed, _subset(options, idx))
        outcome[idx] = predict_correct(model, adv[dev_idx], y[dev_idx])
    return adv, outcome


def run_attack(model, columns: Columns, kind: AttackKind, options, x, y, batch: int, tally: Tally) -> None:
    """One attack on one batch, in each mode; the surrogate and transfer runs are skipped when they would
    repeat the plain one. The columns after "bpda" attack only the examples every earlier column left robust
    (the others count as lost, as they are). Attacks with per-example randomness get one seed per example;
    the others the run's seed + the batch's number."""
    result, seed = tally.result, columns.settings.seed
    note = _bpda_note(kind, columns.operators) or ("" if columns.live else "every alpha is 0")
    # a transfer from another model is a real attack even on a model without operators
    real_transfer = columns.source is not None and kind.gradient
    runs = [m for m in columns.modes if not (m != "plain" and note and "plain" in columns.modes)
            or (m == "transfer" and real_transfer)]
    if kind.per_example:
        options = {**options, "example_seeds": example_seeds(x, y, seed)}
    else:
        seed = seed + batch
    alive = torch.ones(len(y), dtype=torch.bool)
    for mode in runs:
        start = time.perf_counter()
        adv, outcome = _column(model, columns, mode, kind, options, seed, x, y, alive)
        result.attacked[mode] = result.attacked.get(mode, 0) + (
            int(alive.sum()) if mode not in FULL_MODES and columns.survivors_only and kind.fn is not None
            else len(y))
        tally.add(mode, outcome, adv.detach().cpu() if columns.keep_adversarial else None)
        alive &= outcome
        result.seconds += time.perf_counter() - start
    for mode in columns.modes:
        if mode not in runs:
            tally.add(mode, tally.correct["plain"][-1], tally.kept["plain"][-1] if columns.keep_adversarial else None)
            result.bpda_note = note
