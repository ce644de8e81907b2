"""Activations written as several ops, recognised so that one operator goes before their shared input.

    x * sigmoid(x)                      silu       (timm's swish function, hand-written Swish)
    x * sigmoid(c * x)                  quick_gelu when c is 1.702 (CLIP's QuickGELU), silu otherwise
    x * tanh(softplus(x))               mish
    0.5 * x * (1 + erf(x / sqrt(2)))    gelu       (also x * 0.7071..., and 0.5 applied first or last)

Ops are compared by name whatever their spelling (`torch.sigmoid`, `x.sigmoid()`, `aten.sigmoid.default`,
`operator.mul`, `aten.mul.Tensor`, ...), so the same patterns match FX graphs and `torch.export` graphs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, List, Optional, Set, Tuple

from torch import fx

from fxsparse.passes.vocabulary import op_name

def _scalar(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _tensor_args(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _scaled(node: fx.Node) -> Optional[Tuple[fx.Node, float]]:
    """(x, c) when node is x * c, c * x or x / (1 / c) with a Python scalar c."""
    base = op_name(node, strip=True)
    if base not in ("mul", "div") or len(node.args) != 2:
        return None
    a, b = node.args
    if base == "mul":
        if isinstance(a, fx.Node) and _scalar(b) is not None:
            return a, _scalar(b)
        if isinstance(b, fx.Node) and _scalar(a) is not None:
            return b, _scalar(a)
    elif isinstance(a, fx.Node) and _scalar(b):
        return a, 1.0 / _scalar(b)
    return None


@dataclasses.dataclass
class Composite:
    kind: str
    source: fx.Node           # the shared input x
    consumers: List[fx.Node]  # pattern nodes that read x directly
    nodes: Set[fx.Node]       # every node of the pattern
    output: fx.Node
    inplace: bool             # some pattern op writes into x


def _other(node: fx.Node, known: fx.Node) -> Optional[fx.Node]:
    args = _tensor_args(node)
    if len(args) != 2 or known not in args:
        return None
    return args[1] if args[0] is known else args[0]


def _writes_into(node: fx.Node, x: fx.Node) -> bool:
    name = op_name(node) or ""
    return name.endswith("_") and bool(node.args) and node.args[0] is x


def _gated_product(gate: fx.Node, gate_input: fx.Node, x: fx.Node) -> Optional[fx.Node]:
    """The node x * gate among the users of gate."""
    for user in gate.users:
        if op_name(user, strip=True) == "mul" and _other(user, gate) is x:
            return user
    return None


def _sigmoid_family(node: fx.Node) -> Optional[Composite]:
    if op_name(node, strip=True) != "sigmoid" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    arg = node.args[0]
    scaled = _scaled(arg)
    x, c, pre = (scaled[0], scaled[1], [arg]) if scaled else (arg, 1.0, [])
    out = _gated_product(node, arg, x)
    if out is None:
        return None
    kind = "quick_gelu" if math.isclose(c, 1.702, rel_tol=1e-3) else "silu"
    nodes = {node, out, *pre}
    consumers = [n for n in nodes if x in n.all_input_nodes]
    return Composite(kind, x, consumers, nodes, out, any(_writes_into(n, x) for n in nodes))


def _mish(node: fx.Node) -> Optional[Composite]:
    if op_name(node, strip=True) != "tanh" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    sp = node.args[0]
    if op_name(sp, strip=True) != "softplus" or not sp.args or not isinstance(sp.args[0], fx.Node):
        return None
    x = sp.args[0]
    out = _gated_product(node, sp, x)
    if out is None:
        return None
    nodes = {sp, node, out}
    return Composite("mish", x, [sp, out], nodes, out, any(_writes_into(n, x) for n in nodes))


def _erf_gelu(node: fx.Node) -> Optional[Composite]:
    if op_name(node, strip=True) != "erf" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    scaled = _scaled(node.args[0])
    if scaled is None or not math.isclose(scaled[1], 1 / math.sqrt(2), rel_tol=1e-3):
        return None
    x, pre = scaled[0], node.args[0]
    plus = [u for u in node.users if op_name(u, strip=True) == "add" and any(_scalar(a) == 1.0 for a in u.args)]
    if len(plus) != 1:
        return None
    plus = plus[0]
    nodes = {pre, node, plus}
    for user in plus.users:
        if op_name(user, strip=True) != "mul":
            continue
        other = _other(user, plus)
        half = _scaled(other) if other is not None else None
        if other is x:  # x * (1 + erf): 0.5 applied last
            last = [u for u in user.users if _scaled(u) and math.isclose(_scaled(u)[1], 0.5)]
            out = last[0] if len(last) == 1 else None
            if out is not None:
                nodes |= {user, out}
                return Composite("gelu", x, [pre, user], nodes, out, False)
        elif half is not None and half[0] is x and math.isclose(half[1], 0.5):  # (0.5 * x) * (1 + erf)
            nodes |= {user, other}
            return Composite("gelu", x, [pre, other], nodes, user, False)
    return None


_MATCHERS = (_sigmoid_family, _mish, _erf_gelu)


def find_composites(gm: fx.GraphModule) -> Iterator[Composite]:
    """Composite activations of `gm` in graph order, each node claimed by at most one."""
    claimed: Set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in claimed:
            continue
        for match in _MATCHERS:
            found = match(node)
            if found is not None and not (found.nodes & claimed):
                claimed |= found.nodes
                yield found
                break
