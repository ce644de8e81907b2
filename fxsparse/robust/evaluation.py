"""Robust accuracy, every attack run twice: on the model as is and through `straight_through` (BPDA).

MeanSparse has a zero gradient inside its band, so a plain gradient attack is partly blinded by it and
overstates the defence; the straight-through column is the adaptive attack. Square uses scores only, so it
is the gradient-free check (its two columns are one run: the forward is the same and it takes no gradient).

    report = fxsparse.evaluate(gm, test_loader, eps=8 / 255, attacks=["clean", "pgd", "apgd-ce", "square"])
    print(report.to_markdown())

Attacks are named, with options after a colon: "pgd:steps=50,restarts=2", "square:queries=1000". The same
seed gives the same adversarial examples, and both columns start from the same random points.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fxsparse.util import model_device, progress_bar
from fxsparse.robust import attacks as _attacks
from fxsparse.robust.guards import check_batch, check_budget, check_evaluation_data, check_l2_budget
from fxsparse.robust.outputs import LogitsFn, as_classifier
from fxsparse.operators import straight_through
from fxsparse.calibrate.distributed import failing_together, rank_and_size
from fxsparse.errors import DistributedError, FxsparseTypeError, FxsparseValueError
from fxsparse.ops import meansparse_ops
from fxsparse.files.resume import ResumeFile
from fxsparse.robust.sharding import example_fingerprints, example_seeds, gather_examples

MODES = ("plain", "bpda")


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
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in ATTACKS:
        raise FxsparseValueError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq:
            raise FxsparseValueError(f"attack option {item!r} in {spec!r} is not key=value: write "
                                     "options as 'pgd:steps=50,restarts=2'")
        options[key.strip()] = _value(text.strip())
    return name, {**ATTACKS[name].defaults, **options}


def iter_batches(data: Any, batch_size: int = 256, max_examples: Optional[int] = None) -> Iterator[Tuple]:
    """(x, y) batches from an (x, y) pair of tensors, or from an iterable of (x, y) batches (a DataLoader)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].dim() > data[1].dim():
        inputs, labels = data
        source: Iterable = ((inputs[i:i + batch_size], labels[i:i + batch_size])
                            for i in range(0, len(inputs), batch_size))
    else:
        source = data
    seen = 0
    for batch in source:
        if isinstance(batch, Mapping):
            batch = (batch.get("image", batch.get("input")), batch.get("label", batch.get("target")))
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
                and isinstance(batch[1], torch.Tensor)):
            raise FxsparseTypeError(f"evaluation needs (input, label) batches of tensors, got {type(batch).__name__}; "
                                    "give an (x, y) pair of tensors or a DataLoader of (x, y) batches")
        x, y = batch[0], batch[1]
        if max_examples is not None:
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        if len(x):
            yield x, y
        seen += len(x)
        if max_examples is not None and seen >= max_examples:
            return


@dataclasses.dataclass
class AttackResult:
    """Accuracy under one attack, on the model as is (`plain`) and with BPDA gradients (`bpda`)."""

    attack: str
    options: Dict[str, Any]
    plain: Optional[float] = None
    bpda: Optional[float] = None
    bpda_note: str = ""  # why the BPDA column repeats the plain one, when it does
    seconds: float = 0.0
    correct: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        return {"attack": self.attack, "options": self.options, "plain": self.plain, "bpda": self.bpda,
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
        """Accuracy when each example counts as robust only if every attack, in every mode given, failed."""
        columns = [r.correct[m] for r in self.results for m in modes if m in r.correct]
        if not columns or not self.n:
            return float("nan")
        return float(torch.stack(columns).all(0).float().mean())

    def to_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "eps": self.eps, "norm": self.norm, "seed": self.seed, "operators": self.operators,
                "attacks": [r.to_dict() for r in self.results],
                "worst": {m: self.worst((m,)) for m in MODES} | {"any": self.worst()},
                **({"comparison": self.comparison.to_dict()} if self.comparison is not None else {})}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        lines = ["| attack | as is | BPDA (straight-through) | BPDA - as is | time |", "|---|---|---|---|---|"]
        for r in self.results:
            gap = "" if r.plain is None or r.bpda is None or r.bpda_note else f"{100 * (r.bpda - r.plain):+.1f}"
            options = ", ".join(f"{k}={v}" for k, v in r.options.items())
            name = f"{r.attack} ({options})" if options else r.attack
            shown = r.bpda_note and r.bpda is not None and r.attack != "clean"
            bpda = _pct(r.bpda) + (f" (same run: {r.bpda_note})" if shown else "")
            lines.append(f"| {name} | {_pct(r.plain)} | {bpda} | {gap} | {r.seconds:.1f} s |")
        lines.append(f"| worst case, every attack | {_pct(self.worst(('plain',)))} | {_pct(self.worst(('bpda',)))}"
                     f" | | |")
        p = self.worst()
        half = 100 * 1.96 * math.sqrt(p * (1 - p) / self.n) if self.n and p == p else float("nan")
        note = (f"\n{self.n} examples, {self.norm} eps={self.eps:g}, seed {self.seed}, {self.operators} MeanSparse "
                f"operators. Robust to every attack in both columns: {_pct(p)} (binomial 95% interval about "
                f"± {half:.1f} points).\n")
        verdict = f"\n{self.comparison.to_markdown()}" if self.comparison is not None else ""
        return "\n".join(lines) + "\n" + note + verdict

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
) -> Evaluation:
    """Accuracy of `model` on `data` under each attack, as is and with straight-through gradients.

    Every batch must lie inside `bounds` (images in [0, 1] by default; normalised images: put the
    normalisation inside the model with `fxsparse.with_normalization`), and `eps` must fit them (an L-inf eps
    above 64/255 of the range, or an L2 eps beyond the input box's diameter, is refused): InputRangeError.

    Args:
        data: an (x, y) pair of tensors (split into `batch_size` batches) or an iterable of (x, y) batches.
        attacks: names from ATTACKS, with options after a colon ("pgd:steps=50"), or (name, options) pairs.
        modes: "plain" (the model as is) and/or "bpda" (inside `fxsparse.straight_through`).
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
        raise FxsparseValueError(f"modes must be a non-empty subset of {MODES}, got {tuple(modes)}; choose from "
                                 "'plain' and 'bpda'")
    norm = check_budget(eps, norm, bounds)  # 'Linf' / 'L2' as AutoAttack writes them, too
    plan = _plan(attacks)
    net = as_classifier(model, logits)
    dev = torch.device(device) if device is not None else model_device(model)
    operators = len(meansparse_ops(model))
    results = [AttackResult(name, {k: v for k, v in opts.items()}) for name, opts in plan]
    correct: List[Dict[str, List[torch.Tensor]]] = [{m: [] for m in modes} for _ in plan]
    total = None
    try:
        total = math.ceil(len(data[0]) / batch_size) if isinstance(data, (tuple, list)) and len(data) == 2 \
            and isinstance(data[0], torch.Tensor) else len(data)
    except TypeError:
        pass
    heldout = getattr(search, "fingerprints", None)
    data = check_evaluation_data(model, net, data, batch_size=batch_size, max_examples=max_examples,
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
                for k, ((name, options), result) in enumerate(zip(plan, results)):
                    bar.set_postfix_str(name)
                    _run_one(net, ATTACKS[name], options, x, y, eps, norm, bounds, seed, index * world + rank,
                             modes, operators, result, correct[k])
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
    n = sum(int(v) for v in gather_examples(torch.tensor([n])))
    if resume is not None:
        resume.discard()
    evaluation = Evaluation(results, n, float(eps), norm, seed, operators)
    if baseline is not None:
        from fxsparse.robust.compare import compare

        evaluation.comparison = compare(baseline, evaluation)
    return evaluation


def _run_one(model, kind: AttackKind, options, x, y, eps, norm, bounds, seed, batch, modes, operators, result,
             correct) -> None:
    """One attack on one batch, in each mode; the BPDA run is skipped when it would repeat the plain one.
    Attacks with per-example randomness get one seed per example; the others `seed` + the batch's number."""
    note = _bpda_note(kind, operators)
    runs = [m for m in modes if not (m == "bpda" and note and "plain" in modes)]
    if kind.per_example:
        options = {**options, "example_seeds": example_seeds(x, y, seed)}
    else:
        seed = seed + batch
    for mode in runs:
        start = time.perf_counter()
        if kind.fn is None:
            adv = x
        elif mode == "bpda":
            with straight_through(model):
                adv = kind.fn(model, x, y, eps, norm=norm, bounds=bounds, seed=seed, **options)
        else:
            adv = kind.fn(model, x, y, eps, norm=norm, bounds=bounds, seed=seed, **options)
        correct[mode].append(_predict_correct(model, adv, y))
        result.seconds += time.perf_counter() - start
    if "bpda" in modes and "bpda" not in runs:
        correct["bpda"].append(correct["plain"][-1])
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
