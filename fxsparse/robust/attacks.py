"""Attacks: projected gradient descent (Madry et al.) here, APGD, APGD-T, Square and AutoAttack through the
reference implementation (`pyautoattack`, optional: `pip install 'fxsparse[eval]'`).

Every attack has the signature `attack(model, x, y, eps, *, norm, bounds, seed, **options) -> x_adv` and is
deterministic given `seed`. Wrap the model in `fxsparse.straight_through` to attack with BPDA gradients through
the MeanSparse operators; `fxsparse.evaluate` runs each attack both ways.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import warnings
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fxsparse.errors import FxsparseValueError, MissingDependencyError
from fxsparse.robust.guards import canonical_norm
from fxsparse.robust.outputs import as_classifier, logits_of
from fxsparse.robust.sharding import per_example_rand, restart_seed


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / flat).clamp(max=1.0)
    return delta * factor.view(-1, *[1] * (delta.dim() - 1))


def _step(grad: torch.Tensor, size: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return size * grad.sign()
    g = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return size * grad / g.view(-1, *[1] * (grad.dim() - 1))


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator,
                  seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A random point of the eps-ball around each example: from `gen` (a batch's stream), or, with `seeds`,
    each example's own draw (fxsparse/robust/sharding.py), the same whatever batch or rank it is in."""
    if seeds is not None:
        uniform = lambda: per_example_rand(x, seeds)  # noqa: E731
        normal = lambda: per_example_rand(x, seeds, normal=True)  # noqa: E731
        radius = lambda: per_example_rand(x.flatten(1)[:, :1], [restart_seed(s, -1) for s in seeds])  # noqa: E731
    else:
        uniform = lambda: torch.rand(x.shape, generator=gen, device="cpu").to(x)  # noqa: E731
        normal = lambda: torch.randn(x.shape, generator=gen, device="cpu").to(x)  # noqa: E731
        radius = lambda: torch.rand(x.shape[0], generator=gen, device="cpu").to(x)  # noqa: E731
    if norm == "linf":
        return (uniform() * 2 - 1) * eps
    d = normal()
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return d * radius().reshape(-1, *[1] * (x.dim() - 1)) * eps


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: Optional[float] = None,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    bounds: Tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    schedule: str = "constant",
    momentum: float = 0.0,
    example_seeds: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Adversarial examples maximising cross-entropy; per example, the first restart that fools the model wins.
    The model may return any classifier output (see fxsparse/robust/outputs.py).

    schedule: "constant" (Madry et al.: step 2.5 eps / steps) or "cosine": the step starts at 2 eps (L-inf; eps
    for L2) and decays to 0 on a cosine, and every iterate is checked, so an example counts as fooled when
    any iterate fooled the model (APGD's best-iterate rule; measured against APGD-CE in the README).
    momentum (with "cosine"): APGD's heavy-ball step, `x + m (z - x) + (1 - m) (x - x_previous)` (0.75 there).
    example_seeds: one seed per example for the random starts (`fxsparse.evaluate` passes them): an example's
    attack then does not depend on the batch or process it is in."""
    norm = canonical_norm(norm)
    if schedule not in ("constant", "cosine"):
        raise FxsparseValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not 0.0 <= momentum <= 1.0:
        raise FxsparseValueError(f"momentum must be in [0, 1] (APGD uses 0.75), got {momentum!r}")
    model = as_classifier(model)
    if step_size is None:
        step_size = (2.0 if norm == "linf" else 1.0) * eps if schedule == "cosine" else 2.5 * eps / max(steps, 1)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for restart in range(restarts):
        seeds = None if example_seeds is None else [restart_seed(s, restart) for s in example_seeds]
        delta = _random_start(x, eps, norm, gen, seeds) if random_start else torch.zeros_like(x)
        delta = ((x + delta).clamp(lo, hi) - x).detach()
        previous = delta  # the iterate before the current one, for the momentum step
        for t in range(steps):
            delta.requires_grad_(True)
            out = model(x + delta)
            loss = F.cross_entropy(out, y)
            (grad,) = torch.autograd.grad(loss, delta)
            if schedule == "cosine":
                with torch.no_grad():
                    wrong = (out.argmax(1) != y) & ~fooled
                    best[wrong] = (x + delta)[wrong].detach()
                    fooled |= wrong
                size = step_size * 0.5 * (1 + math.cos(math.pi * t / steps))
            else:
                size = step_size
            stepped = _project(delta.detach() + _step(grad, size, norm), eps, norm)
            if schedule == "cosine" and momentum and t > 0:  # APGD's heavy-ball step, then projected again
                stepped = _project(delta + momentum * (stepped - delta) + (1 - momentum) * (delta - previous),
                                   eps, norm)
            previous = delta.detach()
            delta = ((x + stepped).clamp(lo, hi) - x).detach()
        with torch.no_grad():
            wrong = model(x + delta).argmax(1) != y
        take = wrong & ~fooled
        best[take] = (x + delta)[take]
        if restarts > 1:
            keep = ~fooled & ~wrong
            best[keep] = (x + delta)[keep]
        fooled |= wrong
    return best.detach()


def accuracy(model: nn.Module, batches: Iterable, attack=None) -> float:
    """Top-1 accuracy over (x, y) batches, optionally on `attack(model, x, y)` outputs."""
    was = model.training
    model.eval()
    right = total = 0
    try:
        for x, y in batches:
            if attack is not None:
                x = attack(model, x, y)
            with torch.no_grad():
                right += int((logits_of(model(x)).argmax(1) == y).sum())
            total += y.numel()
    finally:
        model.train(was)
    return right / max(total, 1)


# ---------------------------------------------------------------------------------------------------------
# The reference AutoAttack implementation (Croce & Hein 2020), published on PyPI as `pyautoattack`; where it is
# absent, the original repository's `autoattack` package (`pip install git+https://github.com/fra31/auto-attack`,
# what RobustBench imports) is used. The attack modules (`autopgd_base`, `square`) are the same in both; the
# ensemble's API differs: pyautoattack's `AutoAttack` takes keyword-only arguments, logs through `logging` and
# `run_standard_evaluation` takes `batch_size=` and returns `(x_adv, y_adv)`; the git package's takes
# `verbose=`, logs by printing, and its `run_standard_evaluation` takes `bs=` and returns `x_adv`. Every run
# here seeds it explicitly and restores torch's global random state afterwards (both reseed the global
# generator).

_NORMS = {"linf": "Linf", "l2": "L2"}
REFERENCE_PACKAGES = ("pyautoattack", "autoattack")  # in the order they are tried


def reference_package():
    """The installed reference implementation (pyautoattack, else the git `autoattack`), or None."""
    for name in REFERENCE_PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "AutoAttack"):
            return module
    return None


def _pyautoattack():
    pkg = reference_package()
    if pkg is None:
        raise MissingDependencyError("APGD, Square and AutoAttack use the reference implementation from the "
                                     "pyautoattack package: pip install 'fxsparse[eval]' (RobustBench's git "
                                     "`autoattack` package is used too, where it is installed)")
    return pkg


def _reference(module: str):
    """A module of the reference implementation: `autopgd_base` or `square`."""
    return importlib.import_module(f"{_pyautoattack().__name__}.{module}")


def _reference_norm(norm: str, bounds: Tuple[float, float]) -> str:
    norm = canonical_norm(norm)
    if tuple(bounds) != (0.0, 1.0):
        raise FxsparseValueError(f"the reference attacks assume inputs in [0, 1], got bounds {tuple(bounds)}: put the "
                            "input normalisation inside the model")
    return _NORMS[norm]


@contextlib.contextmanager
def _private_rng(device: torch.device):
    """Keep the caller's torch random state: the reference attacks reseed the global generators."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
         loss: str = "ce", steps: int = 100, restarts: int = 1, bounds=(0.0, 1.0), seed: int = 0) -> torch.Tensor:
    """APGD (Croce & Hein 2020) on cross-entropy (`loss="ce"`) or the DLR loss (`loss="dlr"`)."""
    APGDAttack = _reference("autopgd_base").APGDAttack

    ref_norm = _reference_norm(norm, bounds)
    model = as_classifier(model)  # the reference code calls model(x) for scores
    attack = APGDAttack(model, n_iter=steps, norm=ref_norm, n_restarts=restarts, eps=eps, seed=seed, loss=loss,
                        device=x.device)
    with _private_rng(x.device):
        return attack.perturb(x, y).detach()


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                  steps: int = 100, targets: int = 9, restarts: int = 1, bounds=(0.0, 1.0),
                  seed: int = 0) -> torch.Tensor:
    """APGD-T: APGD on the targeted DLR loss, against each of the `targets` most likely wrong classes."""
    APGDAttack_targeted = _reference("autopgd_base").APGDAttack_targeted

    ref_norm = _reference_norm(norm, bounds)
    model = as_classifier(model)  # the reference code calls model(x) for scores
    with torch.no_grad():
        classes = model(x[:1]).shape[-1]
    attack = APGDAttack_targeted(model, n_iter=steps, norm=ref_norm, n_restarts=restarts, eps=eps, seed=seed,
                                 n_target_classes=max(1, min(targets, classes - 1)), device=x.device)
    with _private_rng(x.device):
        return attack.perturb(x, y).detach()


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
           queries: int = 5000, p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = True,
           bounds=(0.0, 1.0), seed: int = 0) -> torch.Tensor:
    """Square Attack (Andriushchenko et al. 2020): random search on the margin loss, scores only, no gradient.
    The gradient-free check: a defence that only masks gradients does not slow it down. `rescale_schedule`
    shrinks the squares on the schedule of the query budget given (AutoAttack's 5000 queries use False)."""
    SquareAttack = _reference("square").SquareAttack

    ref_norm = _reference_norm(norm, bounds)
    model = as_classifier(model)  # the reference code calls model(x) for scores
    if ref_norm == "L2" and min(x.shape[-2:]) < 5:
        raise FxsparseValueError(f"L2 Square needs images of at least 5 x 5 pixels, got {tuple(x.shape[-2:])}")
    attack = SquareAttack(model, norm=ref_norm, n_queries=queries, eps=eps, p_init=p_init, n_restarts=restarts,
                          seed=seed, resc_schedule=rescale_schedule, device=x.device)
    with _private_rng(x.device), torch.no_grad():
        return attack.perturb(x, y).detach()


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
               version: str = "standard", steps: Optional[int] = None, queries: Optional[int] = None,
               bounds=(0.0, 1.0), seed: int = 0) -> torch.Tensor:
    """AutoAttack's standard ensemble (APGD-CE, APGD-T, FAB-T, Square), as on RobustBench.

    `steps` and `queries` shrink its budgets (100 iterations per gradient attack, 5000 Square queries) for
    smoke tests only; a reported AutoAttack number uses the defaults."""
    pkg = _pyautoattack()
    ref_norm = _reference_norm(norm, bounds)
    model = as_classifier(model)  # the reference code calls model(x) for scores
    git = pkg.__name__ != "pyautoattack"  # the original repository's package
    adversary = pkg.AutoAttack(model, device=x.device, eps=eps, norm=ref_norm, seed=seed, version=version,
                               **({"verbose": False} if git else {}))
    if not git:
        adversary.logger.setLevel(logging.WARNING)
    if steps is not None:
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = steps
    if queries is not None:
        adversary.square.n_queries = queries
    with _private_rng(x.device), warnings.catch_warnings():
        warnings.simplefilter("ignore", Warning)  # its checks warn about zero gradients, which we report ourselves
        x_adv = adversary.run_standard_evaluation(x, y, bs=len(x)) if git else \
            adversary.run_standard_evaluation(x, y, batch_size=len(x))[0]
    return x_adv.detach()
