"""The op-name vocabulary: one normaliser for op names and every table of op and module names the passes use.

An op is named whatever its spelling: FX functions (`torch.sigmoid`, `operator.mul`), tensor methods
(`x.sigmoid()`) and the ATen ops of `torch.export` graphs (`aten.sigmoid.default`) all answer "sigmoid", so
one table serves FX graphs and exported graphs alike. Layout, placement, locate, composites, private inputs
and the coverage tool read their names from here, so a new spelling is taught once.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional

from torch import fx, nn

from fxsparse.ops import MeanSparse

_OPERATORS = {operator.mul: "mul", operator.imul: "mul_", operator.truediv: "div", operator.itruediv: "div_",
              operator.add: "add", operator.iadd: "add_", operator.sub: "sub"}


def bare(name: str) -> str:
    """The name without the trailing underscore of an in-place variant ('relu_' -> 'relu')."""
    return name.rstrip("_") or name


def target_name(target, strip: bool = False) -> Optional[str]:
    """'mul', 'mul_', 'sigmoid', ... for a function, a method name or an ATen op(-packet), whatever its spelling;
    `strip` drops the in-place underscore."""
    if isinstance(target, str):
        name = target
    elif target in _OPERATORS:
        name = _OPERATORS[target]
    else:
        packet = getattr(target, "overloadpacket", None)
        name = packet.__name__ if packet is not None else getattr(target, "__name__", None)
    return bare(name) if strip and name else name


def op_name(node: fx.Node, strip: bool = False) -> Optional[str]:
    """The name of a call_function / call_method node's op (None for other nodes)."""
    if node.op not in ("call_function", "call_method"):
        return None
    return target_name(node.target, strip)


# ---- module tables -----------------------------------------------------------------------------------------
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
# modules that return their input unchanged at inference (placement looks through them for residual joins)
IDENTITY_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
IDENTITY_MODULE_NAMES = {"DropPath", "DropBlock2d", "Identity"}
PASS_MODULES = IDENTITY_MODULES + (MeanSparse, nn.modules.pooling._MaxPoolNd,
                nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.modules.padding._ConstantPadNd,
                nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.PixelShuffle,
                nn.Softmax, nn.LogSoftmax)
PASS_MODULE_NAMES = IDENTITY_MODULE_NAMES | {"LayerScale", "LayerScale2d"}
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)


# ---- op-name tables (op_name: FX functions, tensor methods and ATen packets alike) ----------------------
FIRST_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
             "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "cudnn_batch_norm", "group_norm",
             "native_group_norm", "instance_norm", "mkldnn_convolution"}
LAST_OPS = {"linear", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "addmm", "baddbmm"}
MATMUL_OPS = {"matmul", "mm", "bmm"}  # by a weight: the last dim; between activations: see layout._Analysis.matmul
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
ADD_OPS = {"add", "add_", "iadd"}  # the sums a residual join is made of
BINARY_OPS = {"add", "add_", "iadd", "sub", "sub_", "rsub", "mul", "mul_", "imul", "div", "div_", "truediv",
              "floordiv", "pow", "maximum", "minimum", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "fmod",
              "remainder", "eq", "ne", "lt", "le", "gt", "ge", "copy_"}
RESHAPE_OPS = {"reshape", "view", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_",
               "unsqueeze_", "view_as", "reshape_as", "_reshape_alias"}
PERMUTE_OPS = {"permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"}
CAT_OPS = {"cat", "concat", "concatenate"}
REDUCE_OPS = {"mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm"}
SPLIT_OPS = {"split", "chunk", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk"}

# weight argument positions (layout's declared channel counts): conv groups, norm weights
CONV_GROUPS_ARG = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8, "_convolution": 8}
NORM_WEIGHT_ARG = {"batch_norm": 1, "native_batch_norm": 1, "_native_batch_norm_legit_no_training": 1,
                   "_native_batch_norm_legit": 1, "group_norm": 2, "native_group_norm": 1, "instance_norm": 1}

# placement: steps from attention logits to their softmax (a score, not a feature stream)
SCORE_STEP_OPS = {"add", "add_", "iadd", "sub", "mul", "mul_", "truediv", "div", "masked_fill", "masked_fill_",
                  "reshape", "view", "permute", "transpose", "unsqueeze", "expand", "contiguous", "flatten",
                  "float", "to", "_to_copy", "_unsafe_view", "clone"}
SOFTMAX_OPS = {"softmax", "_softmax", "log_softmax", "_log_softmax"}

# private inputs: methods and ATen ops whose result only their caller sees
FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "mm", "bmm"}
FRESH_ATEN_OPS = {"linear", "addmm", "mm", "bmm", "baddbmm", "convolution", "conv1d", "conv2d", "conv3d", "add",
                  "sub", "mul", "div"}
