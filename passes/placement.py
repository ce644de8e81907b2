"""Placement policies: where MeanSparse operators go, beyond "before every activation".

    activations      before each selected activation (passes/locate.py): the default
    norm_activations before each selected activation that reads a normalisation layer's output (BN -> act):
                     pre-activation blocks; gates such as squeeze-excitation's ReLU (fed by a conv) stay alone
    residual         after each residual join: the sum x + f(x), for everything downstream of it
    residual_branch  on the branch of each residual join, just before the sum: f(x) in x + f(x)
    mlp_out          after the second linear of each MLP (Linear or 1x1 conv <- activation <- Linear or 1x1 conv)

Presets reproduce the MeanSparse authors' published models (RobustBench's Meansparse_*.py; tests/test_authors.py):

    wrn        norm_activations + residual        WRN-94-16, WRN-70-16, RaWRN-70-16: between every BN and its
                                                  activation, after every residual add; SE gates untouched
    convnext   activations + residual_branch      ConvNeXt-L: before each MLP GELU, after each block's drop_path
    swin       activations + mlp_out + residual   Swin-L: after fc1 (= before the GELU), after fc2, after each add

A residual join is an add (`+`, `+=`, `torch.add`, `aten.add`) of two tensors of the output's shape where
one operand is computed from the other (x + f(x), looking through identity and dropout modules), or where,
inside a module, both are computed from the module's input and one of them from a single tensor the other
reads too (a projection shortcut: proj(x) + f(x); LambdaNet's content + position outputs, both matmuls of its
q, k and v, are not). Adds of a parameter or buffer (position embeddings, attention biases) are not joins,
nor are attention scores (a sum every use of which reaches a softmax through arithmetic and view ops:
BoTNet's and HaloNet's relative-position logits added to q @ k^T), which have no channel axis. Policies
produce `Site` objects with `source` and `consumers`, which the splice pass already supports; two policies
that pick the same tensor give one operator whose `policy` names both.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from torch import fx, nn

from fxsparse._meta import PATH_META
from fxsparse.util import free_name, submodule_of
from fxsparse.errors import SelectionError
from fxsparse.passes.kinds import kind_of_function, kind_of_method, kind_of_module
from fxsparse.passes.graph import back_through, is_identity, is_norm, walk
from fxsparse.passes.layout import layout_of
from fxsparse.passes.locate import Site, as_selection, check_globs, locate, scoped_name
from fxsparse.passes.shapes import node_shape
from fxsparse.passes.vocabulary import ADD_OPS, SCORE_STEP_OPS, SOFTMAX_OPS, op_name

PRESETS: Dict[str, Tuple[str, ...]] = {
    "wrn": ("norm_activations", "residual"),
    "convnext": ("activations", "residual_branch"),
    "swin": ("activations", "mlp_out", "residual"),
}
DEFAULT = ("activations",)


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and op_name(node) in ADD_OPS


def _through_identities(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    return back_through(node, lambda n: is_identity(gm, n))


def _ancestors(node: fx.Node) -> Set[fx.Node]:
    return set(walk(node.all_input_nodes, lambda n: n.all_input_nodes))


def _inside(node: fx.Node, scope: str) -> bool:
    path = node.meta.get(PATH_META, "")
    return path == scope or path.startswith(scope + ".")


def _walk_back(start: fx.Node, step: Callable[[fx.Node], Union[bool, List[fx.Node]]]) -> Optional[Set[fx.Node]]:
    """Search back from `start`. For each node reached, `step` answers True (a stop: collected, not passed),
    False (give up: None is returned) or the inputs to go on through. Returns the stops."""
    stops: Set[fx.Node] = set()
    through: Dict[fx.Node, List[fx.Node]] = {}
    for n in walk([start], lambda n: through.pop(n, ())):
        answer = step(n)
        if answer is True:
            stops.add(n)
        elif answer is False:
            return None
        else:
            through[n] = answer
    return stops


def _frontier(node: fx.Node, scope: str) -> Set[fx.Node]:
    """The nearest ancestors of `node` produced outside module `scope` (its inputs), parameters excluded."""
    def step(n: fx.Node):
        if n.op == "get_attr":
            return []
        if n is not node and (n.op == "placeholder" or not _inside(n, scope)):
            return True
        return n.all_input_nodes

    return _walk_back(node, step) or set()


@dataclasses.dataclass
class Join:
    """A residual join `node` = skip + branch."""

    node: fx.Node
    skip: fx.Node
    branch: fx.Node


def residual_joins(gm: fx.GraphModule) -> List[Join]:
    """Every residual join of `gm` in graph order (see the module docstring for the rule)."""
    joins = []
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        shape = node_shape(node)
        if len(operands) != 2 or operands[0] is operands[1] or shape is None:
            continue
        if any(node_shape(a) != shape for a in operands):
            continue
        if layout_of(gm, node).const:  # a sum of parameters (position embeddings resized to the input)
            continue
        if _attention_scores(gm, node):  # relative-position logits added to attention logits (BoTNet, HaloNet)
            continue
        a, b = operands
        anc = {a: _ancestors(a), b: _ancestors(b)}
        join = None
        if a in anc[b] or _through_identities(gm, a) in anc[b]:
            join = Join(node, a, b)
        elif b in anc[a] or _through_identities(gm, b) in anc[a]:
            join = Join(node, b, a)
        else:
            scope = node.meta.get(PATH_META, "")
            if scope and _frontier(a, scope) & _frontier(b, scope):
                short = [s for s, other in ((a, b), (b, a)) if _shortcut(gm, s, anc[other], scope)]
                inner_a = sum(_inside(n, scope) for n in anc[a])
                inner_b = sum(_inside(n, scope) for n in anc[b])
                if len(short) == 1:
                    join = Join(node, short[0], b if short[0] is a else a)
                elif short:
                    join = Join(node, a, b) if inner_a <= inner_b else Join(node, b, a)
        if join is not None and _learned(gm, anc[join.branch] - anc[join.skip] - {join.skip}):
            joins.append(join)
    return joins


def _attention_scores(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every use of `node` reaches a softmax through elementwise arithmetic and view ops only: the sum
    is a score (attention logits plus a relative-position bias), a tensor with no channel axis, not a feature
    stream."""
    def step(n: fx.Node) -> bool:
        return submodule_of(gm, n) is None and op_name(n) in SCORE_STEP_OPS

    found = False
    for n in walk(node.users, lambda n: n.users if step(n) else ()):
        mod = submodule_of(gm, n)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)) or mod is None and op_name(n) in SOFTMAX_OPS:
            found = True
        elif not step(n) or not n.users:
            return False
    return found


def _tensor_tuple(node: fx.Node) -> bool:
    """A tuple of tensors (split pieces, max's values and indices), not a size: its items are tensors."""
    return any(u.op == "call_function" and u.target in (operator.getitem, getattr) and node_shape(u) is not None
               for u in node.users)


def _shortcut(gm: fx.GraphModule, node: fx.Node, other: Set[fx.Node], scope: str) -> bool:
    """Whether `node` is a shortcut: computed inside `scope` from one single tensor that the other operand
    is computed from too (a projection conv + BN, a pool, a per-channel scale, MViTv2's and Hiera's pooled
    projections, which concatenate pieces of one tensor). Two results of one inner computation that each mix
    several of its tensors (LambdaNet's content and position outputs: matmuls of its q, k and v; FocalNet's
    gated sums of focal levels) are not a shortcut and a branch. Parameters and constants do not count."""
    def step(n: fx.Node):
        if n in other:
            return True
        if not _inside(n, scope):
            return False
        return [a for a in n.all_input_nodes if not layout_of(gm, a).const
                and (node_shape(a) is not None or _tensor_tuple(a))] or False

    stops = _walk_back(node, step)
    return stops is not None and len(stops) == 1


def _learned(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> bool:
    """Whether a branch uses weights (a module with parameters, a get_attr, or an export graph's lifted
    parameter): x + 0.044715 * x ** 3 inside a tanh GELU is arithmetic, not a residual branch."""
    for n in nodes:
        if n.op == "placeholder":
            return True
        if n.op == "get_attr":  # a parameter; buffers (rotary cos/sin tables) are not learned weights
            try:
                if isinstance(gm.get_parameter(n.target), nn.Parameter):
                    return True
            except AttributeError:
                pass
            continue
        mod = submodule_of(gm, n)
        if mod is not None and next(mod.parameters(), None) is not None:
            return True
    return False


def _linear_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = submodule_of(gm, node)
    if isinstance(mod, nn.Linear):
        return True
    return isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1)


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = submodule_of(gm, node)
        return mod is not None and kind_of_module(mod) is not None
    if node.op == "call_function":
        return kind_of_function(node.target) is not None
    if node.op == "call_method":
        return kind_of_method(node.target) is not None
    return False


def _back_through_layers(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Step back over identity, dropout and LayerNorm-style layers (timm's Mlp puts a norm before fc2)."""
    return back_through(node, lambda n: is_identity(gm, n)
                        or isinstance(submodule_of(gm, n), (nn.LayerNorm, nn.GroupNorm)))


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def mlp_outputs(gm: fx.GraphModule) -> List[fx.Node]:
    """Second linears of MLPs: a Linear / 1x1 conv fed by an activation fed by a sibling Linear / 1x1 conv."""
    found = []
    for node in gm.graph.nodes:
        if not _linear_like(gm, node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        act = _back_through_layers(gm, node.args[0])
        if not _is_activation(gm, act) or not act.args or not isinstance(act.args[0], fx.Node):
            continue
        first = _back_through_layers(gm, act.args[0])
        if _linear_like(gm, first) and _parent(first.target) == _parent(node.target):
            found.append(node)
    return found


def _join_hint(gm: fx.GraphModule, join: Join) -> Optional[Tuple[int, str]]:
    """The sum's channel axis, for a branch whose own layout is unknown (an opaque attention): x + f(x) has
    the shape of f(x), and the layout analysis has combined both operands into the sum's fact."""
    fact = layout_of(gm, join.node)
    return (fact.dim, f"residual sum: {fact.rule}") if fact.dim is not None else None


def _residual_sites(gm: fx.GraphModule) -> List[Site]:
    sites = []
    for j in residual_joins(gm):
        sites.append(Site(scoped_name(j.node, "add"), j.node.meta.get(PATH_META, ""), "add", j.node, False,
                          source=j.node, consumers=list(j.node.users), policy="residual"))
    return sites


def _branch_sites(gm: fx.GraphModule) -> List[Site]:
    sites = []
    for j in residual_joins(gm):
        b = j.branch
        sites.append(Site(scoped_name(j.node, "branch"), j.node.meta.get(PATH_META, ""), "residual_branch", j.node, False,
                          source=b, consumers=[j.node], policy="residual_branch", axis=_join_hint(gm, j)))
    return sites


def _mlp_sites(gm: fx.GraphModule) -> List[Site]:
    out = []
    for fc in mlp_outputs(gm):
        out.append(Site(str(fc.target), str(fc.target), type(gm.get_submodule(fc.target)).__name__.lower(), fc,
                        False, source=fc, consumers=list(fc.users), policy="mlp_out"))
    return out


POLICIES: Dict[str, Callable[[fx.GraphModule], List[Site]]] = {
    "residual": _residual_sites,
    "residual_branch": _branch_sites,
    "mlp_out": _mlp_sites,
}


def resolve(placement: Union[None, str, Iterable[str]]) -> Tuple[str, ...]:
    """Policy names, presets expanded, duplicates dropped, order kept."""
    if placement is None:
        return DEFAULT
    names = [placement] if isinstance(placement, str) else list(placement)
    out: List[str] = []
    for name in names:
        expanded = PRESETS.get(name, (name,))
        for policy in expanded:
            if policy not in _ACTIVATION_POLICIES and policy not in POLICIES:
                known = [*_ACTIVATION_POLICIES, *POLICIES, *PRESETS]
                raise SelectionError(f"unknown placement {name!r}; known policies and presets: {known}")
            if policy not in out:
                out.append(policy)
    if not out:
        raise SelectionError("placement is empty; give a policy such as 'activations' or a preset such as 'swin'")
    return tuple(out)


_ACTIVATION_POLICIES = ("activations", "norm_activations")


def _reads_norm(gm: fx.GraphModule, site: Site) -> bool:
    """Whether the activation of `site` reads a normalisation layer's output (through identities)."""
    src = _source(site)
    return src is not None and is_norm(gm, _through_identities(gm, src))


def _source(site: Site) -> Optional[fx.Node]:
    if site.inner is not None:
        return None
    if site.source is not None:
        return site.source
    act = site.node
    return act.args[0] if act.args and isinstance(act.args[0], fx.Node) else None


def _unique(name: str, taken: Set[str], modules: Set[str]) -> str:
    return free_name(name, lambda n: n in taken or f"{n}_meansparse" in modules)


def place(gm: fx.GraphModule, select=None, placement=None) -> List[Site]:
    """The sites of every policy in `placement`; `select` filters all of them by name (and activations by
    kind). Sites on the same tensor merge into one operator (activation sites first), consumers united."""
    policies = resolve(placement)
    selection = as_selection(select)
    modules = {name for name, _ in gm.named_modules()}
    candidates: list = []
    sites = locate(gm, select, candidates) if "activations" in policies or "norm_activations" in policies else []
    if "norm_activations" in policies and "activations" not in policies:
        sites = [s for s in sites if _reads_norm(gm, s)]
        for s in sites:
            s.policy = "norm_activations"
    taken = {s.name for s in sites}
    by_source = {src: s for s in sites if (src := _source(s)) is not None}
    for policy in policies:
        if policy in _ACTIVATION_POLICIES:
            continue
        for site in POLICIES[policy](gm):
            candidates.append((site.name, site.module_path))
            if not selection.takes_site(site.name, site.module_path):
                continue
            if site.source in by_source:
                _merge(by_source[site.source], site)
                continue
            site.name = _unique(site.name, taken, modules)
            taken.add(site.name)
            sites.append(site)
            by_source[site.source] = site
    check_globs(selection, candidates)
    return sites


def _merge(kept: Site, other: Site) -> None:
    if kept.source is None:
        kept.source = _source(kept)
        kept.consumers = [kept.node]
    for c in other.consumers or [other.node]:
        if c not in kept.consumers:
            kept.consumers.append(c)
    if other.policy not in kept.policy.split("+"):
        kept.policy = f"{kept.policy}+{other.policy}"
    kept.axis = kept.axis or other.axis
    kept.inplace = kept.inplace or other.inplace
