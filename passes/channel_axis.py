"""Which axis of an activation's input holds the channels.

The answer comes from the op that produced the tensor: convolutions and batch/group/instance norms give
channel-first features (dim 1: NCHW, (B, C, L), (B, C)); Linear, LayerNorm, RMSNorm and matmuls give
channel-last ones (the last dim: (B, N, C) tokens, NHWC blocks). Elementwise ops, dropout and layout-neutral
methods, splits and same-rank slices are looked through; permutes and transposes move the axis (the same rules cover the ATen ops of
`torch.export` graphs); model inputs count as channel-first. When no producer is recognised, the rank
decides (4-D and up and 2-D: dim 1; 3-D: last dim), and the rule says so, so the audit can show it.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxsparse.ops import MeanSparse
from fxsparse.passes.composites import op_name
from fxsparse.passes.shapes import node_shape

_MAX_WALK = 64


def _channel_last_norm_classes() -> tuple:
    classes = [nn.LayerNorm]
    if hasattr(nn, "RMSNorm"):
        classes.append(nn.RMSNorm)
    try:
        from timm.layers import RmsNorm
        classes.append(RmsNorm)
    except ImportError:
        pass
    return tuple(classes)


def _channel_first_norm_classes() -> tuple:
    """timm's 2-D LayerNorm/RmsNorm variants subclass LayerNorm but normalise the channels of NCHW input."""
    names = ("LayerNorm2d", "LayerNormAct2d", "LayerNormAct2dFp32", "RmsNorm2d", "RmsNormAct2d", "RmsNormAct2dFp32")
    try:
        import timm.layers as tl
    except ImportError:
        return ()
    out = []
    for n in names:
        cls = getattr(tl, n, None) or getattr(getattr(tl, "norm_act", None), n, None)
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
_LAST_MODULES = (nn.Linear, nn.Bilinear, nn.MultiheadAttention) + _channel_last_norm_classes()
_FIRST_2D_NORMS = _channel_first_norm_classes()

_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.group_norm, F.instance_norm, torch.conv1d, torch.conv2d, torch.conv3d,
}
_LAST_FUNCTIONS = {F.linear, F.layer_norm, torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.addmm,
                   torch.layer_norm}
if hasattr(F, "rms_norm"):
    _LAST_FUNCTIONS.add(F.rms_norm)
_LAST_METHODS = {"matmul", "bmm", "baddbmm"}


def _aten(*names: str) -> set:
    return {getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)}


# ATen packets, for graphs captured by torch.export
_FIRST_ATEN = _aten("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d", "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
                    "_native_batch_norm_legit", "cudnn_batch_norm", "group_norm", "native_group_norm",
                    "instance_norm", "mkldnn_convolution")
_LAST_ATEN = _aten("linear", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "matmul", "mm", "bmm",
                   "addmm", "baddbmm")
_PASS_ATEN = _aten("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "clone", "contiguous", "dropout",
                   "native_dropout", "alias", "detach", "_to_copy", "to", "neg", "abs", "clamp", "clamp_", "pad",
                   "constant_pad_nd", "masked_fill", "masked_fill_", "where")


def _packet(target):
    return getattr(target, "overloadpacket", None)

# Ops whose output has the layout of their (first same-shaped) tensor input.
_PASS_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.clamp, torch.clone, torch.abs, torch.neg,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.pad,
}
_PASS_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "contiguous", "clone", "to", "float",
                 "half", "bfloat16", "type_as", "clamp", "clamp_", "neg", "abs", "masked_fill", "masked_fill_"}


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _same_shape_input(node: fx.Node) -> Optional[fx.Node]:
    shape = node_shape(node)
    for arg in list(node.args) + list(node.kwargs.values()):
        if isinstance(arg, fx.Node) and (shape is None or node_shape(arg) == shape):
            return arg
    return None


def _producer_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[str, str]]:
    """('first'|'last', name of the producer) when `node` itself fixes the layout."""
    if node.op == "call_module":
        mod = _module(gm, node)
        if mod is None:
            return None
        if isinstance(mod, _FIRST_2D_NORMS) or isinstance(mod, _FIRST_MODULES):
            return "first", type(mod).__name__
        if isinstance(mod, _LAST_MODULES):
            return "last", type(mod).__name__
        # timm's BatchNormAct / GroupNormAct family subclass the norms above; other leaves: unknown
        return None
    if node.op == "call_function":
        if node.target in _FIRST_FUNCTIONS:
            return "first", getattr(node.target, "__name__", str(node.target))
        if node.target in _LAST_FUNCTIONS:
            return "last", getattr(node.target, "__name__", str(node.target))
        packet = _packet(node.target)
        if packet in _FIRST_ATEN:
            return "first", f"aten.{packet.__name__}"
        if packet in _LAST_ATEN:
            return "last", f"aten.{packet.__name__}"
    if node.op == "call_method" and node.target in _LAST_METHODS:
        return "last", node.target
    return None


_SPLIT_NAMES = {"split", "chunk", "tensor_split", "split_with_sizes"}


def _is_split(node: fx.Node) -> bool:
    return op_name(node) in _SPLIT_NAMES


_RESHAPE_NAMES = {"reshape", "view", "flatten", "unflatten", "_unsafe_view"}


def _is_reshape(node: fx.Node) -> bool:
    return op_name(node) in _RESHAPE_NAMES


def _through_reshape(gm: fx.GraphModule, node: fx.Node, depth: int) -> Optional[Tuple[int, str]]:
    """A reshape that keeps the channel axis whole moves it to the output axis with the same number of
    elements before it (tokens (B, N, C) -> (B, H, W, C); (B, C*k) views are not followed)."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    in_shape, out_shape = (node_shape(src) if src is not None else None), node_shape(node)
    if not in_shape or not out_shape:
        return None
    found = _infer(gm, src, len(in_shape), depth + 1)
    if found is None:
        return None
    d_in, name = found
    before = math.prod(in_shape[:d_in])
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) == before and out_shape[k] == in_shape[d_in]:
            return k, f"{name}+reshape"
    return None


def _permutation(node: fx.Node, ndim: int) -> Optional[Tuple[fx.Node, list]]:
    """(input node, perm) for permute/transpose nodes, with out[i] = in[perm[i]]."""
    packet = _packet(node.target) if node.op == "call_function" else None
    is_permute = (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and (node.target is torch.permute or packet is torch.ops.aten.permute))
    is_transpose = (node.op == "call_method" and node.target in ("transpose", "swapaxes")) or (
        node.op == "call_function" and (node.target in (torch.transpose, torch.swapaxes)
                                        or packet in (torch.ops.aten.transpose, torch.ops.aten.swapaxes)))
    if not (is_permute or is_transpose) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    rest = list(node.args[1:]) or list(node.kwargs.values())
    if is_permute:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        return src, [d % ndim for d in dims]
    if len(rest) != 2 or not all(isinstance(d, int) for d in rest):
        return None
    a, b = rest[0] % ndim, rest[1] % ndim
    perm = list(range(ndim))
    perm[a], perm[b] = b, a
    return src, perm


def _infer(gm: fx.GraphModule, node: fx.Node, ndim: int, depth: int) -> Optional[Tuple[int, str]]:
    if depth > _MAX_WALK:
        return None
    if node.op == "placeholder":  # model inputs: channel-first images, (B, C, L) signals, (B, C) vectors
        return fallback_dim(ndim), "input"
    rule = _producer_rule(gm, node)
    if rule is not None:
        side, name = rule
        return (1 if ndim > 1 else 0, name) if side == "first" else (ndim - 1, name)
    if _is_reshape(node):
        return _through_reshape(gm, node, depth)
    perm = _permutation(node, ndim)
    if perm is not None:
        src, order = perm
        found = _infer(gm, src, ndim, depth + 1)
        if found is None:
            return None
        dim, name = found
        return order.index(dim), f"{name}+permute"
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        if node.args[1] == 0 and _producer_rule(gm, src) is not None:
            return _infer(gm, src, ndim, depth + 1)  # output 0 of native_batch_norm and friends
        if _is_split(src) and isinstance(src.args[0], fx.Node):
            return _infer(gm, src.args[0], ndim, depth + 1)  # a piece of a split keeps its axes
        if node_shape(src) is not None and len(node_shape(src)) == ndim:
            return _infer(gm, src, ndim, depth + 1)  # same-rank slicing, x[..., :k]
    passes = (node.op == "call_function" and (node.target in _PASS_FUNCTIONS or _packet(node.target) in _PASS_ATEN)) or (
        node.op == "call_method" and node.target in _PASS_METHODS) or node.op == "call_module" and isinstance(
        _module(gm, node), (nn.Identity, nn.modules.dropout._DropoutNd, MeanSparse))
    if not passes:
        # activations and other elementwise modules keep the layout too
        from fxsparse.passes.kinds import kind_of_aten, kind_of_function, kind_of_method, kind_of_module

        if node.op == "call_module":
            passes = kind_of_module(_module(gm, node)) is not None if _module(gm, node) is not None else False
        elif node.op == "call_function":
            passes = kind_of_function(node.target) is not None or (
                _packet(node.target) is not None and kind_of_aten(node.target) is not None)
        elif node.op == "call_method":
            passes = kind_of_method(node.target) is not None
    if passes:
        src = _same_shape_input(node)
        if src is not None:
            return _infer(gm, src, ndim, depth + 1)
    return None


def fallback_dim(ndim: int) -> int:
    if ndim <= 1:
        return 0
    return ndim - 1 if ndim == 3 else 1


def infer_channel_dim(gm: fx.GraphModule, node: fx.Node, ndim: int) -> Tuple[int, str]:
    """(channel dim as a non-negative index, the rule that decided it) for the tensor `node` produces."""
    found = _infer(gm, node, ndim, 0)
    if found is not None:
        return found
    return fallback_dim(ndim), f"rank-{ndim} default"
