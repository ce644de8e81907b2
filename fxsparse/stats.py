"""What calibration accumulates: exact per-channel moments and a histogram of z-scores, both mergeable.

`ChannelStats` keeps count, mean and M2 (sum of squared deviations) per channel in float64 and merges
partial results with the parallel formula of Chan et al., so batches, resumed runs and ranks combine into
the statistics of one pass over all the data. `ZScoreCounter` counts, for a grid of z, the elements within z
standard deviations of their channel mean; counts add up across batches and ranks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fxsparse.errors import CalibrationError
from fxsparse.ops import MeanSparse

# Alphas at which the audit knows the replaced fraction exactly: 0, 0.01, ..., 4.
ZSCORE_GRID = torch.linspace(0.0, 4.0, 401, dtype=torch.float64)


class ChannelStats:
    """Running count / mean / M2 per channel along `dim`, in float64."""

    def __init__(self, dim: int, exact: bool = False):
        self.dim = dim
        self.exact = exact
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None
        self.last_batch_mean: Optional[torch.Tensor] = None

    @staticmethod
    def batch_moments(x: torch.Tensor, dim: int, exact: bool = False) -> Tuple[int, torch.Tensor, torch.Tensor]:
        """(count per channel, mean, M2) of one batch, in float64.

        Fast path (float32 / float64 input, any dense layout): moments of each row of the (outer, C, inner)
        view in the input dtype -- one pass over the contiguous axis; on CPU the reduction accumulates in
        double, so each row's mean and variance are the exact values rounded once -- then the rows merged
        exactly in float64. `exact=True` (and float16 / bfloat16 input) converts the batch to float64 first.
        """
        from fxsparse.ops import _as_3d

        d = dim % x.dim()
        x = x.detach()
        n = x.numel() // max(x.shape[d], 1)
        x3 = None if exact or x.dtype not in (torch.float32, torch.float64) else _as_3d(x, d)
        if x3 is not None and x3.shape[0] * x3.shape[2] > 0:
            if x3.shape[2] == 1:  # channels innermost (tokens, NHWC): reduce over rows
                var, mean = torch.var_mean(x3[:, :, 0], dim=0, correction=0)
                return n, mean.double(), var.double() * n
            var, mean = torch.var_mean(x3, dim=-1, correction=0)  # (outer, C), `inner` elements each
            inner = x3.shape[2]
            mean, var = mean.double(), var.double()
            pooled = mean.mean(0)
            return n, pooled, (var * inner).sum(0) + inner * ((mean - pooled) ** 2).sum(0)
        xd = x.to(torch.float64)
        dims = [i for i in range(x.dim()) if i != d]
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
        n, mean, m2 = self.batch_moments(x, self.dim, self.exact)
        self.last_batch_mean = mean
        self.merge(n, mean, m2)

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.m2 / self.count)


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
