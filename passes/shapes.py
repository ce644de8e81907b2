"""Shape propagation: record the shape of every node's output, and of the input of every activation module
hidden inside an opaque leaf, without running the model for real where possible.

Fake tensors first (no compute, works for models on any device, even `meta`); real execution on the example
inputs when a model does something fake tensors cannot follow.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxsparse.util import first_line
from fxsparse._meta import INNER_META, SHAPE_META
from fxsparse.errors import FxsparseValueError
from fxsparse.passes.kinds import activation_module_classes



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

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        x = args[0] if len(args) == 1 and not kwargs else None
        if (type(module).forward is nn.Linear.forward and isinstance(x, torch.Tensor) and x.dim() >= 1
                and x.shape[-1] == module.in_features and x.dtype == module.weight.dtype
                and not module._forward_hooks and not module._forward_pre_hooks):
            # F.linear's decomposition under fake tensors costs milliseconds per call on batched inputs (a
            # third of the pass on ViTs); its result is a new contiguous tensor of this shape
            return torch.empty(*x.shape[:-1], module.out_features, dtype=x.dtype, device=x.device)
        return super().call_module(target, args, kwargs)


class _RealProp(fx.Interpreter):
    """Real execution, shapes only: torch's ShapeProp prints a traceback of its own for a node that fails,
    before the error that says the same reaches whoever catches it."""

    def __init__(self, gm, recorder):
        super().__init__(gm)
        self.recorder = recorder

    def run_node(self, n):
        self.recorder.current = n
        out = super().run_node(n)
        n.meta[SHAPE_META] = _shape_of(out)
        return out

    def propagate(self, *args):
        return self.run(*args)


class _PreservedState:
    """Module forwards may write into their own state (convit re-assigns a buffer, timm's TinyViT fills an
    attention-bias cache). Shape propagation must leave no fake tensor behind: this snapshot restores buffers
    and tensor, dict and list attributes of the leaf modules (and their children) as they were."""

    def __init__(self, gm: fx.GraphModule):
        self.saved = []
        leaves = {gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        for leaf in leaves:
            for m in leaf.modules():
                attrs = {k: (v, dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else None)
                         for k, v in vars(m).items()
                         if isinstance(v, (torch.Tensor, dict, list)) and not k.startswith("_")}
                self.saved.append((m, dict(m._buffers), attrs, set(vars(m))))

    def restore(self) -> None:
        for m, buffers, attrs, names in self.saved:
            m._buffers.clear()
            m._buffers.update(buffers)
            for k in set(vars(m)) - names:
                delattr(m, k)
            for k, (value, contents) in attrs.items():
                if isinstance(value, dict):
                    value.clear()
                    value.update(contents)
                elif isinstance(value, list):
                    value[:] = contents
                m.__dict__[k] = value


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> str:
    """Annotate `gm` with shapes; returns "fake" or "real" for the method that worked. Module state is left as
    it was (see _PreservedState)."""
    recorder = _InnerShapeRecorder(gm)
    state = _PreservedState(gm)
    try:
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with torch.no_grad():
                _FakeProp(gm, mode, recorder).propagate(*example_inputs)
            return "fake"
        except Exception:
            state.restore()
            for node in gm.graph.nodes:
                node.meta.pop(INNER_META, None)
            try:
                with torch.no_grad():
                    _RealProp(gm, recorder).propagate(*example_inputs)
            except Exception as exc:
                state.restore()
                shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
                raise FxsparseValueError(
                    f"the captured model does not run on example inputs of shapes {shapes}: "
                    f"{first_line(exc)}\nPass example_inputs the model accepts.") from exc
            return "real"
    finally:
        recorder.remove()
        state.restore()


def node_shape(node: fx.Node) -> Tuple[int, ...] | None:
    return node.meta.get(SHAPE_META)
