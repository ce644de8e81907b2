"""Site decisions: a site's channel axis from its layout fact, declared channel counts and user overrides.

`decide` turns a fact into a site's channel axis. Unknown is never silently replaced by a guess: it is
cross-checked against the channel counts that parameters declare (the producer's out_channels, out_features,
normalized_shape, num_features, a consumer's in_channels or in_features), or the tensor has a single
non-batch axis; otherwise the rank default is used and flagged, and the caller warns (`LayoutWarning`).
`overrides` reads the user's `channel_dims`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import operator
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import fx, nn

from fxsparse.util import submodule_of
from fxsparse.errors import SelectionError
from fxsparse.passes.graph import back_through, int_list, is_pass, walk
from fxsparse.passes.layout import layout_of
from fxsparse.passes.shapes import node_shape
from fxsparse.passes.vocabulary import CONV_GROUPS_ARG, NORM_WEIGHT_ARG, op_name


# ---- declared channel counts -------------------------------------------------------------------------------
def _weight_shape(node: fx.Node, index: int) -> Optional[Tuple[int, ...]]:
    arg = node.args[index] if len(node.args) > index else None
    return node_shape(arg) if isinstance(arg, fx.Node) else None


def _declared_by_function(node: fx.Node, side: str) -> Optional[Tuple[int, str]]:
    """Counts that a function's weight arguments fix (torch.export graphs, F.conv2d(x, self.weight), ...)."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[1] == 0:
        return _declared_by_function(node.args[0], side) if side == "out" else None
    name = op_name(node)
    if name in CONV_GROUPS_ARG or name == "linear":
        w = _weight_shape(node, 1)
        if not w or len(w) < 2:
            return None
        if name == "linear":
            count = w[0] if side == "out" else w[1]
        else:
            if len(node.args) > 6 and name in ("convolution", "_convolution") and node.args[6]:
                return None  # transposed convolution
            groups = node.args[CONV_GROUPS_ARG[name]] if len(node.args) > CONV_GROUPS_ARG[name] else 1
            count = w[0] if side == "out" else w[1] * (groups if isinstance(groups, int) else 1)
        return count, f"{name} {node.name} weight {tuple(w)}"
    if name in NORM_WEIGHT_ARG:
        w = _weight_shape(node, NORM_WEIGHT_ARG[name])
        if w and len(w) == 1:
            return w[0], f"{name} {node.name} weight {tuple(w)}"
    if name in ("layer_norm", "native_layer_norm"):
        ns = int_list(node.args[1]) if len(node.args) > 1 else None
        if ns and len(ns) == 1:
            return ns[0], f"{name} {node.name} normalized_shape={tuple(ns)}"
    return None


def declared_out(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[int, str]]:
    """(channel count, what declares it) from the parameters of the module or function that produced `node`."""
    return _declared(gm, node, "out", ("out_channels", "out_features", "num_features", "num_channels", "embed_dim"))


def declared_in(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[int, str]]:
    """(channel count, what declares it) from the parameters of the module or function that reads `node`."""
    return _declared(gm, node, "in", ("in_channels", "in_features", "num_features", "num_channels"))


def _declared(gm: fx.GraphModule, node: fx.Node, side: str, attrs: Tuple[str, ...]) -> Optional[Tuple[int, str]]:
    mod = submodule_of(gm, node)
    if mod is None:
        return _declared_by_function(node, side)
    for attr in attrs:
        value = getattr(mod, attr, None)
        if isinstance(value, int):
            return value, f"{type(mod).__name__} {node.target}.{attr}={value}"
    shape = getattr(mod, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0]), f"{type(mod).__name__} {node.target}.normalized_shape={tuple(shape)}"
    return None



@dataclasses.dataclass
class Decision:
    """A site's channel axis: `default` marks an axis nothing decided (the rank default); `problem` says what
    a warning must report (a default, or an axis that contradicts a declared channel count)."""

    dim: int
    rule: str
    default: bool = False
    problem: Optional[str] = None
    split: Tuple[int, ...] = ()  # the channels span these axes: the splice views them as one last axis (dim -1)


def rank_default(ndim: int) -> int:
    if ndim <= 1:
        return 0
    return ndim - 1 if ndim == 3 else 1


def _forward_consumers(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> List[fx.Node]:
    """The nodes that read `nodes` through single-input pass-through ops."""
    forwards = lambda n: n.users if is_pass(gm, n) and len(n.all_input_nodes) == 1 else ()  # noqa: E731
    return [n for n in walk(nodes, forwards) if not (is_pass(gm, n) and len(n.all_input_nodes) == 1)]


def declared_counts(gm: fx.GraphModule, source: fx.Node, consumers: Sequence[fx.Node] = ()) -> List[Tuple[int, str]]:
    """Channel counts fixed by parameters: the producer's outputs, the consumers' inputs."""
    found = []
    out = declared_out(gm, back_through(source, lambda n: is_pass(gm, n)))
    if out is not None:
        found.append(out)
    for c in _forward_consumers(gm, list(consumers) or list(source.users)):
        inp = declared_in(gm, c)
        if inp is not None:
            found.append(inp)
    return found


def _by_count(shape: Sequence[int], counts: List[Tuple[int, str]]) -> Optional[Tuple[int, str]]:
    """The axis fixed by declared counts: the counts agree, and exactly one non-batch axis has that size."""
    sizes = {c for c, _ in counts}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    axes = [d for d in range(1 if len(shape) > 1 else 0, len(shape)) if shape[d] == size]
    if len(axes) != 1:
        return None
    return axes[0], f"size matches {counts[0][1]}"


def decide(gm: fx.GraphModule, source: fx.Node, shape: Sequence[int], *, consumers: Sequence[fx.Node] = (),
           hint: Optional[Tuple[int, str]] = None, override: Optional[Tuple[int, str]] = None) -> Decision:
    """The channel axis of the site reading `source` (see the module docstring for the order of evidence)."""
    ndim = len(shape)
    if override is not None:
        return Decision(override[0] % ndim, override[1])
    fact = layout_of(gm, source)
    counts = declared_counts(gm, source, consumers)
    if fact.dim is not None or hint is not None:
        dim, rule = (fact.dim, fact.rule) if fact.dim is not None else hint
        out = declared_out(gm, back_through(source, lambda n: is_pass(gm, n)))
        if out is not None and shape[dim] != out[0] and out[0] in shape[1:]:
            return Decision(dim, rule, problem=f"axis {dim} (size {shape[dim]}, from {rule}) contradicts {out[1]}")
        return Decision(dim, rule)
    if fact.split:
        axes = ", ".join(map(str, fact.split))
        return Decision(-1, f"{fact.rule}: channels on axes ({axes}), viewed as one last axis", split=fact.split)
    found = _by_count(shape, counts)
    if found is not None:
        return Decision(*found)
    if ndim <= 2:
        return Decision(ndim - 1, "the only non-batch axis")
    dim = rank_default(ndim)
    return Decision(dim, f"rank-{ndim} default", default=True,
                    problem=f"no rule decides the channel axis ({fact.rule}); used the rank-{ndim} default dim {dim}")


def _declares(mod: nn.Module, name: str) -> Optional[Tuple[int, str]]:
    for attr in ("num_features", "out_channels", "out_features", "num_channels"):
        value = getattr(mod, attr, None)
        if isinstance(value, int):
            return value, f"{type(mod).__name__} {name}.{attr}={value}"
    return None


def decide_inner(leaf: nn.Module, inner_path: str, shape: Sequence[int], what: str) -> Decision:
    """The channel axis of a site inside an opaque leaf, from declared channel counts: the module holding the
    activation (timm's BatchNormAct2d: num_features), else the nearest sibling registered before it."""
    parent_path, _, act_name = inner_path.rpartition(".")
    parent = leaf.get_submodule(parent_path) if parent_path else leaf
    candidates = [_declares(parent, parent_path or type(leaf).__name__)]
    before = []
    for name, mod in parent.named_children():
        if name == act_name:
            break
        before.append(_declares(mod, f"{parent_path}.{name}" if parent_path else name))
    candidates.extend(reversed(before))
    for count in candidates:
        found = _by_count(shape, [count]) if count is not None else None
        if found is not None:
            return Decision(found[0], f"{what}: {found[1]}")
    ndim = len(shape)
    if ndim <= 2:
        return Decision(ndim - 1, f"{what}: the only non-batch axis")
    dim = rank_default(ndim)
    return Decision(dim, f"{what}: rank-{ndim} default", default=True,
                    problem=f"inside an opaque module no declared channel count decides the axis; used dim {dim}")


def overrides(channel_dims: Optional[Mapping[str, int]], sites: Sequence) -> Dict[str, Tuple[int, str]]:
    """{site name: (dim, rule)} for the sites a `channel_dims` glob matches (site name or module path);
    a glob that matches no site, or a dim that is not an int, is an error."""
    if not channel_dims:
        return {}
    out: Dict[str, Tuple[int, str]] = {}
    for pattern, dim in channel_dims.items():
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise SelectionError(f"channel_dims[{pattern!r}] must be an int axis, got {dim!r}")
        hits = [s for s in sites if fnmatch.fnmatchcase(s.name, pattern) or fnmatch.fnmatchcase(s.module_path, pattern)]
        if not hits:
            raise SelectionError(f"channel_dims pattern {pattern!r} matches no site; site names are "
                                 f"{[s.name for s in sites][:10]}")
        for s in hits:
            out.setdefault(s.name, (dim, f"channel_dims[{pattern!r}]"))
    return out
