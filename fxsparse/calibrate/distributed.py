"""Across processes: every rank ends with the result of one process over all ranks' data (calibration
statistics here; evaluation outcomes in fxsparse/robust/sharding.py).

Each rank calibrates on its own shard (a `DistributedSampler`, say); afterwards the ranks exchange their
partial (count, mean, M2) per site with one `all_gather` and every rank merges all partials *in rank order*
with the same Chan formula used between batches. Identical inputs in identical order give bit-identical
statistics on every rank, equal to a single process over the union up to float64 rounding (a sum-based
all-reduce would give neither guarantee as cheaply). Histogram counts are integers held in float64, so an
all-reduce sum is exact.

Nothing here does anything unless `torch.distributed` is initialised with more than one process.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from fxsparse.errors import CalibrationError
from fxsparse.calibrate.stats import ChannelStats, ZScoreCounter


def rank_and_size() -> Tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank() -> str:
    """" on rank r" for messages when several processes calibrate, else ""."""
    rank, size = rank_and_size()
    return f" on rank {rank}" if size > 1 else ""


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; every other backend (gloo, mpi) takes CPU tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(t: torch.Tensor) -> List[torch.Tensor]:
    _, size = rank_and_size()
    local = t.to(_comm_device())
    out = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(out, local)
    return [o.cpu() for o in out]


def _sum(t: torch.Tensor) -> torch.Tensor:
    local = t.to(_comm_device())
    torch.distributed.all_reduce(local)
    return local.cpu()


def _gather_same_length(t: torch.Tensor, what: str) -> List[torch.Tensor]:
    lengths = all_gather(torch.tensor([t.numel()], dtype=torch.int64))
    if len({int(n) for n in lengths}) > 1:
        raise CalibrationError(
            f"the ranks calibrate different models ({what} of sizes {[int(n) for n in lengths]}); "
            "prepare the same model with the same selection on every rank")
    return all_gather(t)


def merge_stats_across_ranks(stats: Dict[object, ChannelStats], channels: Dict[object, int]) -> None:
    """Replace each partial ChannelStats in `stats` by the merge of every rank's partial, in rank order."""
    if rank_and_size()[1] == 1:
        return
    keys = list(stats)
    parts = []
    for key in keys:
        s, c = stats[key], channels[key]
        if s.mean is None:
            parts.append(torch.zeros(1 + 2 * c, dtype=torch.float64))
        else:
            parts.append(torch.cat([torch.tensor([float(s.count)], dtype=torch.float64),
                                    s.mean.cpu().double(), s.m2.cpu().double()]))
    gathered = _gather_same_length(torch.cat(parts), "statistics")
    for key, (start, stop) in zip(keys, _offsets([1 + 2 * channels[k] for k in keys])):
        merged, c = ChannelStats(stats[key].dim), channels[key]
        for packed in gathered:
            row = packed[start:stop]
            merged.merge(int(row[0]), row[1:1 + c], row[1 + c:])
        stats[key] = merged


def sum_counters_across_ranks(counters: Sequence[ZScoreCounter]) -> None:
    """Add every rank's histogram counts (and totals) into each counter."""
    if rank_and_size()[1] == 1 or not counters:
        return
    packed = torch.cat([torch.cat([torch.tensor([float(c.total)], dtype=torch.float64), c.counts])
                        for c in counters])
    summed = _sum(packed)
    for c, (start, stop) in zip(counters, _offsets([1 + len(c.counts) for c in counters])):
        c.total = int(summed[start])
        c.counts = summed[start + 1:stop].clone()


def sum_across_ranks(n: int) -> int:
    """`n` summed over ranks (exact for counts below 2**53)."""
    if rank_and_size()[1] == 1:
        return n
    return int(_sum(torch.tensor([float(n)], dtype=torch.float64)))


def check_same_across_ranks(value: int, what: str) -> None:
    """Raise on every rank when the ranks disagree about `value` (so no rank waits forever on the others)."""
    if rank_and_size()[1] == 1:
        return
    values = [int(v) for v in all_gather(torch.tensor([value], dtype=torch.int64))]
    if len(set(values)) > 1:
        raise CalibrationError(f"the ranks disagree about {what}: {values} by rank")


@contextlib.contextmanager
def failing_together(what: str = "calibration", error: type = CalibrationError) -> Iterator[None]:
    """Run a local pass (of calibration, evaluation, ...) so that when one rank fails, every rank raises instead
    of hanging in the next collective: the failing rank re-raises its own error, the others raise `error`
    saying which rank failed."""
    rank, size = rank_and_size()
    if size == 1:
        yield
        return
    try:
        yield
    except Exception:
        _failed_ranks(True)
        raise
    failed = _failed_ranks(False)
    if failed:
        raise error(f"{what} failed on rank(s) {failed}; that rank's error says why (this is rank {rank}, whose "
                    "own data ran fine)")


def _failed_ranks(failed: bool) -> List[int]:
    flags = all_gather(torch.tensor([int(failed)], dtype=torch.int64))
    return [r for r, f in enumerate(flags) if int(f)]


def _offsets(sizes: Sequence[int]) -> List[Tuple[int, int]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out
