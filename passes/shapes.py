"""Shape propagation: record the shape of every node's output, and of the input of every activation module
hidden inside an opaque leaf, without running the model for real where possible.

Fake tensors first (no compute, works for models on any device, even `meta`); real execution on the example
inputs when a model does something fake tensors cannot follow.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

from fxsparse.errors import FxsparseError
from fxsparse.passes.kinds import activation_module_classes

SHAPE_META = "fxsparse_shape"
INNER_META = "fxsparse_inner_shapes"  # on opaque-leaf nodes: {inner module path: input shape}


def _shape_of(value) -> Tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


class _InnerShapeRecorder:
    """Forward pre-hooks on the activations inside opaque leaves; they note the input shape per graph node."""

    def __init__(self, gm: fx.GraphModule):
        self.current: fx.Node | None = None
        self.handles = []
        classes = activation_module_classes()
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            leaf = gm.get_submodule(node.target)
            if isinstance(leaf, classes):
                continue
            for inner_path, inner in leaf.named_modules():
                if inner_path and isinstance(inner, classes):
                    self.handles.append(inner.register_forward_pre_hook(self._hook(inner_path)))

    def _hook(self, inner_path: str):
        def hook(module, args):
            if self.current is not None and args:
                shape = _shape_of(args[0])
                if shape is not None:
                    self.current.meta.setdefault(INNER_META, {}).setdefault(inner_path, shape)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _FakeProp(FakeTensorProp):
    def __init__(self, gm, mode, recorder):
        super().__init__(gm, mode)
        self.recorder = recorder

    def run_node(self, n):
        self.recorder.current = n
        out = super().run_node(n)
        n.meta[SHAPE_META] = _shape_of(out)
        return out


class _RealProp(ShapeProp):
    def __init__(self, gm, recorder):
        super().__init__(gm)
        self.recorder = recorder

    def run_node(self, n):
        self.recorder.current = n
        out = super().run_node(n)
        n.meta[SHAPE_META] = _shape_of(out)
        return out


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> str:
    """Annotate `gm` with shapes; returns "fake" or "real" for the method that worked."""
    recorder = _InnerShapeRecorder(gm)
    try:
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with torch.no_grad():
                _FakeProp(gm, mode, recorder).propagate(*example_inputs)
            return "fake"
        except Exception:
            for node in gm.graph.nodes:
                node.meta.pop(INNER_META, None)
            try:
                with torch.no_grad():
                    _RealProp(gm, recorder).propagate(*example_inputs)
            except Exception as exc:
                shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
                raise FxsparseError(
                    f"the captured model does not run on example inputs of shapes {shapes}: "
                    f"{str(exc).splitlines()[0]}\nPass example_inputs the model accepts.") from exc
            return "real"
    finally:
        recorder.remove()


def node_shape(node: fx.Node) -> Tuple[int, ...] | None:
    return node.meta.get(SHAPE_META)
