"""Calibrate: exact per-channel mean and standard deviation of every site's input over the calibration data.

Each MeanSparse observes its input while it passes through unchanged (the model computes exactly what the
original computes). Per batch and channel we take count, mean and M2 (sum of squared deviations) in float64,
and merge batches with the parallel formula of Chan et al.; the result is the population statistics of all
elements, independent of batch size and order up to float64 rounding, and mergeable across processes.

A second pass (optional, on by default) records, per site, how many elements lie within z standard
deviations of their channel mean for a grid of z; the audit reads the fraction the operator replaces at any
alpha from it.
"""
from __future__ import annotations

import collections.abc
import math
import sys
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import fx, nn

from fxsparse.errors import CalibrationError
from fxsparse.ops import MeanSparse, meansparse_ops

# Alphas at which the audit knows the replaced fraction exactly: 0, 0.01, ..., 4.
ZSCORE_GRID = torch.linspace(0.0, 4.0, 401, dtype=torch.float64)


class ChannelStats:
    """Running count / mean / M2 per channel along `dim`, in float64."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None
        self.last_batch_mean: Optional[torch.Tensor] = None

    @staticmethod
    def batch_moments(x: torch.Tensor, dim: int) -> Tuple[int, torch.Tensor, torch.Tensor]:
        d = dim % x.dim()
        xd = x.detach().to(torch.float64)
        dims = [i for i in range(x.dim()) if i != d]
        n = x.numel() // max(x.shape[d], 1)
        if not dims:
            return 1, xd, torch.zeros_like(xd)
        var, mean = torch.var_mean(xd, dim=dims, correction=0)
        return n, mean, var * n

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        if mean.shape != self.mean.shape:
            raise CalibrationError(
                f"channel count changed between batches ({self.mean.numel()} then {mean.numel()})")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def update(self, x: torch.Tensor) -> None:
        n, mean, m2 = self.batch_moments(x, self.dim)
        self.last_batch_mean = mean
        self.merge(n, mean, m2)

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.m2 / self.count)


class _ZScoreCounter:
    """Counts, for every z of ZSCORE_GRID, the elements with |x - mean| < z * std (second pass)."""

    def __init__(self, op: MeanSparse):
        self.op = op
        self.counts = torch.zeros(len(ZSCORE_GRID), dtype=torch.float64)
        self.total = 0
        self.grid = ZSCORE_GRID.to(op.mean.device, torch.float32)

    def update(self, x: torch.Tensor) -> None:
        shape = [1] * x.dim()
        shape[self.op.dim] = -1
        mean = self.op.mean.view(shape).float()
        std = self.op.std.view(shape).float()
        z = ((x.detach().float() - mean).abs() / std).flatten()
        # idx = number of grid points <= z, so "z < grid[k]" holds exactly when idx <= k
        idx = torch.bucketize(z, self.grid, right=True)
        hist = torch.bincount(idx, minlength=len(self.grid) + 1)[: len(self.grid)]
        self.counts += torch.cumsum(hist, 0).to(torch.float64).cpu()
        self.total += z.numel()


def batch_inputs(batch: Any) -> Tuple[torch.Tensor, ...]:
    """The model inputs of one batch: a tensor, or the first element of an (input, target) pair."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    if isinstance(batch, dict):
        for key in ("input", "inputs", "image", "images", "pixel_values", "x"):
            if isinstance(batch.get(key), torch.Tensor):
                return (batch[key],)
    raise CalibrationError(
        f"cannot read model inputs from a calibration batch of type {type(batch).__name__}; give tensors, "
        "(input, target) pairs, or dicts with an 'input' or 'image' tensor")


def _progress(iterable: Iterable, total: Optional[int], desc: str, enabled: Optional[bool]) -> Iterator:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, unit="batch", leave=False))


def _total(data: Any, max_batches: Optional[int]) -> Optional[int]:
    try:
        n = len(data)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def _device(gm: nn.Module) -> Optional[torch.device]:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return None


def _run_pass(gm, data, observers: Dict[MeanSparse, Any], max_batches, progress, desc, check=None) -> int:
    device = _device(gm)
    for op, obs in observers.items():
        op.observer = obs.update
    batches = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(_progress(data, _total(data, max_batches), desc, progress)):
                if max_batches is not None and i >= max_batches:
                    break
                inputs = batch_inputs(batch)
                if device is not None:
                    inputs = tuple(t.to(device) for t in inputs)
                try:
                    gm(*inputs)
                except CalibrationError:
                    raise
                except Exception as exc:
                    raise CalibrationError(
                        f"calibration batch {i} (input shapes {[tuple(t.shape) for t in inputs]}) failed in the "
                        f"model: {type(exc).__name__}: {exc}") from exc
                if check is not None:
                    check(i)
                batches += 1
    finally:
        for op in observers:
            op.observer = None
    return batches


def calibrate(
    gm: fx.GraphModule,
    data: Iterable,
    *,
    max_batches: Optional[int] = None,
    progress: Optional[bool] = None,
    measure: bool = True,
) -> fx.GraphModule:
    """Set every MeanSparse's `mean` and `std` from `data`; returns `gm`.

    Args:
        data: a DataLoader or any iterable of input tensors, (input, target) pairs or dicts.
        max_batches: stop after this many batches.
        progress: show a tqdm bar (default: when stderr is a terminal).
        measure: run a second pass recording replaced fractions for the audit (skipped for one-shot
            iterators, which cannot be read twice).
    """
    ops = meansparse_ops(gm)
    if not ops:
        raise CalibrationError("the model has no MeanSparse operators; run fxsparse.prepare first")
    if measure and isinstance(data, collections.abc.Iterator):
        measure = False
    was_training = gm.training
    gm.eval()
    stats = {op: ChannelStats(op.dim) for op in ops.values()}

    def check_finite(i: int) -> None:
        bad = [op.site for op, s in stats.items()
               if s.last_batch_mean is not None and not bool(torch.isfinite(s.last_batch_mean).all())]
        if bad:
            raise CalibrationError(f"non-finite values reached site(s) {bad[:5]} in calibration batch {i}; "
                                   "check the data and the model's numerics")

    try:
        n = _run_pass(gm, data, stats, max_batches, progress, "calibrate", check_finite)
        if n == 0:
            raise CalibrationError("calibration data is empty: give at least one batch")
        missing = [op.site for op, s in stats.items() if s.mean is None]
        if missing:
            raise CalibrationError(f"site(s) {missing[:5]} never ran on the calibration data")
        for op, s in stats.items():
            op.mean.copy_(s.mean.to(op.mean.dtype))
            op.std.copy_(s.std.to(op.std.dtype))
            op.count.fill_(float(s.count))
        if measure:
            counters = {op: _ZScoreCounter(op) for op in ops.values()}
            _run_pass(gm, data, counters, max_batches, progress, "measure", None)
            for op, c in counters.items():
                op.zscore_edges = ZSCORE_GRID.clone()
                op.zscore_counts = c.counts / max(c.total, 1)
    finally:
        gm.train(was_training)
    return gm


def replaced_fraction(op: MeanSparse, alpha: Optional[float] = None) -> Optional[float]:
    """Fraction of calibration elements the operator replaces at `alpha` (default: its own), or None."""
    if op.zscore_counts is None:
        return None
    a = float(op.alpha) if alpha is None else float(alpha)
    grid = op.zscore_edges.tolist()
    fractions = op.zscore_counts.tolist()
    if a <= 0:
        return 0.0
    if a >= grid[-1]:
        return fractions[-1]
    k = min(range(len(grid)), key=lambda i: abs(grid[i] - a))
    if math.isclose(grid[k], a, abs_tol=1e-9):
        return fractions[k]
    lo = max(i for i in range(len(grid)) if grid[i] < a)
    w = (a - grid[lo]) / (grid[lo + 1] - grid[lo])
    return fractions[lo] * (1 - w) + fractions[lo + 1] * w
