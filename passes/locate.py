"""Locate: find the activation calls of a captured graph and pick the ones a selection asks for.

A site is one activation *call*: a module called twice (torchvision's BasicBlock reuses `self.relu`) gives
two sites, `layer1.0.relu` and `layer1.0.relu_1`, because each call sees different statistics. An activation
module inside an opaque leaf is a site too (`inner` names it relative to the leaf), and so is an activation
written as several ops (passes/composites.py: `source` is its input, `consumers` the ops that read it).
On `torch.export` graphs the ATen ops of each kind are matched and named by `nn_module_stack`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import fx

from fxsparse._meta import ACTIVATION_MODULE_META, PATH_META
from fxsparse.util import free_name, scoped
from fxsparse.errors import SelectionError
from fxsparse.passes.composites import find_composites
from fxsparse.passes.vocabulary import target_name
from fxsparse.passes.kinds import (ActivationKind, activation_module_classes, get_kind, kind_of_aten,
                                   kind_of_function, kind_of_method, kind_of_module)



@dataclasses.dataclass(frozen=True)
class Selection:
    """Which sites to take: activation kinds (None: every default kind) and module-path globs."""

    kinds: Optional[Sequence[str]] = None
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()

    def takes_kind(self, kind: ActivationKind) -> bool:
        return kind.default if self.kinds is None else kind.name in self.kinds

    def takes_site(self, name: str, path: Optional[str] = None) -> bool:
        """A glob matches a site when it matches the site's name or its module path: `layer1.0.relu_1` is the
        second call only, `layer1.0.relu` (the module, and its first call's name) every call of the module.
        A site is taken when an include glob matches it and no exclude glob does."""
        names = (name,) if path is None or path == name else (name, path)

        def hit(patterns):
            return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)
        return hit(self.include) and not hit(self.exclude)


def as_selection(select: Union[None, Selection, Mapping[str, Any], str, Iterable[str]]) -> Selection:
    """Accepts a Selection, a dict of its fields, one kind name, or a list of kind names."""
    if select is None:
        return Selection()
    if isinstance(select, Selection):
        sel = select
    elif isinstance(select, Mapping):
        unknown = set(select) - {"kinds", "include", "exclude"}
        if unknown:
            raise SelectionError(f"unknown selection keys {sorted(unknown)}; use kinds, include, exclude")
        sel = Selection(**{k: (tuple(v) if not isinstance(v, str) else (v,)) for k, v in select.items()
                           if v is not None})  # None: that field's default
    elif isinstance(select, str):
        sel = Selection(kinds=(select,))
    else:
        sel = Selection(kinds=tuple(select))
    if sel.kinds is not None:
        for name in sel.kinds:
            get_kind(name)  # raises on an unknown kind
    return sel


@dataclasses.dataclass
class Site:
    name: str                 # unique, dotted like a module path: "layer1.0.relu", "blocks.0.mlp.gelu_1"
    module_path: str          # the activation module, or the module whose forward calls the function
    kind: str
    node: fx.Node             # the activation node (for an inner site: the opaque leaf's node)
    inplace: bool
    inner: Optional[str] = None  # activation path inside the opaque leaf `node.target`
    source: Optional[fx.Node] = None  # composite activations: their shared input x ...
    consumers: Optional[List[fx.Node]] = None  # ... and the pattern nodes that read x
    policy: str = "activations"  # the placement policy that chose the site (passes/placement.py)
    axis: Optional[Tuple[int, str]] = None  # (channel dim, rule): a hint for when the source's layout is unknown


def _bound_inplace(fn, node: fx.Node) -> bool:
    if target_name(fn, strip=True) != target_name(fn):
        return True  # the name lost a trailing underscore: relu_, aten.silu_, ...
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def scoped_name(node: fx.Node, leaf_name: str) -> str:
    """A name in the scope (module path) the node was recorded in."""
    return scoped(node.meta.get(PATH_META, ""), leaf_name)


def _raw_sites(gm: fx.GraphModule):
    """(path, kind, node, inplace, inner, composite) for every activation call in graph order."""
    classes = activation_module_classes()
    composites = {c.output: c for c in find_composites(gm)}
    claimed = {n for c in composites.values() for n in c.nodes}
    for node in gm.graph.nodes:
        if node in composites:
            c = composites[node]
            yield scoped_name(node, c.kind), get_kind(c.kind), node, c.inplace, None, c
            continue
        if node in claimed:
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind = kind_of_module(mod)
            if kind is not None:
                yield node.target, kind, node, bool(getattr(mod, "inplace", False)), None, None
                continue
            for inner_path, inner in mod.named_modules():
                if not inner_path or not isinstance(inner, classes):
                    continue
                inner_kind = kind_of_module(inner)
                yield (f"{node.target}.{inner_path}", inner_kind, node,
                       bool(getattr(inner, "inplace", False)), inner_path, None)
        elif node.op == "call_function":
            kind = kind_of_function(node.target)
            if kind is None and isinstance(node.target, torch._ops.OpOverload):
                kind = kind_of_aten(node.target)
            if kind is not None:
                if node.meta.get(ACTIVATION_MODULE_META):  # export graph: the op of an activation module
                    path = node.meta.get(PATH_META, "")
                else:
                    path = scoped_name(node, target_name(node.target, strip=True) or str(node.target))
                yield path, kind, node, _bound_inplace(node.target, node), None, None
        elif node.op == "call_method":
            kind = kind_of_method(node.target)
            if kind is not None:
                yield scoped_name(node, target_name(node.target, strip=True)), kind, node, node.target.endswith("_"), None, None


def _skip_nested(raw):
    """An activation module nested inside another one (a user kind wrapping nn.ReLU) is one site."""
    taken: List[str] = []
    for item in raw:
        path, _, _, _, inner, _ = item
        if inner is not None and any(path.startswith(t + ".") for t in taken):
            continue
        taken.append(path)
        yield item


def check_globs(selection: Selection, candidates: Sequence[Tuple[str, Optional[str]]]) -> None:
    """Every include / exclude glob the user gave matches some site (by name or module path): a typo would
    otherwise select nothing, or exclude nothing, without a word (set_alpha refuses the same mistake)."""
    names = [n for name, path in candidates for n in ((name,) if path in (None, name) else (name, path))]
    given = [("include", p) for p in selection.include if tuple(selection.include) != ("*",)]
    given += [("exclude", p) for p in selection.exclude]
    missed = [f"{key} {p!r}" for key, p in given if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missed:
        shown = ", ".join(list(dict.fromkeys(name for name, _ in candidates))[:8]) or "none"
        raise SelectionError(f"{'; '.join(missed)} matches no site of the model: check the glob against the site "
                             f"names (fxsparse.audit lists them; first sites: {shown})")


def locate(gm: fx.GraphModule, select=None, candidates: Optional[list] = None) -> List[Site]:
    """Every selected activation call of `gm`, in graph order, with unique site names. `candidates`, when
    given, receives (name, module path) of every site of a selected kind, before the globs filter them."""
    selection = as_selection(select)
    sites: List[Site] = []
    used = {name for name, _ in gm.named_modules()}
    seen: dict = {}
    for path, kind, node, inplace, inner, composite in _skip_nested(_raw_sites(gm)):
        if not selection.takes_kind(kind):
            continue
        count = seen.get(path, 0)
        seen[path] = count + 1
        name = free_name(path, lambda n: (n in used and n != path) or f"{n}_meansparse" in used, start=count)
        if candidates is not None:
            candidates.append((name, path))
        if not selection.takes_site(name, path):
            continue
        used.add(f"{name}_meansparse")
        site = Site(name, path, kind.name, node, inplace, inner)
        if composite is not None:
            site.source, site.consumers = composite.source, list(composite.consumers)
        sites.append(site)
    return sites
