"""Every spelling of every built-in activation kind, as (id, kind, inplace, callable-or-module factory)."""
import functools

import torch
import torch.nn.functional as F
from timm.layers import activations as ta
from timm.layers import activations_me as tam
from torch import nn


def method(name):
    def call(x):
        return getattr(x, name)()
    call.__name__ = f"method_{name}"
    return call


def module(factory):
    """Marks a spelling whose instance is an nn.Module (built fresh per model)."""
    factory.is_module = True
    return factory


SPELLINGS = [
    ("nn.ReLU", "relu", False, module(lambda: nn.ReLU())),
    ("nn.ReLU(inplace)", "relu", True, module(lambda: nn.ReLU(inplace=True))),
    ("F.relu", "relu", False, F.relu),
    ("F.relu(inplace)", "relu", True, functools.partial(F.relu, inplace=True)),
    ("torch.relu", "relu", False, torch.relu),
    ("torch.relu_", "relu", True, torch.relu_),
    ("x.relu()", "relu", False, method("relu")),
    ("x.relu_()", "relu", True, method("relu_")),
    ("nn.ReLU6", "relu6", False, module(lambda: nn.ReLU6())),
    ("nn.ReLU6(inplace)", "relu6", True, module(lambda: nn.ReLU6(inplace=True))),
    ("F.relu6", "relu6", False, F.relu6),
    ("nn.Hardtanh", "relu6", False, module(lambda: nn.Hardtanh(-0.5, 0.5))),
    ("F.hardtanh", "relu6", False, F.hardtanh),
    ("F.hardtanh_", "relu6", True, F.hardtanh_),
    ("nn.LeakyReLU", "leaky_relu", False, module(lambda: nn.LeakyReLU(0.1))),
    ("F.leaky_relu(inplace)", "leaky_relu", True, functools.partial(F.leaky_relu, negative_slope=0.2, inplace=True)),
    ("F.leaky_relu_", "leaky_relu", True, F.leaky_relu_),
    ("nn.PReLU", "prelu", False, module(lambda: nn.PReLU())),
    ("timm.PReLU", "prelu", False, module(lambda: ta.PReLU())),
    ("nn.ELU", "elu", False, module(lambda: nn.ELU())),
    ("F.elu(inplace)", "elu", True, functools.partial(F.elu, inplace=True)),
    ("nn.SELU", "selu", False, module(lambda: nn.SELU())),
    ("torch.selu", "selu", False, torch.selu),
    ("F.selu", "selu", False, F.selu),
    ("nn.CELU", "celu", False, module(lambda: nn.CELU(0.5))),
    ("F.celu", "celu", False, F.celu),
    ("nn.GELU", "gelu", False, module(lambda: nn.GELU())),
    ("nn.GELU(tanh)", "gelu", False, module(lambda: nn.GELU(approximate="tanh"))),
    ("F.gelu", "gelu", False, F.gelu),
    ("F.gelu(tanh)", "gelu", False, functools.partial(F.gelu, approximate="tanh")),
    ("timm.GELU", "gelu", False, module(lambda: ta.GELU())),
    ("timm.GELUTanh", "gelu", False, module(lambda: ta.GELUTanh())),
    ("timm.gelu", "gelu", False, ta.gelu),
    ("nn.SiLU", "silu", False, module(lambda: nn.SiLU())),
    ("nn.SiLU(inplace)", "silu", True, module(lambda: nn.SiLU(inplace=True))),
    ("F.silu", "silu", False, F.silu),
    ("timm.Swish", "silu", False, module(lambda: ta.Swish())),
    ("timm.SwishMe", "silu", False, module(lambda: tam.SwishMe())),
    ("timm.swish", "silu", False, ta.swish),
    ("nn.Mish", "mish", False, module(lambda: nn.Mish())),
    ("F.mish", "mish", False, F.mish),
    ("timm.Mish", "mish", False, module(lambda: ta.Mish())),
    ("timm.MishMe", "mish", False, module(lambda: tam.MishMe())),
    ("nn.Hardswish", "hardswish", False, module(lambda: nn.Hardswish())),
    ("F.hardswish", "hardswish", False, F.hardswish),
    ("timm.HardSwish", "hardswish", False, module(lambda: ta.HardSwish())),
    ("timm.HardSwishMe", "hardswish", False, module(lambda: tam.HardSwishMe())),
    ("timm.QuickGELU", "quick_gelu", False, module(lambda: ta.QuickGELU())),
    ("timm.HardMish", "hard_mish", False, module(lambda: ta.HardMish())),
    # gates and normalisers: sites only when selected
    ("nn.Sigmoid", "sigmoid", False, module(lambda: nn.Sigmoid())),
    ("torch.sigmoid", "sigmoid", False, torch.sigmoid),
    ("x.sigmoid_()", "sigmoid", True, method("sigmoid_")),
    ("nn.Hardsigmoid", "hardsigmoid", False, module(lambda: nn.Hardsigmoid())),
    ("F.hardsigmoid", "hardsigmoid", False, F.hardsigmoid),
    ("nn.Tanh", "tanh", False, module(lambda: nn.Tanh())),
    ("x.tanh()", "tanh", False, method("tanh")),
    ("nn.Softmax", "softmax", False, module(lambda: nn.Softmax(dim=1))),
    ("F.softmax", "softmax", False, functools.partial(F.softmax, dim=1)),
]

GATES = {"sigmoid", "hardsigmoid", "tanh", "softmax"}


def instantiate(spelling):
    fn = spelling[3]
    return fn() if getattr(fn, "is_module", False) else fn
