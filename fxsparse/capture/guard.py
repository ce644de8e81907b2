"""The input guard every captured graph carries: a call the graph cannot take is refused with our error.

A keyword the graph has no input for, a missing input, or (exported graphs) a size that fails a condition
torch.export recorded, each gets an `FxsparseValueError` that says why, instead of torch's error.
"""
from __future__ import annotations

import inspect

import torch
from torch import fx

from fxsparse._meta import CAPTURE_META
from fxsparse.errors import FxsparseValueError
from fxsparse.inputs import Call


def graph_inputs(gm: fx.GraphModule, call: Call) -> list:
    """The values of `gm`'s placeholders, in order, for `call` (what `gm(*call.args, **call.kwargs)` binds):
    through the input spec of an exported graph, by parameter name for an FX graph."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((list(call.args), dict(call.kwargs)), spec))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values, args = [], list(call.args)
    for node in placeholders:
        if args:
            values.append(args.pop(0))
        elif node.target in call.kwargs:
            values.append(call.kwargs[node.target])
        elif node.args:
            values.append(node.args[0])
        else:
            raise FxsparseValueError(f"example inputs give no value for the model input {node.target!r}")
    return values


class InputGuard:
    """A forward pre-hook on a captured graph: inputs the graph cannot take are refused with our error, not
    torch's: a keyword the graph has no input for, or (exported graphs) a size that fails the conditions
    torch.export recorded (`_guards_fn`: "4 * H * W == 256" for a flatten into a Linear, "H == 224" where the
    model fixed the size). Sizes the model leaves free (batch, and height and width where it allows) pass."""

    def __init__(self, gm: fx.GraphModule, example_shapes=None):
        self.names, self.required = _input_names(gm), _input_names(gm, required=True)
        self.example_shapes = example_shapes

    def __call__(self, module, args, kwargs):
        if self.names is not None:
            given = set(self.names[:len(args)]) | set(kwargs)
            missing = [n for n in self.required if n not in given]
            if missing and len(args) <= len(self.names):
                raise FxsparseValueError(
                    f"the captured model needs the inputs {self.required}; {missing} missing: the graph is the "
                    "program the model ran on the example inputs given to fxsparse.prepare, which included "
                    f"{missing}. Pass them, or prepare without them to capture the program that does not use them")
            unknown = [k for k in kwargs if k not in self.names]
            if unknown:
                raise FxsparseValueError(
                    f"the captured model takes the inputs {self.names}, not {unknown}: the graph is the program "
                    f"the model ran on the example inputs given to fxsparse.prepare, which did not include "
                    f"{unknown}. Give them in example_inputs (a dict of keyword tensors) to capture the program "
                    "that uses them, or compute what needs them outside (a loss from the logits)")
        guards = getattr(module, "_guards_fn", None)
        if guards is None:
            return None
        try:
            values = graph_inputs(module, Call(tuple(args), dict(kwargs)))
        except Exception:
            return None  # the graph's own input check gives torch's error
        try:
            guards(*values)
        except AssertionError as exc:
            shapes = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
            report = getattr(module, "meta", {}).get(CAPTURE_META)
            fixed = report.reasons.get("dynamic_shapes") if report is not None else None
            why = (f"fxsparse fixed them: {fixed}" if fixed else
                   "The model fixes these sizes (a flatten into a Linear, position embeddings of one size)")
            raise FxsparseValueError(
                f"inputs of shape(s) {shapes} fail a condition torch.export recorded when it captured the model "
                f"on {self.example_shapes}: {str(exc).replace('Guard failed: ', '')}. {why}; prepare the model "
                "with example inputs of the size you will use") from exc
        return None


def _input_names(gm: fx.GraphModule, required: bool = False):
    try:
        params = inspect.signature(gm.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        return None
    return [p.name for p in params if not required or p.default is inspect.Parameter.empty]


def guard(gm: fx.GraphModule) -> None:
    """Give `gm` an InputGuard pre-hook unless it has one."""
    if not any(isinstance(h, InputGuard) for h in gm._forward_pre_hooks.values()):
        gm.register_forward_pre_hook(InputGuard(gm), with_kwargs=True)
