"""The MeanSparse operator: values close to their channel's mean are replaced by that mean.

    y = mean_c  if |x - mean_c| < alpha * std_c  else x

`mean`, `std` and `alpha` are buffers, so moving, casting, saving and compiling treat them like any other
model state; `alpha` is a 0-d tensor changed in place, so a new alpha never triggers a recompile. The forward
has no data-dependent Python branch (no host-device sync): with alpha = 0 the comparison is false everywhere
and `torch.where` returns the input's own bits.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class _StraightThroughWhere(torch.autograd.Function):
    """Forward: the MeanSparse output. Backward: the identity (BPDA), for adaptive attacks."""

    @staticmethod
    def forward(ctx, x, mean, threshold):
        return torch.where((x - mean).abs() < threshold, mean, x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class MeanSparse(nn.Module):
    """Per-channel mean sparsification along `dim`, spliced in front of an activation.

    Args:
        channels: size of the channel axis (length of `mean` and `std`).
        dim: the channel axis of the input (1 for NCHW / (B, C, L) / (B, C); -1 for tokens and NHWC).
        inplace: write the result into the input, mirroring an in-place activation so that every alias of
            the input sees what it would have seen in the original program.

    The descriptive attributes (`site`, `module_path`, `kind`, `node`, `axis_rule`) are filled in by the
    splice pass and read by the audit; they are plain attributes, not state.
    """

    def __init__(self, channels: int, dim: int = 1, *, inplace: bool = False):
        super().__init__()
        if channels < 1:
            raise ValueError(f"MeanSparse needs at least one channel, got {channels}")
        self.dim = int(dim)
        self.inplace = bool(inplace)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("alpha", torch.zeros(()))
        # Number of calibration elements per channel behind `mean`/`std`; 0 means uncalibrated.
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.straight_through = False
        # Set by fxsparse.calibrate while it observes this site's input; None otherwise.
        self.observer: Optional[Callable[[torch.Tensor], None]] = None
        # Descriptive metadata, written by the splice pass.
        self.site = ""
        self.module_path = ""
        self.kind = ""
        self.node = ""
        self.axis_rule = ""
        # Calibration-time histogram of |x - mean| / std, for the audit's replaced fractions.
        self.zscore_edges: Optional[torch.Tensor] = None
        self.zscore_counts: Optional[torch.Tensor] = None

    @property
    def channels(self) -> int:
        return self.mean.numel()

    @property
    def calibrated(self) -> bool:
        return not self.count.is_meta and bool(self.count > 0)

    def _broadcast(self, x: torch.Tensor):
        shape = [1] * x.dim()
        shape[self.dim] = -1
        mean = self.mean.to(x.dtype).view(shape)
        threshold = (self.alpha * self.std).to(x.dtype).view(shape)
        return mean, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        mean, threshold = self._broadcast(x)
        if self.straight_through:
            y = _StraightThroughWhere.apply(x, mean, threshold)
        else:
            y = torch.where((x - mean).abs() < threshold, mean, x)
        if self.inplace:
            return x.copy_(y)
        return y

    def extra_repr(self) -> str:
        extra = ", inplace=True" if self.inplace else ""
        return f"channels={self.channels}, dim={self.dim}{extra}, site={self.site!r}"


def meansparse_ops(model: nn.Module) -> "dict[str, MeanSparse]":
    """The MeanSparse operators of a model by site name: in graph order for a GraphModule (operators inside an
    opaque leaf at the leaf's place), in module order otherwise."""
    ordered = []
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module":
                sub = model.get_submodule(node.target)
                ordered.extend(m for m in sub.modules() if isinstance(m, MeanSparse))
    ordered.extend(m for m in model.modules() if isinstance(m, MeanSparse))
    out: "dict[str, MeanSparse]" = {}
    for m in ordered:
        if m not in out.values():
            out[m.site or f"meansparse_{len(out)}"] = m
    return out
