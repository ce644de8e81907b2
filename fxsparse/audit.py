"""Audit: where the operators went and what they do, one record per site.

Records are read off the MeanSparse modules themselves (no side table): the site name, the module path of the
activation, its kind, the graph node, the channel axis and the rule that chose it, the channel count, alpha,
a summary of the calibrated statistics, and the fraction of calibration elements replaced at the current
alpha. `to_markdown()`, `to_json()` and `to_networkx()` give the three views.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional

from torch import fx, nn

from fxsparse.errors import FxsparseValueError
from fxsparse._meta import CAPTURE_META, sparsified_part, SITE_META
from fxsparse.calibrate.stats import replaced_fraction
from fxsparse.ops import MeanSparse, meansparse_ops


@dataclasses.dataclass
class SiteRecord:
    site: str
    module_path: str
    kind: str
    node: str
    dim: int
    axis_rule: str
    channels: int
    inplace: bool
    alpha: Optional[float]
    calibrated: bool
    mean_min: Optional[float]
    mean_max: Optional[float]
    std_min: Optional[float]
    std_mean: Optional[float]
    std_max: Optional[float]
    replaced: Optional[float]
    replaced_estimated: bool = False  # `replaced` comes from calibrate's one-pass histogram (an estimate)
    policy: str = "activations"  # the placement policy that put the operator there (passes/placement.py)
    private_input: bool = False  # the input is a fresh tensor only the operator reads (passes/private_inputs.py)
    axis_default: bool = False  # no rule proved the channel axis: the rank default (LayoutWarning said so)


def _record(op: MeanSparse) -> SiteRecord:
    cal = op.calibrated
    mean, std = op.mean.detach().float(), op.std.detach().float()
    if cal:
        mean, std = mean.cpu(), std.cpu()
    summary = (lambda f: float(f) if cal else None)
    return SiteRecord(
        site=op.site, module_path=op.module_path, kind=op.kind, node=op.node, dim=op.dim,
        axis_rule=op.axis_rule, channels=op.channels, inplace=op.inplace, alpha=None if op.alpha.is_meta else float(op.alpha),
        calibrated=cal,
        mean_min=summary(mean.min()), mean_max=summary(mean.max()),
        std_min=summary(std.min()), std_mean=summary(std.mean()), std_max=summary(std.max()),
        replaced=replaced_fraction(op) if cal else None,
        replaced_estimated=bool(cal and op.zscore_counts is not None and op.zscore_estimated),
        policy=op.policy,
        private_input=op.private_input,
        axis_default=op.axis_default,
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Audit(List[SiteRecord]):
    """A list of SiteRecord with the capture report attached."""

    def __init__(self, records, capture: Optional[Dict[str, Any]] = None, graph: Optional[fx.Graph] = None):
        super().__init__(records)
        self.capture = capture or {}
        self._graph = graph

    def to_dict(self) -> Dict[str, Any]:
        return {"capture": self.capture, "sites": [dataclasses.asdict(r) for r in self]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        cols = ["site", "kind", "node", "dim", "axis_rule", "channels", "alpha", "std_mean", "replaced", "policy"]
        head = ["site", "kind", "node", "dim", "axis from", "channels", "alpha", "mean std", "replaced", "policy"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self:
            row = dataclasses.asdict(r)
            cells = [_fmt(row[c]) for c in cols]
            if r.replaced is not None:
                cells[-2] = f"{'~' if r.replaced_estimated else ''}{100 * r.replaced:.1f}%"
            if r.axis_default:
                cells[cols.index("axis_rule")] += " (DEFAULT: unproven)"
            lines.append("| " + " | ".join(cells) + " |")
        summary = f"{len(self)} sites"
        defaults = sum(r.axis_default for r in self)
        if defaults:
            summary += f"; {defaults} channel axes are unproven defaults (set channel_dims to fix)"
        if self.capture:
            summary += f"; captured with {self.capture.get('path', '?')}"
            reasons = self.capture.get("reasons") or {}
            for path, why in reasons.items():
                summary += f"; {path} not used: {why}"
            opaque = self.capture.get("opaque_leaves") or {}
            if opaque and self.capture.get("path") == "fx":
                summary += f"; {len(opaque)} opaque leaves (operators inside): " + ", ".join(sorted(opaque)[:5])
        return "\n".join(lines) + "\n\n" + summary + "\n"

    def to_networkx(self):
        """The rewritten graph as a networkx DiGraph; MeanSparse nodes carry `site` and `meansparse=True`."""
        import networkx as nx

        if self._graph is None:
            raise FxsparseValueError("this audit was made without a graph; call fxsparse.audit(gm) on the GraphModule to get one")
        by_node = {r.node: r for r in self}
        g = nx.DiGraph()
        for node in self._graph.nodes:
            attrs = {"op": node.op, "target": str(node.target)}
            site = node.meta.get(SITE_META)
            if site is not None:
                attrs.update(meansparse=True, site=site)
            elif node.name in by_node:
                attrs.update(activation=by_node[node.name].kind)
            g.add_node(node.name, **attrs)
            for inp in node.all_input_nodes:
                g.add_edge(inp.name, node.name)
        return g

    def _repr_markdown_(self) -> str:  # a notebook shows the table
        return self.to_markdown()


def audit(model: nn.Module) -> Audit:
    """One record per MeanSparse site of `model`, in graph order."""
    records = [_record(op) for op in meansparse_ops(model).values()]
    model = sparsified_part(model) or model  # a model with a sparsified part (prepare(..., submodule=))
    report = model.meta.get(CAPTURE_META) if isinstance(model, fx.GraphModule) else None
    capture = report.as_dict() if report is not None else {}
    graph = model.graph if isinstance(model, fx.GraphModule) else None
    return Audit(records, capture, graph)
