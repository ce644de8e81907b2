"""Evaluation across processes and across batch sizes: per-example randomness, outcomes gathered in order.

Under `torch.distributed` each rank attacks its own shard; `gather_examples` concatenates every rank's
per-example outcomes in rank order, so all ranks compute accuracies, intervals and worst cases over the union.
For the result not to depend on how examples were split into ranks and batches, the randomness of
fxsparse's own attacks (PGD's random starts) is drawn per example, from a seed made of the example itself
(its pixels and label) and the evaluation seed: the same example gets the same start on 1 or 8 ranks, in a
batch of 1 or 256. What remains is floating-point: a model's output for one example can differ in the last
bits between batch shapes (other kernels), which can flip an example sitting on a decision boundary.
"""
from __future__ import annotations

import hashlib
from typing import List

import torch

from fxsparse.calibrate.distributed import all_gather, rank_and_size


def example_fingerprints(x: torch.Tensor, y: torch.Tensor) -> List[str]:
    """One hash per example (pixels and label): splits that share no example share no fingerprint."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    y = y.detach().to("cpu")
    return [hashlib.sha1(xi.numpy().tobytes() + str(int(yi)).encode()).hexdigest() for xi, yi in zip(x, y)]


def example_seeds(x: torch.Tensor, y: torch.Tensor, seed: int) -> List[int]:
    """A 63-bit seed per example from its fingerprint and `seed`."""
    return [int(hashlib.sha1(f"{f}|{seed}".encode()).hexdigest()[:15], 16) for f in example_fingerprints(x, y)]


def restart_seed(seed: int, restart: int) -> int:
    """The seed of an example's `restart`-th random start (restart 0 uses the example's seed itself)."""
    return seed if restart == 0 else int(hashlib.sha1(f"{seed}|restart {restart}".encode()).hexdigest()[:15], 16)


def per_example_rand(x: torch.Tensor, seeds: List[int], normal: bool = False) -> torch.Tensor:
    """Uniform [0, 1) (or standard normal) noise shaped like `x`, each example's drawn from its own seed, so
    it does not depend on the batch it sits in. Drawn on the CPU, moved to x's device and dtype."""
    draw = torch.randn if normal else torch.rand
    parts = [draw(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(parts).to(device=x.device, dtype=x.dtype) if parts else torch.empty_like(x)


def gather_examples(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `values` concatenated in rank order (ranks may hold different numbers of examples);
    the tensor itself outside torch.distributed."""
    rank, size = rank_and_size()
    if size == 1:
        return values
    lengths = [int(n) for n in all_gather(torch.tensor([values.numel()], dtype=torch.int64))]
    wire = torch.float64 if values.is_floating_point() else torch.int64  # gloo moves no bool
    padded = torch.zeros(max(lengths), dtype=wire)
    padded[: values.numel()] = values.detach().cpu().flatten().to(wire)
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)]).to(values.dtype)


def gather_strings(values: List[str]) -> List[str]:
    """Every rank's strings (fingerprints), concatenated in rank order; the list itself outside
    torch.distributed."""
    _, size = rank_and_size()
    if size == 1:
        return list(values)
    out: List[List[str]] = [[] for _ in range(size)]
    torch.distributed.all_gather_object(out, list(values))
    return [v for part in out for v in part]
