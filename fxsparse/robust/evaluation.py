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

The steps, one module each: the threat and the shared settings (fxsparse/robust/threat.py), the named attacks
and the column runner (fxsparse/robust/columns.py), the results and their views (fxsparse/robust/results.py);
this module reads the data, runs every batch, resumes from a checkpoint and gathers the outcomes.

Under torch.distributed, `data` is this rank's shard (disjoint shards: DistributedSampler with drop_last=True,
or fxsparse.tools.data.shard; without drop_last the sampler repeats a few examples to even the shards out, and
those count twice) and every rank returns the result over the union of the shards (per-example outcomes
gathered in rank order). PGD's random starts are drawn per example (fxsparse/robust/sharding.py), so its
outcomes do not depend on the number of ranks or the batch size, up to floating-point differences between
batch shapes. The reference attacks (APGD, Square, AutoAttack) draw per batch, from `seed`, the batch index
and the rank: the same world size, batch size and data order give the same result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fxsparse.calibrate.distributed import failing_together, rank_and_size
from fxsparse.errors import DistributedError, FxsparseValueError
from fxsparse.files.resume import ResumeFile
from fxsparse.inputs import iter_batches
from fxsparse.ops import meansparse_ops
from fxsparse.robust.columns import (ATTACKS, SURROGATES, AttackKind, Columns, Tally, check_modes,
                                     given_inputs, parse_attack, plan_attacks, run_attack, score_given)
from fxsparse.robust.guards import check_batch, check_evaluation_data, warn_if_chance
from fxsparse.robust.outputs import LogitsFn, as_classifier
from fxsparse.robust.results import FULL_MODES, MODE_TITLES, MODES, AttackResult, Evaluation
from fxsparse.robust.sharding import gather_examples
from fxsparse.robust.threat import RunSettings, ThreatModel
from fxsparse.util import model_device, progress_bar

# the names other code imports from here (the attacks' registry, the results, the columns)
__all__ = ["ATTACKS", "AttackKind", "AttackResult", "Evaluation", "FULL_MODES", "MODES", "MODE_TITLES",
           "SURROGATES", "ThreatModel", "evaluate", "parse_attack"]

Attacks = Sequence[Union[str, Tuple[str, Mapping[str, Any]]]]


def evaluate(
    model: nn.Module, data: Any, *, eps: Optional[float] = None, norm: Optional[str] = None,
    attacks: Attacks = ("clean", "pgd"), modes: Sequence[str] = MODES,
    bounds: Optional[Tuple[float, float]] = None, threat: Optional[ThreatModel] = None, seed: int = 0,
    batch_size: int = 256, max_examples: Optional[int] = None, device=None, progress: Optional[bool] = None,
    search=None, logits: LogitsFn = None, baseline: Optional["Evaluation"] = None,
    checkpoint: Union[str, "os.PathLike[str]", None] = None, checkpoint_every: int = 1, survivors_only: bool = True,
    transfer_from: Optional[nn.Module] = None, keep_adversarial: bool = False,
    adversarial: Union[torch.Tensor, Mapping[str, torch.Tensor], None] = None,
) -> Evaluation:
    """Accuracy of `model` on `data` under each attack in every column of `modes`, and the worst case.

    The threat: `eps` with `norm` ("linf", default, or "l2") and `bounds` (default (0, 1)), or one
    `threat=fxsparse.ThreatModel(eps, norm, bounds)` (not both). Every batch must lie inside the bounds
    (normalised images: put the normalisation inside the model, `fxsparse.with_normalization`), and eps must
    fit them (an L-inf eps above 64/255 of the range, or an L2 eps beyond the input box's diameter, is
    refused): InputRangeError. A list of eps gives a robustness curve (fxsparse/robust/curve.py).

    Args:
        data: an (x, y) pair of tensors (split into `batch_size` batches) or an iterable of (x, y) batches.
        attacks: names from ATTACKS, with options after a colon ("pgd:steps=50"), or (name, options) pairs.
        modes: columns from MODES (the module docstring): "plain", "bpda", "smooth", "anneal", "transfer". All
            by default: `worst()` is then the adaptive worst case.
        survivors_only: the columns after "bpda" attack only the examples still robust to every earlier column
            of the attack (default); False attacks every example in every column (standalone columns, slower).
        transfer_from: the model the "transfer" column crafts on (same inputs and classes); by default the
            sparsified model itself with every alpha set to 0 (restored exactly).
        keep_adversarial: keep each column's adversarial inputs (on the CPU) in `result.adversarial[mode]`,
            one per example (the clean input where the column did not attack it).
        adversarial: adversarial inputs made elsewhere, one per example of `data` in its order (a tensor, or
            {name: tensor}): each is scored as a row "given: name" and counts in the worst case; each must lie
            in the threat's eps-ball of its example and bounds (FxsparseValueError otherwise).
        max_examples: evaluate on the first n examples only (AutoAttack on a subset).
        search: the SearchResult that chose alpha: the data must share no example with its validation split.
        logits: a function of the model's output that returns its (batch, classes) scores, for outputs other
            than a tensor, a tuple (first element), a dict or Hugging Face ModelOutput (`logits`).
        baseline: the Evaluation of the original model on the same data, eps and seed: the result then
            carries the paired comparison (`comparison`, in `to_markdown`): see `fxsparse.compare`.
        checkpoint: a file recording the finished batches every `checkpoint_every` batches (atomically; one file
            per rank); rerunning the same call resumes after them and gives the uninterrupted run's result.
    Under torch.distributed, `data` is this rank's shard; every rank returns the result over every shard.
    """
    if isinstance(eps, (list, tuple)):  # a robustness curve: one evaluation per eps (fxsparse/robust/curve.py)
        from fxsparse.robust.curve import robustness_curve

        return robustness_curve(evaluate, **{k: v for k, v in locals().items() if k != "robustness_curve"})
    settings = RunSettings.of(threat=threat, eps=eps, norm=norm, bounds=bounds, seed=seed, batch_size=batch_size,
                              max_examples=max_examples)
    plan = plan_attacks(attacks)
    net = as_classifier(model, logits)
    source = None if transfer_from is None else as_classifier(transfer_from, logits)
    columns = _columns(model, settings, check_modes(modes), survivors_only, source, keep_adversarial)
    given = given_inputs(adversarial)
    tallies = [Tally.empty(name, options, columns.modes) for name, options in plan] + [
        Tally(AttackResult(f"given: {name}", {}), {"plain": []}) for name in given]
    total = _batch_count(data, batch_size)
    dev = torch.device(device) if device is not None else model_device(model)
    heldout = getattr(search, "fingerprints", None)
    data, classes = check_evaluation_data(model, net, data, batch_size=batch_size, max_examples=max_examples,
                                          heldout=heldout, device=dev)
    resume, done, n = _resume(checkpoint, checkpoint_every, model, plan, columns, tallies)
    runner = _Runner(net, columns, plan, list(given.values()), tallies, dev)  # held-out: checked above
    with _eval_mode(model), progress_bar(total, "evaluate", "batch", progress, leave=False) as bar, \
            failing_together("evaluation", DistributedError):
        for index, (x, y) in enumerate(iter_batches(data, batch_size, max_examples)):
            if index >= done:  # resuming: the batches before are in the checkpoint
                n += runner.batch(index, x, y, n, bar)
                if resume is not None and (index + 1) % checkpoint_every == 0:
                    _save(resume, index + 1, n, tallies)
            bar.update(1)
    evaluation = _result(tallies, n, settings, columns)
    warn_if_chance(evaluation, classes)  # a random-init model's table means nothing (fxsparse/robust/guards.py)
    if resume is not None:
        resume.discard()
    if baseline is not None:
        from fxsparse.robust.compare import compare

        evaluation.comparison = compare(baseline, evaluation)
    return evaluation


def _result(tallies, n: int, settings: RunSettings, columns: Columns) -> Evaluation:
    """The Evaluation over every rank's examples."""
    return Evaluation(_gather(tallies), sum(int(v) for v in gather_examples(torch.tensor([n]))),
                      settings.threat.eps, settings.threat.norm, settings.seed, columns.operators,
                      settings.threat.bounds)


def _columns(model: nn.Module, settings: RunSettings, modes, survivors_only: bool, source, keep: bool) -> Columns:
    """The run's column settings; the model's alphas are fixed during the run."""
    ops = meansparse_ops(model)
    live = any(bool(op.alpha != 0) for op in ops.values())
    return Columns(settings, modes, len(ops), live, survivors_only, source, keep)


def _batch_count(data, batch_size: int) -> Optional[int]:
    """The number of batches, for the progress bar, when the data knows its length."""
    try:
        return math.ceil(len(data[0]) / batch_size) if isinstance(data, (tuple, list)) and len(data) == 2 \
            and isinstance(data[0], torch.Tensor) else len(data)
    except TypeError:
        return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """The model in eval mode within the block, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclasses.dataclass
class _Runner:
    """One evaluation's work on a batch: the checks, the given inputs, every attack in every column."""

    net: nn.Module
    columns: Columns
    plan: List[Tuple[str, Dict[str, Any]]]
    given: List[torch.Tensor]
    tallies: List[Tally]
    device: torch.device
    place: Tuple[int, int] = dataclasses.field(default_factory=rank_and_size)  # (rank, world size)

    def batch(self, index: int, x: torch.Tensor, y: torch.Tensor, offset: int, bar) -> int:
        """Run batch `index` (its first example is example `offset` of this rank's data); returns its size."""
        threat = self.columns.threat
        check_batch(x, threat.bounds, index)
        if index == 0:
            threat.check_l2(x)
        x, y = x.to(self.device), y.to(self.device)
        for tally, adv in zip(self.tallies[len(self.plan):], self.given):
            tally.add("plain", score_given(self.net, adv, offset, x, y, threat), None)
        rank, world = self.place
        for (name, options), tally in zip(self.plan, self.tallies):
            bar.set_postfix_str(name)
            run_attack(self.net, self.columns, ATTACKS[name], options, x, y, index * world + rank, tally)
        return len(y)


def _gather(tallies: Sequence[Tally]) -> List[AttackResult]:
    """Each attack's result over every rank's examples (in rank order), with its accuracies."""
    world = rank_and_size()[1]
    for tally in tallies:
        result = tally.result
        for mode, parts in tally.correct.items():
            if parts or world > 1:
                local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
                result.correct[mode] = gather_examples(local)
                setattr(result, mode, float(result.correct[mode].float().mean()) if len(result.correct[mode])
                        else float("nan"))
        result.adversarial = {m: torch.cat(parts) for m, parts in tally.kept.items() if parts}
    return [t.result for t in tallies]


def _resume(checkpoint, every, model: nn.Module, plan, columns: Columns, tallies: Sequence[Tally]):
    """(the resume file or None, batches done, examples done): a file that does not fit this run is refused
    on every rank together (one rank's own file can differ; the others must not wait for it)."""
    with failing_together("evaluation's checkpoint", DistributedError):
        resume = _resume_file(checkpoint, every, model, plan, columns)
        return (resume, *_restore(resume, tallies))


def _resume_file(checkpoint, every, model: nn.Module, plan, columns: Columns) -> Optional[ResumeFile]:
    if checkpoint is None:
        return None
    if not isinstance(every, int) or every < 1:
        raise FxsparseValueError(f"checkpoint_every must be a positive number of batches, got {every!r}")
    return ResumeFile(checkpoint, "evaluation", _run_config(model, plan, columns))


def _run_config(model: nn.Module, plan, columns: Columns) -> Dict[str, Any]:
    """What must match for a checkpoint to be resumed: the run's settings and the model's operators."""
    return {"attacks": [[name, {k: repr(v) for k, v in options.items()}] for name, options in plan],
            "modes": list(columns.modes), **columns.settings.to_dict(),
            "alphas": {name: float(op.alpha) for name, op in meansparse_ops(model).items()}}


def _save(resume: ResumeFile, batches: int, n: int, tallies: Sequence[Tally]) -> None:
    tensors = {f"{k}/{mode}": torch.cat(parts) for k, tally in enumerate(tallies)
               for mode, parts in tally.correct.items() if parts}
    resume.save(tensors, {"batches": batches, "n": n, "seconds": [t.result.seconds for t in tallies],
                          "notes": [t.result.bpda_note for t in tallies]})


def _restore(resume: Optional[ResumeFile], tallies: Sequence[Tally]) -> Tuple[int, int]:
    """(batches done, examples done) from the checkpoint, its outcomes put back into the tallies."""
    if resume is None:
        return 0, 0
    tensors, progress = resume.load()
    if not progress:
        return 0, 0
    for k, tally in enumerate(tallies):
        for mode, parts in tally.correct.items():
            if f"{k}/{mode}" in tensors:
                parts.append(tensors[f"{k}/{mode}"])
    for tally, seconds, note in zip(tallies, progress["seconds"], progress["notes"]):
        tally.result.seconds, tally.result.bpda_note = seconds, note
    return int(progress["batches"]), int(progress["n"])
