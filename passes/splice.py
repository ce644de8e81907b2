"""Splice: put a `MeanSparse` in front of every located site.

For a site in the graph, a `call_module` node `<site>_meansparse` is inserted between the activation and its
input, and only the activation reads from it: other consumers of the input (a residual skip) still read the
original tensor. Where the channels span several axes (heads x head_dim), the operator reads a view with
those axes moved last and flattened, and the activation reads the result moved back. For an in-place activation the operator works in place as well, so every alias of the
input sees exactly what the original program let it see; with alpha = 0 the outputs are bit-identical. When
the input is private to the operator (`passes/private_inputs.py`), eager inference may overwrite it too.

For a site inside an opaque leaf (a no-trace module that could not be traced through), the operator is
registered next to the activation inside the leaf (the leaf belongs to the captured copy, never to the
user's model) and applied by a forward pre-hook on the activation.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import fx, nn

from fxsparse.util import model_state
from fxsparse._meta import INNER_META, PATH_META, SHAPE_META, SITE_META
from fxsparse.errors import FxsparseValueError, LayoutWarning
from fxsparse.ops import MeanSparse
from fxsparse.passes.private_inputs import producer_hooks
from fxsparse.passes.locate import Site
from fxsparse.passes.shapes import node_shape
from fxsparse.passes.sites import Decision, decide, decide_inner, overrides, rank_default


class ApplyBefore:
    """Forward pre-hook that runs a MeanSparse on an activation module's input."""

    def __init__(self, op: MeanSparse):
        self.op = op

    def __call__(self, module: nn.Module, args: tuple):
        return (self.op(args[0]),) + tuple(args[1:])


def _activation_input(node: fx.Node) -> fx.Node:
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    for key in ("input", "x", "self"):
        if isinstance(node.kwargs.get(key), fx.Node):
            return node.kwargs[key]
    raise FxsparseValueError(f"cannot find the tensor input of activation node {node.name} ({node.format_node()})")


def _state_device(gm: fx.GraphModule) -> Tuple[torch.device, torch.dtype]:
    """Where the model's state lives and its floating dtype: operators are made alike, so that preparing a
    half-precision model and casting a prepared one give the same buffers."""
    device, dtype = model_state(gm)
    return device or torch.device("cpu"), dtype or torch.float32


def _make_op(site: Site, shape, decision: Decision, device) -> MeanSparse:
    dim = decision.dim
    op = MeanSparse(shape[dim], dim, inplace=site.inplace).to(device[0])
    op.mean.data, op.std.data = op.mean.to(device[1]), op.std.to(device[1])
    op.alpha.data = op.alpha.to(device[1])
    op.refresh_bounds()
    op.site, op.module_path, op.kind, op.axis_rule = site.name, site.module_path, site.kind, decision.rule
    op.axis_default = decision.default  # the audit flags it; LayoutWarning has said so
    op.policy = site.policy
    return op


def _splice_graph_site(gm: fx.GraphModule, site: Site, device, override) -> Decision:
    act = site.node
    inp = site.source if site.source is not None else _activation_input(act)
    consumers = site.consumers or [act]
    shape = node_shape(inp)
    if shape is None:
        raise FxsparseValueError(f"no shape recorded for the input of site {site.name}; run shape propagation first")
    decision = decide(gm, inp, shape, consumers=consumers, hint=site.axis, override=override)
    if decision.split and site.inplace:  # the view is a copy: an in-place activation would write to it
        decision = _refuse_split(decision, shape)
    target = f"{site.name}_meansparse"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(min(consumers, key=order.__getitem__)):
        if decision.split:
            viewed, restore = _view_channels_last(gm, inp, shape, decision.split)
            op = _make_op(site, node_shape(viewed), decision, device)
            op.inplace = False
            gm.add_submodule(target, op)
            new = gm.graph.call_module(target, (viewed,))
            new.meta[SHAPE_META] = node_shape(viewed)
            out = restore(new)
        else:
            op = _make_op(site, shape, decision, device)
            gm.add_submodule(target, op)
            new = out = gm.graph.call_module(target, (inp,))
            new.meta[SHAPE_META] = shape
    op.node = act.name
    new.meta[PATH_META] = target
    new.meta[SITE_META] = site.name
    for consumer in consumers:
        consumer.replace_input_with(inp, out)
    hooks = producer_hooks(gm, inp, new) if not decision.split else None
    op.private_input, op.producer_hooks = hooks is not None, hooks or ()
    return decision


def _view_channels_last(gm: fx.GraphModule, inp: fx.Node, shape, axes) -> Tuple[fx.Node, Callable]:
    """Nodes that move the channel axes `axes` (major to minor) to the end and flatten them into one, and a
    function that adds the nodes undoing it (unflatten, inverse permute) after a given node. Batch and
    spatial sizes stay symbolic: only the channel pieces' sizes are written into the graph."""
    rest = [d for d in range(len(shape)) if d not in axes]
    perm = rest + list(axes)
    inverse = [perm.index(d) for d in range(len(shape))]
    pieces = tuple(shape[a] for a in axes)
    graph = gm.graph
    moved = graph.call_function(torch.permute, (inp, perm))
    moved.meta[SHAPE_META] = tuple(shape[d] for d in perm)
    viewed = graph.call_function(torch.flatten, (moved, len(rest)))
    viewed.meta[SHAPE_META] = tuple(shape[d] for d in rest) + (math.prod(pieces),)

    def restore(node: fx.Node) -> fx.Node:
        split = graph.call_function(torch.unflatten, (node, -1, pieces))
        split.meta[SHAPE_META] = moved.meta[SHAPE_META]
        back = graph.call_function(torch.permute, (split, inverse))
        back.meta[SHAPE_META] = tuple(shape)
        return back

    return viewed, restore


def _refuse_split(decision: Decision, shape) -> Decision:
    dim = rank_default(len(shape))
    return Decision(dim, f"rank-{len(shape)} default", default=True,
                    problem=f"the channels span axes {decision.split} and the activation is in place, so they "
                            f"cannot be viewed as one axis; used the rank-{len(shape)} default dim {dim}")


def _splice_inner_site(gm: fx.GraphModule, site: Site, device, override) -> Optional[Decision]:
    leaf_node = site.node
    shape = leaf_node.meta.get(INNER_META, {}).get(site.inner)
    if shape is None:
        raise FxsparseValueError(
            f"the activation {site.inner!r} inside {leaf_node.target!r} did not run during shape propagation; "
            "pass example_inputs that exercise it, or exclude the site")
    leaf = gm.get_submodule(leaf_node.target)
    parent_path, _, act_name = site.inner.rpartition(".")
    parent = leaf.get_submodule(parent_path) if parent_path else leaf
    act = parent.get_submodule(act_name)
    name = f"{act_name}_meansparse"
    if hasattr(parent, name):  # the leaf is called more than once: one operator, pooled statistics
        return None
    decision = (Decision(override[0] % len(shape), override[1]) if override is not None
                else decide_inner(leaf, site.inner, shape, f"inside {type(leaf).__name__}"))
    op = _make_op(site, shape, decision, device)
    op.node = f"{leaf_node.name} (inside)"
    parent.add_module(name, op)
    act.register_forward_pre_hook(ApplyBefore(op))
    return decision


def splice(gm: fx.GraphModule, sites: Iterable[Site],
           channel_dims: Optional[Mapping[str, int]] = None) -> fx.GraphModule:
    """Insert one MeanSparse per site (in place on `gm`, which is returned), on the channel axis the layout
    analysis proves (passes/layout.py); `channel_dims` ({site name or module-path glob: dim}) overrides it.
    Sites whose axis is a default, or contradicts a declared channel count, are reported in one LayoutWarning."""
    sites = list(sites)
    device = _state_device(gm)
    forced = overrides(channel_dims, sites)
    problems: Dict[str, str] = {}
    for site in sites:
        splice_site = _splice_graph_site if site.inner is None else _splice_inner_site
        decision = splice_site(gm, site, device, forced.get(site.name))
        if decision is not None and decision.problem:
            problems[site.name] = decision.problem
    if problems:
        listed = "; ".join(f"{name}: {why}" for name, why in list(problems.items())[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        warnings.warn(LayoutWarning(
            f"fxsparse could not prove the channel axis of {len(problems)} site(s): {listed}{more}. The audit "
            "flags them (axis_default). If an axis is wrong, pass channel_dims={'<site name or glob>': dim} to "
            "fxsparse.prepare / sparsify"), stacklevel=3)
    gm.graph.lint()
    gm.recompile()
    return gm
