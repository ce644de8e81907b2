"""What calibration accumulates: exact per-channel moments and a histogram of z-scores, both mergeable.

`ChannelStats` keeps count, mean and M2 (sum of squared deviations) per channel in float64 and merges
partial results with the parallel formula of Chan et al., so batches, resumed runs and ranks combine into
the statistics of one pass over all the data. `ZScoreCounter` counts, for a grid of z, the elements within z
standard deviations of their channel mean; counts add up across batches and ranks.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from fxsparse.errors import CalibrationError
from fxsparse.ops import MeanSparse

# Rows of at most this many elements take ATen's batch-norm statistics kernel (CPU, float32); it is faster
# than sums up to 8 elements per row and slower from 16 on (measured on (outer, C, inner) of 64K to 1M elements).
SMALL_INNER = 8

# Alphas at which the audit knows the replaced fraction exactly: 0, 0.01, ..., 4.
ZSCORE_GRID = torch.linspace(0.0, 4.0, 401, dtype=torch.float64)


class ChannelStats:
    """Running count / mean / M2 per channel along `dim`, in float64.

    The per-batch work is a few vectorised passes over the site's input and nothing else: `update` keeps
    each batch's channel means and variances (in the working dtype, on its device) and the float64 merge of
    all pending batches runs as a handful of stacked operations when `count`, `mean` or `m2` is read (or
    every FLUSH_EVERY batches), instead of a dozen tiny tensor operations per site per batch.
    """

    FLUSH_EVERY = 64

    def __init__(self, dim: int, exact: bool = False):
        self.dim = dim
        self.exact = exact
        self._count = 0
        self._mean: Optional[torch.Tensor] = None
        self._m2: Optional[torch.Tensor] = None
        self._channels: Optional[int] = None
        self._pending: List[Tuple[int, torch.Tensor, torch.Tensor]] = []
        # the channel means and variances of the latest batch, in the working dtype, for a cheap finiteness check
        self.last_batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    # -- one batch -----------------------------------------------------------------------------------------
    @staticmethod
    def batch_mean_var(x: torch.Tensor, dim: int, exact: bool = False
                       ) -> Optional[Tuple[int, torch.Tensor, torch.Tensor]]:
        """(n, mean, var) of one batch per channel, in the working dtype: n elements per channel, their mean
        and their population variance. None for an empty batch.

        The working dtype is the input's for float32 / float64 and float64 for `exact=True` and for float16 /
        bfloat16 input. The variance is taken around the mean already rounded to that dtype (two passes), so
        it has no cancellation; the sums are vectorised (`torch.var_mean`'s Welford loop is scalar on CPU and
        ten times slower). Float32 rows of at most SMALL_INNER elements on CPU take ATen's batch-norm
        statistics kernel instead (one call). Nothing here converts to float64 or synchronises: the float64
        merge of all batches runs later, stacked (`_merge_batches`).
        """
        from fxsparse.ops import _as_3d

        d = dim % x.dim()
        x = x.detach()
        n = x.numel() // max(x.shape[d], 1)
        if n == 0:
            return None
        if exact or x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float64)
        x3 = _as_3d(x, d)
        if x3 is None:  # a layout with gaps: reduce over the other dims directly
            dims = [i for i in range(x.dim()) if i != d]
            if not dims:  # only the channel axis: one element per channel
                return 1, x.clone(), torch.zeros_like(x)
            mean = x.sum(dims, keepdim=True).div_(n)
            dev = x - mean
            return n, mean.flatten(), dev.mul_(dev).sum(dims).div_(n)
        if x3.shape[2] <= SMALL_INNER and x.dtype == torch.float32 and x.device.type == "cpu":
            # few elements per row (tokens, NHWC, late small feature maps): one fused, vectorised kernel
            mean, var = torch.ops.aten.batch_norm_update_stats(x3, None, None, 0.0)
            return n, mean, var
        # rows first, then across rows: each thread sums the contiguous rows that it (and the kernel that
        # produced x) just touched; one reduction over (outer, inner) splits the work across threads
        # differently and runs up to twice as slow on 2 cores
        mean = x3.sum(2).sum(0).div_(n)
        dev = x3 - mean[:, None]
        return n, mean, dev.mul_(dev).sum(2).sum(0).div_(n)  # `dev` is our own temporary: square it in place

    def update(self, x: torch.Tensor) -> None:
        parts = self.batch_mean_var(x, self.dim, self.exact)
        if parts is None:
            return
        channels = parts[1].numel()
        if self._channels is not None and channels != self._channels:
            raise CalibrationError(f"channel count changed between batches ({self._channels} then {channels})")
        self._channels = channels
        self.last_batch = parts[1:]
        self._pending.append(parts)
        if len(self._pending) >= self.FLUSH_EVERY:
            self._flush()

    # -- merging ---------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        n, mean, m2 = _merge_batches(self._pending)
        self._pending = []
        self._merge_float64(n, mean, m2)

    def _merge_float64(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self._mean is None:
            self._count, self._mean, self._m2 = n, mean, m2
            return
        self._count, self._mean, self._m2 = _merge_many(
            [self._count, n], torch.stack([self._mean, mean.to(self._mean.device)]),
            torch.stack([self._m2, m2.to(self._m2.device)]))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a partial result (n elements per channel, their mean and M2) into this one."""
        if n == 0:
            return
        self._flush()
        if self._channels is not None and mean.numel() != self._channels:
            raise CalibrationError(f"channel count changed between batches ({self._channels} then {mean.numel()})")
        self._channels = mean.numel()
        self._merge_float64(n, mean.double().clone(), m2.double().clone())

    @property
    def count(self) -> int:
        self._flush()
        return self._count

    @property
    def mean(self) -> Optional[torch.Tensor]:
        self._flush()
        return self._mean

    @property
    def m2(self) -> Optional[torch.Tensor]:
        self._flush()
        return self._m2

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.m2 / self.count)


def _merge_batches(batches) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """Pooled (count, mean, M2) in float64 of `batch_mean_var` results, all batches in one stacked computation."""
    ns = [b[0] for b in batches]
    n = torch.tensor(ns, dtype=torch.float64, device=batches[0][1].device)[:, None]
    # stack promotes mixed float32 / float64 parts; one conversion per quantity, not one per batch
    means, variances = (torch.stack([b[i] for b in batches]).double() for i in (1, 2))
    return _merge_many(ns, means, n * variances)


def _merge_many(ns: List[int], means: torch.Tensor, m2s: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """Pooled (count, mean, M2) of partial results, rows of `means` / `m2s`: the parallel-variance formula
    (Chan et al.) for many parts at once, in float64."""
    total = sum(ns)
    n = torch.tensor(ns, dtype=torch.float64, device=means.device)[:, None]
    mean = (n * means).sum(0) / total
    return total, mean, m2s.sum(0) + (n * (means - mean) ** 2).sum(0)


class ZScoreCounter:
    """Counts, for every z of ZSCORE_GRID, the elements with |x - mean| < z * std (second pass).

    The grid is uniform (step 0.01), so an element's bucket is arithmetic: the number of grid points at or
    below its z is floor(100 z) + 1 (all 401 beyond the last point). That is one multiply and a conversion
    per element where a binary search over the grid (`torch.bucketize`) cost 10x the whole pass.
    """

    STEPS = 100  # grid points per unit of z: ZSCORE_GRID[k] = k / STEPS

    def __init__(self, op: MeanSparse):
        self.op = op
        self.counts = torch.zeros(len(ZSCORE_GRID), dtype=torch.float64)
        self.total = 0

    def update(self, x: torch.Tensor) -> None:
        shape = [1] * x.dim()
        shape[self.op.dim] = -1
        mean = self.op.mean.view(shape).float()
        scale = (self.STEPS / self.op.std.float()).view(shape)  # a zero std gives inf: never inside the band
        last = float(len(ZSCORE_GRID) - 1) + 0.5
        steps = (x.detach().float() - mean).abs_().mul_(scale).nan_to_num_(nan=last, posinf=last).clamp_(max=last)
        # idx = number of grid points <= z, so "z < grid[k]" holds exactly when idx <= k
        idx = steps.to(torch.int32).add_(1).flatten()
        hist = torch.bincount(idx, minlength=len(ZSCORE_GRID) + 1)[: len(ZSCORE_GRID)]
        self.counts += torch.cumsum(hist, 0).to(torch.float64).cpu()
        self.total += idx.numel()


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
