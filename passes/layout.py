"""Layout: which axis of every tensor in a graph holds the channels, found by one forward pass.

Like shape propagation, `analyze` visits every node once, in topological order, and gives each tensor a
`Layout` fact: its channel axis, or unknown, with where the answer came from ("LayerNorm blocks.3.norm1 +
reshape + permute"). Producers fix the axis (convolutions and batch/group norms: dim 1; Linear, LayerNorm,
RMSNorm and matmuls: the last dim), pass-through ops carry it, permutes and reshapes that keep the channel
axis whole move it, binary elementwise ops combine the facts of their operands (parameters and constants
broadcast and do not vote; disagreeing operands give unknown). The rules are tables keyed by op name (FX
functions, tensor methods and the ATen ops of `torch.export` graphs alike) or module class.

A reshape that splits the channel axis into consecutive axes (heads x head_dim) gives a `split` fact: the
channels span those axes, moved by permutes, kept by elementwise ops and chunks, merged back by a reshape.
The splice views such a site's input as (..., channels) around its operator, so each channel gets its own
statistics (EfficientViT's linear attention applies its ReLU kernel to per-head q and k).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from fxsparse._meta import LAYOUT_META
from fxsparse.util import submodule_of
from fxsparse.passes.graph import int_list, is_pass, producer, walk
from fxsparse.passes.shapes import node_shape
from fxsparse.passes.vocabulary import (ADD_OPS, BINARY_OPS, CAT_OPS, MATMUL_OPS, PERMUTE_OPS, REDUCE_OPS,
                                        RESHAPE_MODULES, RESHAPE_OPS, SPLIT_OPS, op_name)

@dataclasses.dataclass(frozen=True)
class Layout:
    """A tensor's channel axis (None: unknown) and its provenance."""

    dim: Optional[int]
    origin: str
    via: Tuple[str, ...] = ()
    const: bool = False  # computed from parameters, buffers and constants alone: broadcasts, never votes
    split: Tuple[int, ...] = ()  # dim None: the channels span these axes, major to minor (heads x head_dim)

    @property
    def rule(self) -> str:
        return " + ".join((self.origin,) + self.via)

    def moved(self, dim: Optional[int], how: str) -> "Layout":
        if dim is None:
            return Layout(None, f"{self.rule} lost by {how}", const=self.const)
        via = self.via if how in self.via else self.via + (how,)  # bounded: long streams repeat the same moves
        return Layout(dim, self.origin, via, self.const)

    def spread(self, axes: Sequence[int], how: str) -> "Layout":
        """The channels, split by a reshape into several axes (or those axes moved), now on `axes`."""
        via = self.via if how in self.via else self.via + (how,)
        return Layout(None, self.origin, via, self.const, tuple(axes))

    def plain(self, how: str) -> "Layout":
        """This fact for an op with no rule for split channels: unknown when the channels are split."""
        return Layout(None, f"{self.rule} lost by {how}") if self.split else self


UNKNOWN = Layout(None, "unknown")


# ---- the analysis ------------------------------------------------------------------------------------------
class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.facts: Dict[fx.Node, Layout] = {}
        self.order: Optional[Dict[fx.Node, int]] = None  # graph positions, built on first need

    def fact(self, node) -> Layout:
        return self.facts.get(node, UNKNOWN) if isinstance(node, fx.Node) else Layout(None, "constant", const=True)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                fact = self.visit(node)
            except Exception:  # a rule that meets an unexpected spelling answers unknown, never fails the pass
                fact = UNKNOWN
            self.facts[node] = fact
            node.meta[LAYOUT_META] = fact

    def visit(self, node: fx.Node) -> Layout:
        gm, shape = self.gm, node_shape(node)
        if node.op == "get_attr":
            return Layout(None, "parameter", const=True)
        if node.op == "placeholder":
            if shape is not None and len(shape) in (4, 5):
                return Layout(1, "model input (N, C, ...)")
            return Layout(None, "model input")
        if node.op == "output":
            return UNKNOWN
        inputs = node.all_input_nodes
        if all(self.fact(a).const for a in inputs if self.carries_tensors(a)):
            return Layout(None, "constant", const=True)  # parameters reshaped or resized, torch.ones(...), ...
        side = producer(gm, node)
        if side is not None and shape is not None:
            what = type(submodule_of(gm, node)).__name__ if node.op == "call_module" else op_name(node)
            where = f" {node.target}" if node.op == "call_module" else ""
            return Layout((1 if len(shape) > 1 else 0) if side == "first" else len(shape) - 1, f"{what}{where}")
        name = op_name(node)
        rule = self.rule_for(node, name)
        fact = rule(self, node) if rule is not None else None
        return fact if fact is not None else self.elementwise(node, name)

    def rule_for(self, node: fx.Node, name: Optional[str]) -> Optional[Callable]:
        """The table rule for `node` (RULES, by op name; getitem and reshape modules by target)."""
        if node.op == "call_function" and node.target is operator.getitem:
            return _Analysis.getitem
        if isinstance(submodule_of(self.gm, node), RESHAPE_MODULES):
            return _Analysis.reshape
        return RULES.get(name) if name else None

    def elementwise(self, node: fx.Node, name: Optional[str]) -> Layout:
        """Ops with no table rule: binary ops combine their operands, pass-through ops carry their input."""
        inputs, shape = node.all_input_nodes, node_shape(node)
        if name in BINARY_OPS and len(inputs) > 1 or name in ("where", "masked_fill", "lerp"):
            return self.combine(node)
        if is_pass(self.gm, node) or name in BINARY_OPS:
            src = next((a for a in node.args if isinstance(a, fx.Node)), None) or (inputs[0] if inputs else None)
            if src is None or shape is None:
                return UNKNOWN
            if len(inputs) > 1:
                return self.combine(node)
            fact, src_shape = self.fact(src), node_shape(src)
            if fact.split and src_shape != shape:  # padded or resized pieces are no longer the channels
                return fact.plain(name or str(node.target))
            if src_shape is not None and len(src_shape) == len(shape):
                return fact
            return UNKNOWN if fact.dim is None else fact.moved(None, name or str(node.target))
        return UNKNOWN

    def carries_tensors(self, node: fx.Node) -> bool:
        """Whether `node` is a tensor or a tuple of tensors (not a size, an int, a shape)."""
        if node_shape(node) is not None:
            return True
        val = node.meta.get("val")
        if val is not None:
            return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)
        return node.op in ("call_module", "placeholder") or op_name(node) in SPLIT_OPS or producer(self.gm, node) is not None

    def combine(self, node: fx.Node) -> Layout:
        """Elementwise ops with broadcasting: operands vote with their channel axis, aligned to the right, when
        they are not constants and do not broadcast along it."""
        shape = node_shape(node)
        if shape is None:
            return UNKNOWN
        votes: Dict[int, Layout] = {}
        for a in node.all_input_nodes:
            fact, a_shape = self.fact(a), node_shape(a)
            if fact.const or fact.dim is None or a_shape is None or len(a_shape) > len(shape):
                continue
            dim = fact.dim + len(shape) - len(a_shape)
            if a_shape[fact.dim] == shape[dim]:
                votes.setdefault(dim, fact)
        if len(votes) == 1:
            return _at(next(iter(votes.items())))
        if len(votes) > 1:
            skip = self.stream_operand(node)
            if skip is not None and self.fact(skip).dim in votes:  # x + f(x): the sum lives in x's space
                return self.fact(skip).moved(self.fact(skip).dim, "residual stream (the skip's axis)")
            rules = "; ".join(f"dim {d} from {f.rule}" for d, f in votes.items())
            return Layout(None, f"operands disagree ({rules})")
        return UNKNOWN

    def stream_operand(self, node: fx.Node) -> Optional[fx.Node]:
        """x in a residual sum x + f(x) whose operands disagree about the axis (a token-mixing branch:
        transpose, Linear over the tokens, transpose back): the operand the other is computed from. Searched
        only when operands disagree, which is rare, so the analysis stays linear on ordinary graphs."""
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if op_name(node) not in ADD_OPS or len(operands) != 2:
            return None
        a, b = operands
        if node_shape(a) != node_shape(b):
            return None
        return a if self.reaches(a, b) else b if self.reaches(b, a) else None

    def reaches(self, source: fx.Node, node: fx.Node) -> bool:
        """Whether `node` is computed from `source` (a search back from `node` over nodes after `source`)."""
        if self.order is None:
            self.order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        start = self.order[source]
        back = lambda n: n.all_input_nodes if self.order.get(n, -1) >= start else ()  # noqa: E731
        return any(n is source for n in walk(node.all_input_nodes, back))

    def matmul(self, node: fx.Node) -> Layout:
        """a @ W (a weight): the last dim. a @ b (two activations): the output's last axis is b's last, its
        second-to-last is a's second-to-last; the axis holding a channel fact there keeps it."""
        shape = node_shape(node)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if shape is None or len(tensors) != 2:
            return UNKNOWN
        a, b = tensors
        if self.fact(b).const:
            return Layout(len(shape) - 1, f"{op_name(node)} {node.name} by a weight")
        votes = {}
        fa, fb = self.fact(a), self.fact(b)
        sa, sb = node_shape(a), node_shape(b)
        if fb.dim is not None and sb and len(sb) >= 2 and fb.dim == len(sb) - 1:
            votes[len(shape) - 1] = fb.moved(len(shape) - 1, "matmul")
        if fa.dim is not None and sa and len(sa) >= 2 and fa.dim == len(sa) - 2 and len(shape) >= 2:
            votes[len(shape) - 2] = fa.moved(len(shape) - 2, "matmul")
        return next(iter(votes.values())) if len(votes) == 1 else UNKNOWN

    def getitem(self, node: fx.Node) -> Layout:
        src, index = node.args[0], node.args[1]
        if not isinstance(src, fx.Node):
            return UNKNOWN
        shape, src_shape = node_shape(node), node_shape(src)
        if src_shape is None:  # a tuple: pieces of a split keep the axes; output 0 of a native norm or MHA
            if op_name(src) in SPLIT_OPS and src.args and isinstance(src.args[0], fx.Node):
                return self.fact(src.args[0])
            side = producer(self.gm, src)
            if side is not None and index == 0 and shape is not None:
                return Layout((1 if len(shape) > 1 else 0) if side == "first" else len(shape) - 1,
                              f"{self.fact(src).origin}[0]" if self.fact(src).dim is not None else
                              f"{type(submodule_of(self.gm, src)).__name__ if src.op == 'call_module' else op_name(src)}[0]")
            return UNKNOWN
        fact = self.fact(src)
        if fact.dim is None or shape is None:
            return fact.plain("indexing") if fact.dim is None else UNKNOWN
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, (fx.Node, list)) or (i is not None and not isinstance(i, (int, slice, type(Ellipsis))))
               for i in items):
            return fact.moved(None, "advanced indexing")
        consumed = sum(1 for i in items if isinstance(i, (int, slice)))
        expanded: List = []
        for i in items:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(src_shape) - consumed))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(src_shape) - sum(1 for i in expanded if i is not None)))
        src_dim, out_dim = 0, 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if src_dim == fact.dim:
                return fact.moved(out_dim, "slice") if isinstance(i, slice) else fact.moved(None, "indexing")
            src_dim += 1
            out_dim += isinstance(i, slice)
        return UNKNOWN

    def reshape(self, node: fx.Node) -> Layout:
        """A reshape keeps the channel axis when the axis stays whole: it goes to the output axis with the same
        size and the same number of elements before it."""
        src = next((a for a in node.args if isinstance(a, fx.Node)), None)
        shape, src_shape = node_shape(node), node_shape(src) if src is not None else None
        fact = self.fact(src)
        if fact.split and shape is not None and src_shape is not None:
            return self.reshape_split(fact, shape, src_shape)
        if fact.dim is None or shape is None or src_shape is None:
            return fact if fact.dim is None else UNKNOWN
        before, size = math.prod(src_shape[:fact.dim]), src_shape[fact.dim]
        for k in range(len(shape)):
            if math.prod(shape[:k]) == before and shape[k] == size:
                return fact.moved(k, "reshape")
        pieces = _pieces(shape, before, size)
        return fact.spread(pieces, "reshape splits the channels") if pieces else fact.moved(None, "reshape")

    def reshape_split(self, fact: Layout, shape: Sequence[int], src_shape: Sequence[int]) -> Layout:
        """Channels on consecutive axes, in any order (a channel shuffle transposes them), stay channels when a
        reshape keeps them as a block: merged into one axis (whose every index is one channel), or split."""
        first, last = min(fact.split), max(fact.split)
        if sorted(fact.split) != list(range(first, last + 1)):
            return fact.plain("reshape")
        before, size = math.prod(src_shape[:first]), math.prod(src_shape[first:last + 1])
        for k in range(len(shape)):
            if math.prod(shape[:k]) == before and shape[k] == size:
                return fact.moved(k, "reshape merges the channels")
        pieces = _pieces(shape, before, size)
        return fact.spread(pieces, "reshape") if pieces else fact.plain("reshape")

    def permute(self, node: fx.Node) -> Layout:
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        fact, shape = self.fact(src), node_shape(node)
        if src is None or shape is None or (fact.dim is None and not fact.split):
            return fact if fact.dim is None else UNKNOWN
        order = _permutation(node, len(shape))
        if order is None:
            return fact.plain("permute") if fact.split else fact.moved(None, "permute")
        if fact.split:
            return fact.spread([order.index(axis) for axis in fact.split], "permute")
        return fact.moved(order.index(fact.dim), "permute")

    def _dim_arg(self, node: fx.Node, default=0):
        if len(node.args) > 1:
            return node.args[1]
        return node.kwargs.get("dim", node.kwargs.get("axis", default))

    def cat(self, node: fx.Node) -> Layout:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        shape = node_shape(node)
        facts = [self.fact(t) for t in tensors if isinstance(t, fx.Node) and not self.fact(t).const]
        dims = {f.dim for f in facts}
        if shape is None or not facts or len(dims) != 1 or None in dims:
            return Layout(None, "cat of operands with " + ("different" if len(dims) > 1 else "unknown") + " axes")
        return facts[0].moved(facts[0].dim, "cat")

    def stack(self, node: fx.Node) -> Layout:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        shape = node_shape(node)
        facts = [self.fact(t) for t in tensors if isinstance(t, fx.Node) and not self.fact(t).const]
        dims = {f.dim for f in facts}
        k = self._dim_arg(node)
        if shape is None or not facts or len(dims) != 1 or None in dims or not isinstance(k, int):
            return UNKNOWN
        k %= len(shape)
        d = facts[0].dim
        return facts[0].moved(d if d < k else d + 1, "stack")

    def reduce(self, node: fx.Node) -> Optional[Layout]:
        """A reduction of one tensor (None otherwise: the elementwise rules decide)."""
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1:
            return None
        src = tensors[0]
        fact, shape, src_shape = self.fact(src), node_shape(node), node_shape(src)
        if fact.dim is None or shape is None or src_shape is None:
            return fact.plain("reduction") if fact.dim is None else UNKNOWN
        dims = int_list(self._dim_arg(node, None))
        if dims is None:
            return fact.moved(None, "reduction")
        dims = {d % len(src_shape) for d in dims}
        if fact.dim in dims:
            return fact.moved(None, "reduction over the channels")
        if len(shape) == len(src_shape):
            return fact.moved(fact.dim, "reduction")
        return fact.moved(fact.dim - sum(1 for d in dims if d < fact.dim), "reduction")


def _permutation(node: fx.Node, ndim: int) -> Optional[List[int]]:
    """The source axis of each output axis of a permute, transpose, t or movedim call (None: unreadable)."""
    name = op_name(node)
    rest = list(node.args[1:]) or list(node.kwargs.values())
    if name == "permute":
        dims = int_list(list(rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest))
        return [d % ndim for d in dims] if dims is not None and len(dims) == ndim else None
    if name in ("movedim", "moveaxis"):
        srcs, dsts = int_list(rest[0]) if rest else None, int_list(rest[1]) if len(rest) > 1 else None
        if srcs is None or dsts is None:
            return None
        srcs, dsts = [d % ndim for d in srcs], [d % ndim for d in dsts]
        order: List[Optional[int]] = [None] * ndim
        for s, d in zip(srcs, dsts):
            order[d] = s
        left = iter(d for d in range(ndim) if d not in srcs)
        return [o if o is not None else next(left) for o in order]
    pair = [0, 1] if name == "t" else int_list(rest[:2])
    if pair is None or len(pair) != 2:
        return None
    order = list(range(ndim))
    a, b = pair[0] % ndim, pair[1] % ndim
    order[a], order[b] = order[b], order[a]
    return order


def _pieces(shape: Sequence[int], before: int, size: int) -> Optional[Tuple[int, ...]]:
    """Consecutive axes (at least two) of `shape` that hold, as one block, `size` elements that follow
    `before` elements: where a reshape split a channel axis (heads x head_dim)."""
    for k in range(len(shape)):
        if math.prod(shape[:k]) != before:
            continue
        for end in range(k + 2, len(shape) + 1):
            if math.prod(shape[k:end]) == size and all(n > 1 for n in shape[k:end]):
                return tuple(range(k, end))
    return None


def _at(item: Tuple[int, Layout]) -> Layout:
    dim, fact = item
    return fact if fact.dim == dim else dataclasses.replace(fact, dim=dim)


def _table(*rules: Tuple[Sequence[str], Callable]) -> Dict[str, Callable]:
    table: Dict[str, Callable] = {}
    for names, rule in rules:
        for name in names:
            assert name not in table, f"op {name!r} has two layout rules"
            table[name] = rule
    return table


# op name -> rule (a rule answering None leaves the node to the elementwise rules)
RULES = _table((MATMUL_OPS, _Analysis.matmul), (RESHAPE_OPS, _Analysis.reshape), (PERMUTE_OPS, _Analysis.permute),
               (CAT_OPS, _Analysis.cat), (("stack",), _Analysis.stack), (REDUCE_OPS, _Analysis.reduce))


def analyze(gm: fx.GraphModule) -> None:
    """Annotate every node of `gm` with its Layout (node.meta[LAYOUT_META]); one pass, linear in the graph."""
    _Analysis(gm).run()


def layout_of(gm: fx.GraphModule, node: fx.Node) -> Layout:
    """The node's Layout; analyses the graph first when the node has none (a graph just captured or edited)."""
    fact = node.meta.get(LAYOUT_META)
    if fact is None:
        analyze(gm)
        fact = node.meta.get(LAYOUT_META, UNKNOWN)
    return fact


