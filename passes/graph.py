"""Graph utilities: what a node is (an identity, a pass-through, a channel-fixing producer, a norm) and one walk.

The predicates read the op-name vocabulary (passes/vocabulary.py); `walk` is the one traversal the passes
use to search forward or back from some nodes, each node visited once, and `back_through` the one step back
along a chain of single-input nodes.
"""
from __future__ import annotations

import operator
from typing import Callable, Iterable, Iterator, List, Optional

import torch
from torch import fx

from fxsparse.util import submodule_of
from fxsparse.passes.kinds import kind_of_aten, kind_of_function, kind_of_method, kind_of_module
from fxsparse.passes.vocabulary import (FIRST_MODULES, FIRST_NORM_MODULES, FIRST_OPS, IDENTITY_MODULE_NAMES,
                                        IDENTITY_MODULES, LAST_MODULES, LAST_OPS, NORM_MODULES, NORM_OPS, PASS_MODULE_NAMES, PASS_MODULES, UNARY_OPS, op_name)


def walk(starts: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> Iterator[fx.Node]:
    """Every node reachable from `starts` by `step` (depth first, each node once, `starts` included)."""
    stack, seen = list(starts), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(step(n))


def back_through(node: fx.Node, passes: Callable[[fx.Node], bool]) -> fx.Node:
    """The node reached by stepping back from `node` over nodes that `passes` and that have one input node
    (dropout, identity, ...): the other walk, along one chain instead of a graph."""
    seen = set()
    while node not in seen and passes(node) and len(node.all_input_nodes) == 1:
        seen.add(node)
        node = node.all_input_nodes[0]
    return node


def int_list(value) -> Optional[List[int]]:
    """An int or a sequence of ints as a list (dims, shapes); None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def producer(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """'first' or 'last' when `node` itself fixes the channel axis of its output."""
    mod = submodule_of(gm, node)
    if mod is not None:
        if isinstance(mod, FIRST_NORM_MODULES) or isinstance(mod, FIRST_MODULES):
            return "first"
        if isinstance(mod, LAST_MODULES):
            return "last"
        return None
    if node.op in ("call_function", "call_method"):
        name = op_name(node)
        if name in FIRST_OPS:
            return "first"
        if name in LAST_OPS:
            return "last"
    return None


def is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` is a normalisation layer's output (a module, a function, or output 0 of a native norm)."""
    mod = submodule_of(gm, node)
    if mod is not None:
        return isinstance(mod, NORM_MODULES)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return node.args[1] == 0 and is_norm(gm, node.args[0])
    return node.op in ("call_function", "call_method") and op_name(node) in NORM_OPS



def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` is a module that returns its input unchanged at inference (identity, dropout, drop
    path): the narrowest pass-through (its tables are part of `is_pass`'s, passes/vocabulary.py)."""
    mod = submodule_of(gm, node)
    return mod is not None and (isinstance(mod, IDENTITY_MODULES) or type(mod).__name__ in IDENTITY_MODULE_NAMES)


def is_pass(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` carries its input's axes through (dropout, identity, pooling, activations, casts...)."""
    mod = submodule_of(gm, node)
    if mod is not None:
        return (isinstance(mod, PASS_MODULES) or type(mod).__name__ in PASS_MODULE_NAMES
                or kind_of_module(mod) is not None)
    if node.op == "call_function":
        if op_name(node) in UNARY_OPS:
            return True
        if kind_of_function(node.target) is not None:
            return True
        return isinstance(node.target, torch._ops.OpOverload) and kind_of_aten(node.target) is not None
    if node.op == "call_method":
        return op_name(node) in UNARY_OPS or kind_of_method(node.target) is not None
    return False

