"""The input guard every captured graph carries: a call the graph cannot take is refused with our error.

A keyword the graph has no input for, a missing input, or (exported graphs) a size that fails a condition
torch.export recorded, each gets an `FxsparseValueError` that says why, instead of torch's error. An FX graph
keeps the model's own size checks (a ViT's `assert H == img_size`, traced as `torch._assert` with a `Proxy` in
its message); `guard` swaps them for `size_check`, which costs what `torch._assert` costs and raises ours.
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import fx

from fxsparse._meta import CAPTURE_META, SHAPE_META
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
        self.first_conv = _first_conv(gm)  # (input position, layer, channels) where a conv reads an input

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
        if self.first_conv is not None:
            self._check_channels(args)
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
            _refuse_channels(shapes, self.example_shapes)
            report = getattr(module, "meta", {}).get(CAPTURE_META)
            fixed = report.reasons.get("dynamic_shapes") if report is not None else None
            why = (f"fxsparse fixed them: {fixed}" if fixed else
                   "The model fixes these sizes (a flatten into a Linear, position embeddings of one size)")
            raise FxsparseValueError(
                f"inputs of shape(s) {shapes} fail a condition torch.export recorded when it captured the model "
                f"on {self.example_shapes}: {str(exc).replace('Guard failed: ', '')}. {why}; prepare the model "
                "with example inputs of the size you will use") from exc
        return None


    def _check_channels(self, args) -> None:
        position, layer, channels = self.first_conv
        x = args[position] if position < len(args) else None
        if isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[1] != channels:
            raise FxsparseValueError(_channels_message(tuple(x.shape), channels, f"{layer}, its first convolution"))


def _channels_message(shape, channels: int, reader: str) -> str:
    return (f"inputs of shape {shape} have {shape[1]} channel(s) but the model reads {channels} ({reader}): give "
            f"{channels}-channel inputs (grayscale into an RGB model: x.expand(-1, {channels}, -1, -1), only if "
            "that is what you mean), or prepare the model for the data it will get")


def _refuse_channels(shapes, example_shapes) -> None:
    """A failed export condition that is a channel count (only dim 1 differs from the example): say so."""
    for shape, example in zip(shapes, example_shapes or []):
        if len(shape) == len(example) >= 3 and shape[1] != example[1]:
            raise FxsparseValueError(_channels_message(shape, example[1], f"captured on inputs of shape {example}"))


def _first_conv(gm: fx.GraphModule):
    """(input position, "layer 'name' (Conv2d)", in_channels) of the first convolution that reads a graph input
    as it is given."""
    from torch.nn.modules.conv import _ConvNd

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.args and node.args[0] in placeholders:
            try:
                layer = gm.get_submodule(node.target)
            except AttributeError:
                continue
            if isinstance(layer, _ConvNd) and layer.in_channels > 0:  # a lazy conv knows none yet
                return placeholders.index(node.args[0]), f"layer {node.target!r} ({type(layer).__name__})", \
                    layer.in_channels
    return None


def _input_names(gm: fx.GraphModule, required: bool = False):
    try:
        params = inspect.signature(gm.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        return None
    return [p.name for p in params if not required or p.default is inspect.Parameter.empty]


def size_check(condition, message: str, captured, inputs=None) -> None:
    """`torch._assert(condition, message)` for a size check the model traced into an FX graph, raising an
    FxsparseValueError that names the size the graph was captured at and the fix."""
    if not condition:
        given = f" (given inputs of shape {tuple(inputs.shape)})" if isinstance(inputs, torch.Tensor) else ""
        raise FxsparseValueError(
            f"the model checks its input size and the call fails it: {message.rstrip('.')}{given}. fxsparse "
            f"captured it with FX on inputs of shape(s) {captured}, and an FX graph keeps the model's fixed size. "
            "Prepare the model with example inputs of the size you will use, or build it to take other sizes and "
            "prepare it again (a timm ViT: timm.create_model(..., dynamic_img_size=True)); capture='export' keeps "
            "height and width dynamic where the model allows it")


def _own_size_checks(gm: fx.GraphModule) -> None:
    """Swap the `torch._assert` calls whose message quotes a traced value (a `Proxy`) for `size_check`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = (n.meta.get(SHAPE_META) for n in placeholders)
    captured = [tuple(s) for s in shapes if isinstance(s, (tuple, list, torch.Size))]
    first = placeholders[0] if placeholders else None
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch._assert and len(node.args) == 2 \
                and isinstance(node.args[1], str) and "Proxy(" in node.args[1]:
            message = re.sub(r"Proxy\([^()]*\)", "traced", re.sub(r" ?\(Proxy\([^()]*\)\)", "", node.args[1]))
            node.target, node.args = size_check, (node.args[0], message, captured, first)
            changed = True
    if changed:
        gm.recompile()


def guard(gm: fx.GraphModule) -> None:
    """Give `gm` an InputGuard pre-hook unless it has one, and our error for the model's own size checks."""
    if not any(isinstance(h, InputGuard) for h in gm._forward_pre_hooks.values()):
        gm.register_forward_pre_hook(InputGuard(gm), with_kwargs=True)
    _own_size_checks(gm)
