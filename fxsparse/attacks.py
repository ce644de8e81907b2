"""Projected gradient descent (Madry et al.), L-inf and L2, with random start and restarts.

Deterministic given `seed`. Used by the demo and by robust-accuracy checks; wrap the model in
`fxsparse.straight_through` to attack with BPDA gradients through the MeanSparse operators.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


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


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=gen, device="cpu").to(x) * 2 - 1) * eps
    d = torch.randn(x.shape, generator=gen, device="cpu").to(x)
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    r = torch.rand(x.shape[0], generator=gen, device="cpu").to(x).view(-1, *[1] * (x.dim() - 1))
    return d * r * eps


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
) -> torch.Tensor:
    """Adversarial examples maximising cross-entropy; per example, the first restart that fools the model wins."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = _random_start(x, eps, norm, gen) if random_start else torch.zeros_like(x)
        delta = ((x + delta).clamp(lo, hi) - x).detach()
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = _project(delta.detach() + _step(grad, step_size, norm), eps, norm)
            delta = ((x + delta).clamp(lo, hi) - x).detach()
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
                right += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    finally:
        model.train(was)
    return right / max(total, 1)
