"""calibrate(..., compile=True): the statistics pass as one torch.compile'd program.

The eager pass observes each site from Python (an observer per MeanSparse), so every batch moment is its own
pass over memory. Here the graph is rewritten instead: each MeanSparse call becomes the identity plus a call
that returns the site's batch moments (the one formula, `ChannelStats.batch_mean_var`, traced) and, for the
one-pass histogram, a bounded sample of its input, all as extra outputs of the program. Inductor then fuses
the reductions into the kernels that produce the activations. The moments are merged in float64 by the same
`ChannelStats` as the eager pass, so the statistics agree with it to float rounding (the reductions run in
another order). Operators that are not calls in the graph (inside an opaque leaf) cannot be rewritten: such
models take the eager pass, with a warning.
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from fxsparse.errors import CalibrationError
from fxsparse.ops import MeanSparse, meansparse_ops
from fxsparse.calibrate.stats import ChannelStats, ZScoreSketch


def site_moments(x: torch.Tensor, dim: int, float64: bool, sample: bool):
    """(n, mean, var, sample or None) of one site's input: the eager pass's own formula
    (`ChannelStats.batch_mean_var`, traced by Dynamo), so both engines compute the same moments; n is 0 for
    an empty batch."""
    parts = ChannelStats.batch_mean_var(x, dim, float64)
    if parts is None:
        return 0, None, None, None
    return (*parts, ZScoreSketch.take_sample(x, dim).clone() if sample else None)


def moments_program(gm: fx.GraphModule, sample: bool, float64: bool) -> Optional[Tuple[fx.GraphModule, List[MeanSparse]]]:
    """A GraphModule (sharing gm's modules) that returns (gm's output, per-site moments), and the operators in
    the order of those moments; None if some operator is not a call in gm's graph."""
    graph = copy.deepcopy(gm.graph)
    order, moments = [], []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        op = gm.get_submodule(node.target)
        if not isinstance(op, MeanSparse):
            continue
        x = node.args[0]
        with graph.inserting_after(node):
            moments.append(graph.call_function(site_moments, (x, op.dim, float64, sample)))
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        order.append(op)
    if {id(op) for op in order} != {id(op) for op in meansparse_ops(gm).values()}:
        return None
    output = graph.output_node()
    output.args = ((output.args[0], tuple(moments)),)
    program = fx.GraphModule(gm, graph)
    program.recompile()
    return program, order


class CompiledStatistics(nn.Module):
    """Runs gm's batches through the compiled moments program and feeds the results to `stats` / `sketches`."""

    def __init__(self, gm: fx.GraphModule, stats: Dict[MeanSparse, ChannelStats],
                 sketches: Optional[Dict[MeanSparse, ZScoreSketch]], program, order):
        super().__init__()
        self.gm = gm  # its parameters tell calibrate which device the batches go to
        self.stats, self.sketches, self.order = stats, sketches, order
        self.compiled = torch.compile(program)

    def forward(self, *inputs):
        _, moments = self.compiled(*inputs)
        for op, (n, mean, var, sample) in zip(self.order, moments):
            if n == 0:
                continue
            if mean.numel() != op.channels:
                raise CalibrationError(f"site {op.site!r} expects {op.channels} channels along dim {op.dim}, "
                                       f"but its input has {mean.numel()}")
            stats = self.stats[op]
            stats.add_moments(n, mean, var)
            if self.sketches is not None:
                self.sketches[op].add_sample(sample, stats.last_batch)


def compiled_statistics(gm, stats, sketches) -> Optional[CompiledStatistics]:
    """The compiled runner for `gm`, or None (with a warning) when its operators cannot all be rewritten."""
    float64 = any(s.float64 for s in stats.values())
    built = moments_program(gm, sketches is not None, float64) if isinstance(gm, fx.GraphModule) else None
    if built is None:
        warnings.warn("calibrate(compile=True): some MeanSparse operators sit inside opaque modules, not in the "
                      "graph, so the statistics pass runs eagerly", stacklevel=4)
        return None
    return CompiledStatistics(gm, stats, sketches, *built)
