"""What calibration accumulates: exact per-channel moments and a histogram of z-scores, both mergeable.

`ChannelStats` keeps count, mean and M2 (sum of squared deviations) per channel in float64 and merges
partial results with the parallel formula of Chan et al., so batches, resumed runs and ranks combine into
the statistics of one pass over all the data. `ZScoreCounter` counts, for a grid of z, the elements within z
standard deviations of their channel mean (the exact, second-pass histogram); `ZScoreSketch` estimates the
same counts in the statistics pass itself, before the final mean and std are known. Counts add up across
batches and ranks.
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

    def __init__(self, dim: int, float64: bool = False):
        self.dim = dim
        self.float64 = float64
        self._count = 0
        self._mean: Optional[torch.Tensor] = None
        self._m2: Optional[torch.Tensor] = None
        self._channels: Optional[int] = None
        self._pending: List[Tuple[int, torch.Tensor, torch.Tensor]] = []
        # the channel means and variances of the latest batch, in the working dtype, for a cheap finiteness check
        self.last_batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    # -- one batch -----------------------------------------------------------------------------------------
    @staticmethod
    def batch_mean_var(x: torch.Tensor, dim: int, float64: bool = False
                       ) -> Optional[Tuple[int, torch.Tensor, torch.Tensor]]:
        """(n, mean, var) of one batch per channel, in the working dtype: n elements per channel, their mean
        and their population variance. None for an empty batch.

        The working dtype is the input's for float32 / float64 and float64 for `float64=True` and for float16 /
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
        if float64 or x.dtype not in (torch.float32, torch.float64):
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
        parts = self.batch_mean_var(x, self.dim, self.float64)
        if parts is not None:
            self.add_moments(*parts)

    def add_moments(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Add one batch given as its moments (n elements per channel, their mean and population variance)."""
        parts = (n, mean, var)
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


def _bincount(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Counts of the values 0..n-1 in `idx` (all within range). `torch.bincount` off the CPU reads the maximum
    back to the host to size its output; `scatter_add_` into a fixed size does not."""
    if idx.device.type == "cpu":
        return torch.bincount(idx, minlength=n)
    return torch.zeros(n, dtype=torch.int64, device=idx.device).scatter_add_(0, idx.long(), torch.ones_like(idx, dtype=torch.int64))


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
        self.estimated = False  # True for counts estimated in one pass (ZScoreSketch)

    def update(self, x: torch.Tensor) -> None:
        shape = [1] * x.dim()
        shape[self.op.dim] = -1
        mean = self.op.mean.view(shape).float()
        scale = (self.STEPS / self.op.std.float()).view(shape)  # a zero std gives inf: never inside the band
        last = float(len(ZSCORE_GRID) - 1) + 0.5
        steps = (x.detach().float() - mean).abs_().mul_(scale).nan_to_num_(nan=last, posinf=last).clamp_(max=last)
        # idx = number of grid points <= z, so "z < grid[k]" holds exactly when idx <= k
        idx = steps.to(torch.int32).add_(1).flatten()
        hist = _bincount(idx, len(ZSCORE_GRID) + 1)[: len(ZSCORE_GRID)]
        if self.counts.device != hist.device:  # counts stay on the data's device: no copy to the host per batch
            self.counts = self.counts.to(hist.device)
        self.counts += torch.cumsum(hist, 0).to(torch.float64)
        self.total += idx.numel()


class ZScoreSketch:
    """One-pass estimate of ZScoreCounter's counts, recorded while the statistics are still being taken.

    The first batch fixes a per-channel grid: z0 = (x - m0) / s0 with m0, s0 that batch's channel mean and std,
    BINS_PER_UNIT bins per unit of z0 over [-RANGE, RANGE] plus one underflow and one overflow bin. Each batch
    adds a bounded, deterministic sample of its elements (whole rows of the (outer, C, inner) view, at most
    SAMPLE elements, 8192) to per-channel counts: one copy per batch, binned in bulk every FLUSH_EVERY
    batches (one `bincount`), nothing read back to the host. Once the final mean and std are known,
    `counter` maps each band |x - mean| < z * std into z0 units per channel and reads the counts inside it,
    interpolating linearly within the two edge bins; elements beyond the grid count as outside any band. The result is an
    estimate (sampled rows, interpolated edges); the audit says so. Memory: C x (2 RANGE BINS_PER_UNIT + 2)
    int64 counts per site.
    """

    BINS_PER_UNIT = 16
    RANGE = 8.0  # first-batch standard deviations: room for later batches that are wider or shifted
    SAMPLE = 1 << 13
    INNER = int(2 * RANGE * BINS_PER_UNIT)  # bins inside the grid
    BINS = INNER + 2                        # plus underflow (0) and overflow (BINS - 1)

    def __init__(self, op: MeanSparse):
        self.op = op
        self.center: Optional[torch.Tensor] = None  # m0, float64, per channel
        self.scale: Optional[torch.Tensor] = None   # s0, float64, per channel
        self._counts: Optional[torch.Tensor] = None  # (C, BINS) int64
        # samples not yet counted, (C, k) copies in the counting dtype: binned together every FLUSH_EVERY
        # batches or when `counts` is read, so a batch costs one copy per site instead of a dozen small ops
        self._pending: List[torch.Tensor] = []
        self.total = 0

    FLUSH_EVERY = 64

    @property
    def counts(self) -> Optional[torch.Tensor]:
        """(C, BINS) int64 counts of every sample added so far."""
        self._count_pending()
        return self._counts

    @counts.setter
    def counts(self, value: Optional[torch.Tensor]) -> None:  # a checkpoint's restore
        self._pending = []
        self._counts = value

    def fix_grid(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        std = var.double().clamp_min(0).sqrt()
        # a channel constant in the first batch has no scale of its own: unit bins
        self.scale = torch.where(std > 0, std, torch.ones_like(std))
        self.center = mean.double().clone()
        self.counts = torch.zeros(mean.numel(), self.BINS, dtype=torch.int64, device=mean.device)

    def update(self, x: torch.Tensor, batch_moments=None) -> None:
        """Add a sample of `x` (the grid comes from `batch_moments`, (mean, var) of x's batch, if unset)."""
        if self._counts is None and batch_moments is None:
            return
        self.add_sample(self.take_sample(x, self.op.dim), batch_moments)

    @classmethod
    def take_sample(cls, x: torch.Tensor, dim: int) -> torch.Tensor:
        """A view of at most SAMPLE elements of `x` as (rows, C, inner): evenly spaced rows of its
        (outer, C, inner) view, then evenly spaced columns if one row is still too long. Shapes only."""
        from fxsparse.ops import _as_3d

        x = x.detach()
        d = dim % x.dim()
        x3 = _as_3d(x, d)
        if x3 is None:
            x3 = x.movedim(d, 0).reshape(x.shape[d], 1, -1).transpose(0, 1)
        outer, channels, inner = x3.shape
        rows = max(1, min(outer, cls.SAMPLE // max(channels * inner, 1)))
        sample = x3[:: max(1, outer // rows)][:rows]
        if sample.numel() > cls.SAMPLE:
            sample = sample[:, :, :: -(-sample.numel() // cls.SAMPLE)]
        return sample

    def add_sample(self, sample: torch.Tensor, batch_moments=None) -> None:
        """Add a (rows, C, inner) sample from `take_sample`: copied now (an in-place activation may overwrite
        it), counted in bulk later (`_count_pending`); the counts are the same as counting it at once."""
        if self._counts is None:
            if batch_moments is None:
                return
            self.fix_grid(*batch_moments)
        if sample.numel() == 0:
            return
        rows, channels, inner = sample.shape
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        part = torch.empty((channels, rows * inner), dtype=dtype, device=sample.device)
        part.view(channels, rows, inner).copy_(sample.transpose(0, 1))
        self._pending.append(part)
        self.total += part.numel()
        if len(self._pending) >= self.FLUSH_EVERY:
            self._count_pending()

    def _count_pending(self) -> None:
        """Bin every pending sample in one vectorised pass and add the bins to the counts."""
        if not self._pending:
            return
        x = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending, 1)
        self._pending = []
        channels = x.shape[0]
        # bin = floor((z0 + RANGE) * BINS_PER_UNIT) + 1 = floor(x * step + shift), clamped into [0, BINS - 1]
        step = self.BINS_PER_UNIT / self.scale
        shift = self.RANGE * self.BINS_PER_UNIT + 1 - self.center * step
        z = torch.addcmul(shift.to(x.device, x.dtype).view(-1, 1), x, step.to(x.device, x.dtype).view(-1, 1))
        z = z.clamp_(0, self.BINS - 1).nan_to_num_(nan=0.0)  # NaN goes to the underflow bin
        offsets = torch.arange(channels, device=z.device, dtype=torch.int32).view(-1, 1) * self.BINS
        idx = z.to(torch.int32).add_(offsets).flatten()
        self._counts.view(-1).add_(_bincount(idx, self._counts.numel()))

    def counter(self, mean: torch.Tensor, std: torch.Tensor) -> "ZScoreCounter":
        """The estimated ZScoreCounter (counts per z of ZSCORE_GRID, total) for final `mean` and `std`."""
        out = ZScoreCounter(self.op)
        out.estimated = True
        if self.counts is None:
            return out
        counts = self.counts.double().cpu()
        inner = counts[:, 1:-1]
        below = torch.cat([torch.zeros(len(counts), 1, dtype=torch.float64), inner.cumsum(1)], 1)  # (C, INNER+1)
        grid = ZSCORE_GRID.view(1, -1)
        mean, std = mean.double().cpu().view(-1, 1), std.double().cpu().view(-1, 1)
        center, scale = self.center.cpu().view(-1, 1), self.scale.cpu().view(-1, 1)

        def cdf(z: torch.Tensor) -> torch.Tensor:  # sampled elements below z0 = z, within the grid
            p = ((z + self.RANGE) * self.BINS_PER_UNIT).clamp(0, self.INNER)
            j = p.floor().clamp(max=self.INNER - 1)
            j_long = j.long()
            return below.gather(1, j_long) + (p - j) * inner.gather(1, j_long)

        lo = cdf((mean - grid * std - center) / scale)
        hi = cdf((mean + grid * std - center) / scale)
        out.counts = (hi - lo).clamp_min(0).sum(0)
        out.counts[0] = 0.0  # |x - mean| < 0 holds nowhere
        out.total = self.total
        return out


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
