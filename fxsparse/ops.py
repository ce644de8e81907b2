"""The MeanSparse operator: values close to their channel's mean are replaced by that mean.

    y = mean_c  if |x - mean_c| < alpha * std_c  else x

`mean`, `std` and `alpha` are buffers, so moving, casting, saving and compiling treat them like any other
model state; `alpha` is a 0-d tensor changed in place, so a new alpha never triggers a recompile. The forward
has no data-dependent Python branch (no host-device sync): with alpha = 0 the comparison is false everywhere
and `torch.where` returns the input's own bits.
"""
from __future__ import annotations

import functools
import math
import os
import types
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from fxsparse.errors import FxsparseValueError


class _StraightThroughWhere(torch.autograd.Function):
    """Forward: the MeanSparse output. Backward: the identity (BPDA), for adaptive attacks."""

    @staticmethod
    def forward(ctx, x, mean, threshold):
        return _band(x, mean, threshold)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _dense(x: torch.Tensor) -> bool:
    """True when `x` covers its memory without gaps or overlap, in any dimension order (contiguous,
    channels-last, permuted); elementwise ops then keep its layout. Reads shapes only: no device sync."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(x.shape, x.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _band(x: torch.Tensor, mean: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where((x - mean).abs() < threshold, mean, x)


# Eager mode would run the four elementwise ops above as four passes over memory (plus temporaries). In
# inference (no autograd graph), float32 / float64 inputs of at least FUSED_MIN_ELEMENTS elements go through
# one Inductor-compiled kernel instead: every dense layout is viewed as (outer, C, inner), and one kernel with
# dynamic sizes serves each (dtype, device, size-1 pattern, in-place flag) -- its own code object, so its own Dynamo cache
# entry, and the recompile limit is never reached however many sites, ranks and shapes a process sees. The
# first call of each kernel compiles it (about a second on CPU; Inductor caches it on disk for later
# processes). Its bits equal the plain ops'. Gradients, low precision (Inductor would compute in float32,
# eager in the input dtype), torch.compile / export / tracing / dispatch modes use the plain ops, which
# Inductor fuses anyway. FXSPARSE_FUSED_EAGER=0 turns the kernel off; so does any failure to compile it.
FUSED_EAGER = os.environ.get("FXSPARSE_FUSED_EAGER", "1") != "0"
FUSED_MIN_ELEMENTS = 1 << 13  # below this, a compiled call's guard checks cost more than the plain ops
_FUSED_DTYPES = (torch.float32, torch.float64)


def _band_3d(x3: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The operator on an (outer, C, inner) view, from the raw state: the body of the fused kernel."""
    return _band(x3, mean.to(x3.dtype).view(1, -1, 1), (alpha * std).to(x3.dtype).view(1, -1, 1))


def _band_3d_(x3: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x3.copy_(_band_3d(x3, mean, std, alpha))


@functools.lru_cache(maxsize=None)
def _fused_band(key: tuple) -> Callable:
    """The compiled kernel for one (dtype, device, size-1 pattern, in place) key, from a fresh code object."""
    body = _band_3d_ if key[-1] else _band_3d
    code = body.__code__.replace(co_name=f"{body.__name__}fused_{len(_fused_band.keys)}")
    _fused_band.keys.append(key)
    return torch.compile(types.FunctionType(code, body.__globals__, code.co_name), dynamic=True, fullgraph=True)


_fused_band.keys = []  # type: ignore[attr-defined]


def _as_3d(x: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
    """x viewed as (outer, C, inner) without copying, or None when its layout does not allow it."""
    d = dim % x.dim()
    if x.is_contiguous():
        outer = math.prod(x.shape[:d])
        return x.view(outer, x.shape[d], -1)
    if x.dim() == 4 and d == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(-1, x.shape[1], 1)
    return None


def _use_fused(x: torch.Tensor) -> bool:
    if not FUSED_EAGER or x.numel() < FUSED_MIN_ELEMENTS or type(x) is not torch.Tensor:
        return False
    if x.dtype not in _FUSED_DTYPES or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if x.device.type not in ("cpu", "cuda") or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None


_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private API: without it, never overwrite


def _sole_owner(x: torch.Tensor) -> bool:
    """No other tensor (a view, a detached alias) shares x's storage: the count is x's, its view base's if x
    is a view (F.linear on 3-d input returns a view of its 2-d result), and the temporary storage handle's."""
    if _STORAGE_USE_COUNT is None:
        return False
    return _STORAGE_USE_COUNT(x.untyped_storage()._cdata) <= 2 + x._is_view()


def mean_sparse(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor, dim: int,
                inplace: bool = False, straight_through: bool = False, may_overwrite: bool = False) -> torch.Tensor:
    """The operator as a function of its state (MeanSparse.forward, and the compile backend's graphs).

    `inplace` writes into `x` always (the activation was in place); `may_overwrite` lets the fused inference
    kernel write into `x` when nothing else reads it (see `passes/fresh.py`), saving the output allocation.
    """
    if not straight_through and _use_fused(x):
        # overwrite a private input only if no other tensor shares its storage (a hook kept a view); checked
        # before x3 below, itself a view, exists
        write_input = inplace or (may_overwrite and _sole_owner(x))
        x3 = _as_3d(x, dim)
        if x3 is not None:
            try:
                key = (x.dtype, x.device, tuple(size == 1 for size in x3.shape), write_input)
                y3 = _fused_band(key)(x3, mean, std, alpha)
            except Exception:  # keep serving with the plain ops
                globals()["FUSED_EAGER"] = False
                return mean_sparse(x, mean, std, alpha, dim, inplace, straight_through)
            if write_input:
                return x
            if x.is_contiguous():
                return y3.view(x.shape)
            n, c, h, w = x.shape
            return y3.view(n, h, w, c).permute(0, 3, 1, 2)
    shape = [1] * x.dim()
    shape[dim] = -1
    mean = mean.to(x.dtype).view(shape)
    threshold = (alpha * std).to(x.dtype).view(shape)
    if straight_through:
        y = _StraightThroughWhere.apply(x, mean, threshold)
    else:
        y = _band(x, mean, threshold)
    if inplace:
        return x.copy_(y)
    if not _dense(x):
        # `where` compacts a view with gaps (a slice of a split); the activation would then run on another
        # memory layout and may round differently. Keep the input's strides so alpha = 0 stays bit-exact.
        out = torch.empty_strided(x.size(), x.stride(), dtype=y.dtype, device=y.device)
        return out.copy_(y)
    return y


class MeanSparse(nn.Module):
    """Per-channel mean sparsification along `dim`, spliced in front of an activation.

    Args:
        channels: size of the channel axis (length of `mean` and `std`).
        dim: the channel axis of the input (1 for NCHW / (B, C, L) / (B, C); -1 for tokens and NHWC).
        inplace: write the result into the input, mirroring an in-place activation so that every alias of
            the input sees what it would have seen in the original program.

    The descriptive attributes (`site`, `module_path`, `kind`, `node`, `axis_rule`) are filled in by the
    splice pass and read by the audit; they are plain attributes, not state.
    """

    # Set by the splice pass when the input is a fresh tensor that only this operator reads (the output of a
    # Linear, a convolution, a norm layer, out-of-place arithmetic): eager inference may then overwrite it.
    # `producer_hooks` are the producing module's forward-hook dicts (a hook there might keep the tensor).
    # Class-level defaults, so that operators pickled before these existed still load.
    private_input: bool = False
    producer_hooks: Tuple[dict, ...] = ()

    def __init__(self, channels: int, dim: int = 1, *, inplace: bool = False):
        super().__init__()
        if channels < 1:
            raise FxsparseValueError(f"MeanSparse needs at least one channel, got {channels}")
        self.dim = int(dim)
        self.inplace = bool(inplace)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("alpha", torch.zeros(()))
        # Number of calibration elements per channel behind `mean`/`std`; 0 means uncalibrated. An integer, so
        # that casting the model to float16 neither rounds nor overflows it.
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.straight_through = False
        # Set by fxsparse.calibrate while it observes this site's input; None otherwise.
        self.observer: Optional[Callable[[torch.Tensor], None]] = None
        # Descriptive metadata, written by the splice pass.
        self.site = ""
        self.module_path = ""
        self.kind = ""
        self.node = ""
        self.axis_rule = ""
        # Calibration-time histogram of |x - mean| / std, for the audit's replaced fractions.
        self.zscore_edges: Optional[torch.Tensor] = None
        self.zscore_counts: Optional[torch.Tensor] = None

    @property
    def channels(self) -> int:
        return self.mean.numel()

    @property
    def calibrated(self) -> bool:
        return not self.count.is_meta and bool(self.count > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        return mean_sparse(x, self.mean, self.std, self.alpha, self.dim, self.inplace, self.straight_through,
                           self.private_input and not torch.compiler.is_compiling() and self.may_overwrite())

    def may_overwrite(self) -> bool:
        """Whether this call may write into its input: it is private, and no hook (on its producer, on this
        operator, or global) can hold it or compare it with the output. `mean_sparse` also checks that no
        other tensor shares its storage."""
        hooks = torch.nn.modules.module
        return (self.private_input and not any(self.producer_hooks) and not self._forward_hooks
                and not self._forward_pre_hooks and not hooks._global_forward_hooks
                and not hooks._global_forward_pre_hooks)

    def extra_repr(self) -> str:
        extra = ", inplace=True" if self.inplace else ""
        return f"channels={self.channels}, dim={self.dim}{extra}, site={self.site!r}"


def meansparse_ops(model: nn.Module) -> "dict[str, MeanSparse]":
    """The MeanSparse operators of a model by site name: in graph order for a GraphModule (operators inside an
    opaque leaf at the leaf's place), in module order otherwise."""
    ordered = []
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module":
                sub = model.get_submodule(node.target)
                if isinstance(sub, MeanSparse):
                    ordered.append(sub)
                elif next(sub.children(), None) is not None:  # a leaf with submodules may hold operators
                    ordered.extend(m for m in sub.modules() if isinstance(m, MeanSparse))
    ordered.extend(m for m in model.modules() if isinstance(m, MeanSparse))
    out: "dict[str, MeanSparse]" = {}
    seen = set()
    for m in ordered:
        if id(m) not in seen:
            seen.add(id(m))
            out[m.site or f"meansparse_{len(out)}"] = m
    return out
