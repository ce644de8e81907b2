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

`decide` turns a fact into a site's channel axis. Unknown is never silently replaced by a guess: it is
cross-checked against the channel counts that parameters declare (the producer's out_channels, out_features,
normalized_shape, num_features, a consumer's in_channels or in_features), or the tensor has a single
non-batch axis; otherwise the rank default is used and flagged, and the caller warns (`LayoutWarning`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import operator
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from fxsparse._meta import LAYOUT_META
from fxsparse.util import submodule_of
from fxsparse.errors import SelectionError
from fxsparse.ops import MeanSparse
from fxsparse.passes.composites import op_name
from fxsparse.passes.kinds import kind_of_aten, kind_of_function, kind_of_method, kind_of_module
from fxsparse.passes.shapes import node_shape


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


# ---- rule tables -------------------------------------------------------------------------------------------
def _classes(names: Iterable[str]) -> tuple:
    out = []
    try:
        import timm.layers as tl
    except ImportError:
        return ()
    for n in names:
        cls = getattr(tl, n, None) or getattr(getattr(tl, "norm_act", None), n, None)
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


# timm's 2-D LayerNorm / RmsNorm variants subclass LayerNorm but normalise the channels of NCHW input
FIRST_NORM_MODULES = _classes(("LayerNorm2d", "LayerNormAct2d", "LayerNormAct2dFp32", "RmsNorm2d", "RmsNormAct2d",
                               "RmsNormAct2dFp32", "LayerNorm2dFp32"))
FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
LAST_MODULES = (nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.LayerNorm) + tuple(
    c for c in (getattr(nn, "RMSNorm", None),) if c is not None) + _classes(("RmsNorm", "SimpleNorm", "LayerNormFp32"))
NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + FIRST_NORM_MODULES + tuple(
    c for c in (getattr(nn, "RMSNorm", None),) if c is not None) + _classes(("RmsNorm",))
PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, MeanSparse, nn.modules.pooling._MaxPoolNd,
                nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.modules.padding._ConstantPadNd,
                nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.PixelShuffle,
                nn.Softmax, nn.LogSoftmax)
PASS_MODULE_NAMES = {"DropPath", "DropBlock2d", "Identity", "LayerScale", "LayerScale2d"}
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)

# op names (composites.op_name: FX functions, tensor methods and ATen packets alike)
FIRST_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
             "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "cudnn_batch_norm", "group_norm",
             "native_group_norm", "instance_norm", "mkldnn_convolution"}
LAST_OPS = {"linear", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "addmm", "baddbmm"}
MATMUL_OPS = {"matmul", "mm", "bmm"}  # by a weight: the last dim; between activations: see _Analysis.matmul
NORM_OPS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
            "_native_batch_norm_legit_functional", "cudnn_batch_norm", "group_norm", "native_group_norm",
            "instance_norm", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}
UNARY_OPS = {"abs", "neg", "exp", "log", "sigmoid", "tanh", "sqrt", "rsqrt", "reciprocal", "sign", "clamp", "clip",
             "clamp_min", "clamp_max", "float", "half", "bfloat16", "double", "to", "_to_copy", "type", "type_as",
             "contiguous", "clone", "detach", "alias", "dropout", "native_dropout", "feature_dropout",
             "alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "pad", "constant_pad_nd", "reflection_pad1d",
             "reflection_pad2d", "replication_pad2d", "roll", "interpolate", "upsample_nearest2d",
             "upsample_bilinear2d", "upsample_bicubic2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
             "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
             "max_pool2d", "max_pool3d", "adaptive_max_pool2d", "lp_pool2d", "pixel_shuffle", "expand", "expand_as",
             "flip", "nan_to_num", "softmax", "_softmax", "log_softmax", "_log_softmax", "normalize", "erf",
             "cumsum", "requires_grad_", "square", "pow", "mean_sparse", "dropout_", "fill_", "zero_",
             "copy_", "masked_fill", "masked_fill_", "contiguous_format"}
ADD_OPS = {"add", "add_", "iadd"}  # the sums a residual join is made of (placement.residual_joins too)
BINARY_OPS = {"add", "add_", "iadd", "sub", "sub_", "rsub", "mul", "mul_", "imul", "div", "div_", "truediv",
              "floordiv", "pow", "maximum", "minimum", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "fmod",
              "remainder", "eq", "ne", "lt", "le", "gt", "ge", "copy_"}
RESHAPE_OPS = {"reshape", "view", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_",
               "unsqueeze_", "view_as", "reshape_as", "_reshape_alias"}
PERMUTE_OPS = {"permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"}
CAT_OPS = {"cat", "concat", "concatenate"}
REDUCE_OPS = {"mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm"}
SPLIT_OPS = {"split", "chunk", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk"}


def _base(node: fx.Node) -> str:
    name = op_name(node) or ""
    return "truediv" if name == "truediv" else name


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
        name = _base(node)
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
    return node.op in ("call_function", "call_method") and _base(node) in NORM_OPS


_CONV_GROUPS = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8, "_convolution": 8}
_NORM_WEIGHT = {"batch_norm": 1, "native_batch_norm": 1, "_native_batch_norm_legit_no_training": 1,
                "_native_batch_norm_legit": 1, "group_norm": 2, "native_group_norm": 1, "instance_norm": 1}


def _weight_shape(node: fx.Node, index: int) -> Optional[Tuple[int, ...]]:
    arg = node.args[index] if len(node.args) > index else None
    return node_shape(arg) if isinstance(arg, fx.Node) else None


def _declared_by_function(node: fx.Node, side: str) -> Optional[Tuple[int, str]]:
    """Counts that a function's weight arguments fix (torch.export graphs, F.conv2d(x, self.weight), ...)."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[1] == 0:
        return _declared_by_function(node.args[0], side) if side == "out" else None
    name = _base(node)
    if name in _CONV_GROUPS or name == "linear":
        w = _weight_shape(node, 1)
        if not w or len(w) < 2:
            return None
        if name == "linear":
            count = w[0] if side == "out" else w[1]
        else:
            if len(node.args) > 6 and name in ("convolution", "_convolution") and node.args[6]:
                return None  # transposed convolution
            groups = node.args[_CONV_GROUPS[name]] if len(node.args) > _CONV_GROUPS[name] else 1
            count = w[0] if side == "out" else w[1] * (groups if isinstance(groups, int) else 1)
        return count, f"{name} {node.name} weight {tuple(w)}"
    if name in _NORM_WEIGHT:
        w = _weight_shape(node, _NORM_WEIGHT[name])
        if w and len(w) == 1:
            return w[0], f"{name} {node.name} weight {tuple(w)}"
    if name in ("layer_norm", "native_layer_norm"):
        ns = _ints(node.args[1]) if len(node.args) > 1 else None
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


def _is_pass(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = submodule_of(gm, node)
    if mod is not None:
        return (isinstance(mod, PASS_MODULES) or type(mod).__name__ in PASS_MODULE_NAMES
                or kind_of_module(mod) is not None)
    if node.op == "call_function":
        if _base(node) in UNARY_OPS:
            return True
        if kind_of_function(node.target) is not None:
            return True
        return isinstance(node.target, torch._ops.OpOverload) and kind_of_aten(node.target) is not None
    if node.op == "call_method":
        return _base(node) in UNARY_OPS or kind_of_method(node.target) is not None
    return False


# ---- the analysis ------------------------------------------------------------------------------------------
def _ints(value) -> Optional[List[int]]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


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
            what = type(submodule_of(gm, node)).__name__ if node.op == "call_module" else _base(node)
            where = f" {node.target}" if node.op == "call_module" else ""
            return Layout((1 if len(shape) > 1 else 0) if side == "first" else len(shape) - 1, f"{what}{where}")
        name = _base(node)
        if name in MATMUL_OPS:
            return self.matmul(node)
        if node.op == "call_function" and node.target is operator.getitem:
            return self.getitem(node)
        if submodule_of(gm, node) is not None and isinstance(submodule_of(gm, node), RESHAPE_MODULES) or name in RESHAPE_OPS:
            return self.reshape(node)
        if name in PERMUTE_OPS:
            return self.permute(node)
        if name in CAT_OPS:
            return self.cat(node)
        if name == "stack":
            return self.stack(node)
        if name in REDUCE_OPS and len([a for a in node.args if isinstance(a, fx.Node)]) == 1:
            return self.reduce(node)
        if name in BINARY_OPS and len(inputs) > 1 or name in ("where", "masked_fill", "lerp"):
            return self.combine(node)
        if _is_pass(gm, node) or name in BINARY_OPS:
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
        return node.op in ("call_module", "placeholder") or _base(node) in SPLIT_OPS or producer(self.gm, node) is not None

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
        if _base(node) not in ADD_OPS or len(operands) != 2:
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
        stack, seen = list(node.all_input_nodes), set()
        while stack:
            n = stack.pop()
            if n is source:
                return True
            if n in seen or self.order.get(n, -1) < start:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return False

    def matmul(self, node: fx.Node) -> Layout:
        """a @ W (a weight): the last dim. a @ b (two activations): the output's last axis is b's last, its
        second-to-last is a's second-to-last; the axis holding a channel fact there keeps it."""
        shape = node_shape(node)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if shape is None or len(tensors) != 2:
            return UNKNOWN
        a, b = tensors
        if self.fact(b).const:
            return Layout(len(shape) - 1, f"{_base(node)} {node.name} by a weight")
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
            if _base(src) in SPLIT_OPS and src.args and isinstance(src.args[0], fx.Node):
                return self.fact(src.args[0])
            side = producer(self.gm, src)
            if side is not None and index == 0 and shape is not None:
                return Layout((1 if len(shape) > 1 else 0) if side == "first" else len(shape) - 1,
                              f"{self.fact(src).origin}[0]" if self.fact(src).dim is not None else
                              f"{type(submodule_of(self.gm, src)).__name__ if src.op == 'call_module' else _base(src)}[0]")
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

    def reduce(self, node: fx.Node) -> Layout:
        src = next(a for a in node.args if isinstance(a, fx.Node))
        fact, shape, src_shape = self.fact(src), node_shape(node), node_shape(src)
        if fact.dim is None or shape is None or src_shape is None:
            return fact.plain("reduction") if fact.dim is None else UNKNOWN
        dims = _ints(self._dim_arg(node, None))
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
    name = _base(node)
    rest = list(node.args[1:]) or list(node.kwargs.values())
    if name == "permute":
        dims = _ints(list(rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest))
        return [d % ndim for d in dims] if dims is not None and len(dims) == ndim else None
    if name in ("movedim", "moveaxis"):
        srcs, dsts = _ints(rest[0]) if rest else None, _ints(rest[1]) if len(rest) > 1 else None
        if srcs is None or dsts is None:
            return None
        srcs, dsts = [d % ndim for d in srcs], [d % ndim for d in dsts]
        order: List[Optional[int]] = [None] * ndim
        for s, d in zip(srcs, dsts):
            order[d] = s
        left = iter(d for d in range(ndim) if d not in srcs)
        return [o if o is not None else next(left) for o in order]
    pair = [0, 1] if name == "t" else _ints(rest[:2])
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


# ---- site decisions ----------------------------------------------------------------------------------------
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


def _back_to_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Step back over single-input pass-through ops (dropout, identity, activations) to the producing node."""
    seen = set()
    while node not in seen and _is_pass(gm, node) and len(node.all_input_nodes) == 1:
        seen.add(node)
        node = node.all_input_nodes[0]
    return node


def _forward_consumers(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> List[fx.Node]:
    out, stack, seen = [], list(nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_pass(gm, n) and len(n.all_input_nodes) == 1:
            stack.extend(n.users)
        else:
            out.append(n)
    return out


def declared_counts(gm: fx.GraphModule, source: fx.Node, consumers: Sequence[fx.Node] = ()) -> List[Tuple[int, str]]:
    """Channel counts fixed by parameters: the producer's outputs, the consumers' inputs."""
    found = []
    out = declared_out(gm, _back_to_module(gm, source))
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
        out = declared_out(gm, _back_to_module(gm, source))
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
