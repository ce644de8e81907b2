"""What calibration accumulates: exact per-channel moments and a histogram of z-scores, both mergeable.

`ChannelStats` keeps count, mean and M2 (sum of squared deviations) per channel in float64 and merges
partial results with the parallel formula of Chan et al., so batches, resumed runs and ranks combine into
the statistics of one pass over all the data. `ZScoreCounter` counts, for a grid of z, the elements within z
standard deviations of their channel mean; counts add up across batches and ranks.
"""
from __future__ import annotations

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

    The per-batch work is four vectorised passes over the site's input and nothing else: `update` keeps
    each batch's raw sums (in the input dtype, on its device) and the float64 merge of all pending batches
    runs as a handful of stacked operations when `count`, `mean` or `m2` is read (or every FLUSH_EVERY
    batches), instead of a dozen tiny tensor operations per site per batch.
    """

    FLUSH_EVERY = 64

    def __init__(self, dim: int, exact: bool = False):
        self.dim = dim
        self.exact = exact
        self._count = 0
        self._mean: Optional[torch.Tensor] = None
        self._m2: Optional[torch.Tensor] = None
        self._pending: List[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # the raw channel sums of the latest batch, for a cheap finiteness check
        self.last_batch_sum: Optional[torch.Tensor] = None

    # -- one batch -----------------------------------------------------------------------------------------
    @staticmethod
    def batch_sums(x: torch.Tensor, dim: int, exact: bool = False
                   ) -> Optional[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(n, S, c, Q) of one batch, per channel: n elements, their sum S, the shift c = S / n rounded to the
        working dtype, and Q = sum((x - c)^2). None for an empty batch.

        Shifting by the batch's own channel mean keeps Q free of cancellation. The sums run in the input
        dtype for float32 / float64 (vectorised; `torch.var_mean`'s Welford loop is scalar on CPU and ten
        times slower) and in float64 for `exact=True` and for float16 / bfloat16 input. Float32 rows of at
        most SMALL_INNER elements on CPU take ATen's batch-norm statistics kernel instead (one call).
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
        if x3 is not None:  # (outer, C, inner) view of any dense layout: no copy
            x, d = x3, 1
        if x3 is not None and x3.shape[2] <= SMALL_INNER and x.dtype == torch.float32 and x.device.type == "cpu":
            # few elements per row (tokens, NHWC, late small feature maps): one fused, vectorised statistics
            # kernel beats five small ops. It returns the mean and the biased variance, from which (S, c, Q)
            # follow with c = mean, so the float64 correction term is zero.
            mean, var = torch.ops.aten.batch_norm_update_stats(x3, None, None, 0.0)
            return n, mean.double() * n, mean, var.double() * n
        if x3 is not None:
            # rows first, then across rows: each thread sums the contiguous rows it (and the producing kernel)
            # just touched; one reduction over (outer, inner) splits the work across threads differently and
            # runs up to twice as slow on 2 cores
            total = x3.sum(2).sum(0)
            shift = total / n
            dev = x3 - shift[:, None]
            return n, total, shift, dev.mul_(dev).sum(2).sum(0)  # `dev` is our own temporary: square in place
        dims = [i for i in range(x.dim()) if i != d]
        if not dims:
            return 1, x, x, torch.zeros_like(x)
        total = x.sum(dims, keepdim=True)
        shift = total / n
        dev = x - shift
        squares = dev.mul_(dev).sum(dims)  # `dev` is our own temporary: square it in place
        return n, total.flatten(), shift.flatten(), squares

    @classmethod
    def batch_moments(cls, x: torch.Tensor, dim: int, exact: bool = False) -> Tuple[int, torch.Tensor, torch.Tensor]:
        """(count per channel, mean, M2) of one batch, in float64."""
        sums = cls.batch_sums(x, dim, exact)
        if sums is None:
            zeros = torch.zeros(x.shape[dim], dtype=torch.float64, device=x.device)
            return 0, zeros, zeros.clone()
        n, mean, m2 = _moments([sums])
        return n[0], mean[0], m2[0]

    def update(self, x: torch.Tensor) -> None:
        sums = self.batch_sums(x, self.dim, self.exact)
        if sums is None:
            return
        if self._mean is not None and sums[1].numel() != self._mean.numel() or \
                self._pending and sums[1].numel() != self._pending[0][1].numel():
            known = self._mean.numel() if self._mean is not None else self._pending[0][1].numel()
            raise CalibrationError(f"channel count changed between batches ({known} then {sums[1].numel()})")
        self.last_batch_sum = sums[1]
        self._pending.append(sums)
        if len(self._pending) >= self.FLUSH_EVERY:
            self._flush()

    # -- merging ---------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        ns, means, m2s = _moments(self._pending)
        self._pending = []
        if self._mean is not None:
            ns = [self._count] + ns
            means = torch.cat([self._mean[None].to(means.device), means])
            m2s = torch.cat([self._m2[None].to(m2s.device), m2s])
        self._count, self._mean, self._m2 = _merge_many(ns, means, m2s)

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a partial result (n elements per channel, their mean and M2) into this one."""
        if n == 0:
            return
        self._flush()
        if self._mean is not None and mean.shape != self._mean.shape:
            raise CalibrationError(
                f"channel count changed between batches ({self._mean.numel()} then {mean.numel()})")
        if self._mean is None:
            self._count, self._mean, self._m2 = n, mean.double().clone(), m2.double().clone()
            return
        self._count, self._mean, self._m2 = _merge_many(
            [self._count, n], torch.stack([self._mean, mean.double().to(self._mean.device)]),
            torch.stack([self._m2, m2.double().to(self._m2.device)]))

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


def _moments(batches) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
    """Per-batch (n, mean, M2) in float64 from `batch_sums` results, all batches in one stacked computation:
    mean = S / n, M2 = Q - n (mean - c)^2 (the shift's rounding corrected exactly)."""
    ns = [b[0] for b in batches]
    n = torch.tensor(ns, dtype=torch.float64, device=batches[0][1].device)[:, None]
    # stack promotes mixed float32 / float64 parts; one conversion per quantity, not one per batch
    total, shift, squares = (torch.stack([b[i] for b in batches]).double() for i in (1, 2, 3))
    mean = total / n
    return ns, mean, (squares - n * (mean - shift) ** 2).clamp_min(0)


def _merge_many(ns: List[int], means: torch.Tensor, m2s: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """Pooled (count, mean, M2) of partial results, rows of `means` / `m2s`: the parallel-variance formula
    (Chan et al.) for many parts at once, in float64."""
    total = sum(ns)
    n = torch.tensor(ns, dtype=torch.float64, device=means.device)[:, None]
    mean = (n * means).sum(0) / total
    return total, mean, m2s.sum(0) + (n * (means - mean) ** 2).sum(0)


class ZScoreCounter:
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
