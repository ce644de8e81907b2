"""Which layer refused an input: re-run a failed forward node by node and name the node that raised.

A failure deep inside a model ("expected input to have 3 channels") rarely says where it happened. When a
calibration batch fails, the GraphModule is run again under an `fx.Interpreter` that stops at the first node
that raises and reports the node, the layer it comes from, and the shapes and dtypes it was given.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import fx

from fxsparse.util import first_line
from fxsparse._meta import PATH_META


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node, inputs: Any, cause: BaseException):
        super().__init__(node.name)
        self.node, self.inputs, self.cause = node, inputs, cause


class _StopAtFailure(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:
            args = self.fetch_args_kwargs_from_env(n)[0] if n.op != "placeholder" else ()
            raise _NodeFailed(n, args, exc) from exc


def describe_tensors(values: Any) -> str:
    """"(2, 5, 6, 6) float32, ..." for the tensors in a nested structure."""
    found = []
    fx.node.map_aggregate(values, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in found) or "no tensors"


def _layer(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "placeholder":
        return f"model input {node.target!r}"
    name = getattr(node.target, "__name__", str(node.target))
    scope = node.meta.get(PATH_META)
    return f"{name} in {scope!r}" if scope else name


def failing_node(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Optional[str]:
    """A sentence naming the node where `gm(*inputs)` fails, or None if it does not fail again."""
    if not isinstance(gm, fx.GraphModule):
        return None
    try:
        with torch.no_grad():
            _StopAtFailure(gm).run(*inputs)
    except _NodeFailed as failed:
        cause = first_line(failed.cause)
        return (f"{_layer(gm, failed.node)} (graph node {failed.node.name}) refused inputs "
                f"[{describe_tensors(failed.inputs)}]: {cause}")
    except Exception:
        return None
    return None
