"""The registry of activation kinds: one entry covers every spelling of one activation.

A kind lists its module classes (matched with isinstance, so subclasses such as timm's `PReLU` count), its
callables (`F.gelu`, `torch.relu_`, timm's `gelu` ...), its tensor-method names (in-place variants included)
and its ATen op packets (for graphs captured by `torch.export`). Kinds with `default=False` (gates and
normalisers such as sigmoid and softmax) are known to the pass but only become sites when selected by name.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ActivationKind:
    name: str
    modules: Tuple[type, ...] = ()
    functions: Tuple[Callable, ...] = ()
    methods: Tuple[str, ...] = ()
    aten: Tuple[object, ...] = ()
    default: bool = True

    def matches_module(self, module: nn.Module) -> bool:
        return bool(self.modules) and isinstance(module, self.modules)

    def matches_function(self, fn: Callable) -> bool:
        return any(fn is f for f in self.functions)

    def matches_aten(self, op: object) -> bool:
        packet = getattr(op, "overloadpacket", op)
        return any(packet is a for a in self.aten)


_REGISTRY: Dict[str, ActivationKind] = {}


def register_activation(
    name: str,
    modules: Iterable[type] = (),
    functions: Iterable[Callable] = (),
    methods: Iterable[str] = (),
    aten: Iterable[object] = (),
    default: bool = True,
    replace: bool = False,
) -> ActivationKind:
    """Add (or, with `replace=True`, redefine) an activation kind.

    Module classes given here are also treated as leaves by the tracer, so a user activation written as
    several ops still shows up as one node. Kinds registered later are matched first.
    """
    from fxsparse.errors import SelectionError

    if not name or not isinstance(name, str):
        raise SelectionError("register_activation needs a non-empty kind name")
    if name in _REGISTRY and not replace:
        raise SelectionError(f"activation kind {name!r} already exists; pass replace=True to redefine it")
    kind = ActivationKind(
        name=name,
        modules=tuple(modules),
        functions=tuple(functions),
        methods=tuple(methods),
        aten=tuple(aten),
        default=default,
    )
    for cls in kind.modules:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise SelectionError(f"kind {name!r}: {cls!r} is not an nn.Module class")
    _REGISTRY.pop(name, None)
    _REGISTRY[name] = kind
    return kind


def unregister_activation(name: str) -> None:
    _REGISTRY.pop(name, None)


def activation_kinds() -> Tuple[ActivationKind, ...]:
    """All kinds, most recently registered first (user kinds win over the built-in ones)."""
    return tuple(reversed(list(_REGISTRY.values())))


def get_kind(name: str) -> ActivationKind:
    from fxsparse.errors import SelectionError

    try:
        return _REGISTRY[name]
    except KeyError:
        raise SelectionError(f"unknown activation kind {name!r}; known kinds: {sorted(_REGISTRY)}") from None


def activation_module_classes() -> Tuple[type, ...]:
    return tuple(cls for kind in _REGISTRY.values() for cls in kind.modules)


def kind_of_module(module: nn.Module) -> Optional[ActivationKind]:
    for kind in activation_kinds():
        if kind.matches_module(module):
            return kind
    return None


def kind_of_function(fn: Callable) -> Optional[ActivationKind]:
    for kind in activation_kinds():
        if kind.matches_function(fn):
            return kind
    return None


def kind_of_method(name: str) -> Optional[ActivationKind]:
    for kind in activation_kinds():
        if name in kind.methods:
            return kind
    return None


def kind_of_aten(op: object) -> Optional[ActivationKind]:
    for kind in activation_kinds():
        if kind.matches_aten(op):
            return kind
    return None


def python_activation_functions() -> Tuple[Callable, ...]:
    """Plain Python activation functions (timm's `swish`, users' own), which the tracer records as single
    calls. torch's own functions need no help: they reach the tracer through `__torch_function__`."""
    return tuple(
        f for kind in _REGISTRY.values() for f in kind.functions
        if isinstance(f, types.FunctionType) and not (getattr(f, "__module__", None) or "").startswith("torch")
    )


# ---------------------------------------------------------------------------------------------------------
# Built-in kinds. timm's own classes and functions are looked up by name, so an older or newer timm that
# lacks one of them still imports.

def _timm(module: str, *names: str) -> tuple:
    try:
        mod = importlib.import_module(f"timm.layers.{module}")
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def _aten(*names: str) -> tuple:
    return tuple(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


def _torch(*names: str) -> tuple:
    return tuple(getattr(torch, n) for n in names if hasattr(torch, n))


def _functional(*names: str) -> tuple:
    return tuple(getattr(F, n) for n in names if hasattr(F, n))


def _register_builtin_kinds() -> None:
    A, AM = "activations", "activations_me"
    builtin = [
        ActivationKind(
            "relu", (nn.ReLU,), _functional("relu", "relu_") + _torch("relu", "relu_"),
            ("relu", "relu_"), _aten("relu", "relu_")),
        ActivationKind(
            "relu6", (nn.Hardtanh,), _functional("relu6", "hardtanh", "hardtanh_"),
            ("hardtanh", "hardtanh_"), _aten("hardtanh", "hardtanh_", "relu6")),
        ActivationKind(
            "leaky_relu", (nn.LeakyReLU,), _functional("leaky_relu", "leaky_relu_"),
            ("leaky_relu", "leaky_relu_"), _aten("leaky_relu", "leaky_relu_")),
        ActivationKind(
            "prelu", (nn.PReLU,), _functional("prelu") + _torch("prelu"), ("prelu",),
            _aten("prelu", "_prelu_kernel")),
        ActivationKind(
            "elu", (nn.ELU,), _functional("elu", "elu_"), ("elu", "elu_"), _aten("elu", "elu_")),
        ActivationKind(
            "selu", (nn.SELU,), _functional("selu", "selu_") + _torch("selu", "selu_"),
            ("selu", "selu_"), _aten("selu", "selu_")),
        ActivationKind(
            "celu", (nn.CELU,), _functional("celu", "celu_") + _torch("celu", "celu_"),
            ("celu", "celu_"), _aten("celu", "celu_")),
        ActivationKind(
            "gelu", (nn.GELU,) + _timm(A, "GELU", "GELUTanh"), _functional("gelu") + _timm(A, "gelu", "gelu_tanh"),
            ("gelu",), _aten("gelu", "gelu_")),
        ActivationKind(
            "silu", (nn.SiLU,) + _timm(A, "Swish") + _timm(AM, "SwishMe"),
            _functional("silu") + _timm(A, "swish") + _timm(AM, "swish_me"), ("silu", "silu_"),
            _aten("silu", "silu_")),
        ActivationKind(
            "mish", (nn.Mish,) + _timm(A, "Mish") + _timm(AM, "MishMe"),
            _functional("mish") + _timm(A, "mish") + _timm(AM, "mish_me"), ("mish", "mish_"),
            _aten("mish", "mish_")),
        ActivationKind(
            "hardswish", (nn.Hardswish,) + _timm(A, "HardSwish") + _timm(AM, "HardSwishMe"),
            _functional("hardswish") + _timm(A, "hard_swish") + _timm(AM, "hard_swish_me"),
            ("hardswish", "hardswish_"), _aten("hardswish", "hardswish_")),
        ActivationKind(
            "quick_gelu", _timm(A, "QuickGELU"), _timm(A, "quick_gelu")),
        ActivationKind(
            "hard_mish", _timm(A, "HardMish") + _timm(AM, "HardMishMe"), _timm(A, "hard_mish") + _timm(AM, "hard_mish_me")),
        # Gates and normalisers: known, selectable by name, not sites by default.
        ActivationKind(
            "sigmoid", (nn.Sigmoid,) + _timm(A, "Sigmoid"),
            _functional("sigmoid") + _torch("sigmoid", "sigmoid_") + _timm(A, "sigmoid"),
            ("sigmoid", "sigmoid_"), _aten("sigmoid", "sigmoid_"), default=False),
        ActivationKind(
            "hardsigmoid", (nn.Hardsigmoid,) + _timm(A, "HardSigmoid") + _timm(AM, "HardSigmoidMe"),
            _functional("hardsigmoid") + _timm(A, "hard_sigmoid") + _timm(AM, "hard_sigmoid_me"),
            ("hardsigmoid", "hardsigmoid_"), _aten("hardsigmoid", "hardsigmoid_"), default=False),
        ActivationKind(
            "tanh", (nn.Tanh,) + _timm(A, "Tanh"),
            _functional("tanh") + _torch("tanh", "tanh_") + _timm(A, "tanh"),
            ("tanh", "tanh_"), _aten("tanh", "tanh_"), default=False),
        ActivationKind(
            "softmax", (nn.Softmax,), _functional("softmax") + _torch("softmax"), ("softmax",),
            _aten("softmax", "_softmax"), default=False),
    ]
    for kind in builtin:
        _REGISTRY[kind.name] = kind


_register_builtin_kinds()


def kind_of_module_class(cls: type) -> Optional[ActivationKind]:
    """Like kind_of_module, for a class (Dynamo records module classes, not instances)."""
    for kind in activation_kinds():
        if kind.modules and issubclass(cls, kind.modules):
            return kind
    return None
