"""The MeanSparse operator: values close to their channel's mean are replaced by that mean.

    y = mean_c  if |x - mean_c| < alpha * std_c  else x

`mean`, `std` and `alpha` are buffers, so moving, casting, saving and compiling treat them like any other
model state; `alpha` is a 0-d tensor changed in place, so a new alpha never triggers a recompile. The forward
has no data-dependent Python branch (no host-device sync): with alpha = 0 the comparison is false everywhere
and `torch.where` returns the input's own bits.

Eager mode is plain public PyTorch: nothing is compiled behind the user's back, and no private torch API is
needed for correct results. In inference it allocates one full-size temporary (the difference, reused as
the output) and writes into its input only when the activation was in place. Speed comes from
`torch.compile`, where the operator fuses into its neighbours' kernels; `set_eager_kernel("fused")` opts in
to a compiled eager kernel.
"""
from __future__ import annotations

import functools
import math
import os
import types
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from fxsparse.util import first_line
from fxsparse.errors import FxsparseValueError


class _StraightThroughWhere(torch.autograd.Function):
    """Forward: the MeanSparse output. Backward: the identity (BPDA), for adaptive attacks."""

    @staticmethod
    def forward(ctx, x, mean, threshold):
        return _band(x, mean, threshold)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _SmoothBandWhere(torch.autograd.Function):
    """Forward: the exact MeanSparse output. Backward: the gradient of the smooth band
    `mean + d * sigmoid((|d| - t) / (tau * t))`, d = x - mean, t = alpha * std: a surrogate that, unlike the
    identity, knows that values inside the band barely move the output (issue 20). t = 0: the identity."""

    @staticmethod
    def forward(ctx, x, mean, threshold, tau):
        # the slope, not x, is saved: an in-place activation overwrites x after this returns
        ctx.save_for_backward(smooth_band_slope(x, mean, threshold, tau))
        return _band(x, mean, threshold)

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None


def smooth_band_slope(x: torch.Tensor, mean: torch.Tensor, threshold: torch.Tensor,
                      tau: torch.Tensor) -> torch.Tensor:
    """d/dx of the smooth band: s + |d| s (1 - s) / (tau t), s = sigmoid((|d| - t) / (tau t)); 1 where t = 0."""
    d = (x - mean).abs()
    live = threshold > 0
    scale = tau.to(x.dtype) * torch.where(live, threshold, torch.ones_like(threshold))
    s = torch.sigmoid((d - threshold) / scale)
    return torch.where(live, s + d * s * (1 - s) / scale, torch.ones_like(s))


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


def _band_lean(x: torch.Tensor, mean: torch.Tensor, threshold: torch.Tensor, inplace: bool) -> torch.Tensor:
    """`_band` with one full-size temporary: the difference, made absolute in place, then reused as the output
    (or, in place, the input itself is the output). Public ops only, no autograd (`out=` records none)."""
    diff = torch.sub(x, mean)
    inside = diff.abs_() < threshold
    if inplace:
        return torch.where(inside, mean, x, out=x)
    if not _dense(x):
        # `sub` compacts a view with gaps (a slice of a split); the activation would then run on another
        # memory layout and may round differently. Keep the input's strides so alpha = 0 stays bit-exact.
        diff = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    return torch.where(inside, mean, x, out=diff)  # `diff` has x's layout: TensorIterator follows x's strides


def _lean_allowed(x: torch.Tensor) -> bool:
    """The `out=` formulation needs a plain tensor outside autograd, tracing and compilation (there the
    textbook `_band` is what Inductor fuses and what autograd differentiates)."""
    return (type(x) is torch.Tensor and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


# --- the opt-in fused eager kernel -----------------------------------------------------------------------
# By default eager mode runs the public ops above (about four passes over memory). `set_eager_kernel("fused")`
# sends float32 / float64 inference inputs of at least FUSED_MIN_ELEMENTS elements through one
# Inductor-compiled kernel instead: every dense layout is viewed as (outer, C, inner), and one kernel with
# dynamic sizes serves each (dtype, device, size-1 pattern, in-place flag). Each kernel compiles on its first
# call (about a second on CPU, and a C++ compiler there; Inductor caches it on disk). Its bits equal the plain
# ops'. A kernel that fails to compile or run is dropped with a warning, and its inputs take the plain ops; an
# in-place kernel first runs on a scratch copy, so a failure never leaves a half-written input behind.
# Correct results never depend on it: gradients, low precision, torch.compile / export / tracing / dispatch
# modes always take the plain ops.
EAGER_KERNELS = ("plain", "fused")
_eager_kernel = os.environ.get("FXSPARSE_EAGER_KERNEL", "plain")
FUSED_MIN_ELEMENTS = 1 << 13  # below this, a compiled call's guard checks cost more than the plain ops
_FUSED_DTYPES = (torch.float32, torch.float64)


class FusedKernelWarning(UserWarning):
    """The opt-in fused eager kernel failed for one input pattern; that pattern runs on the plain ops."""


def set_eager_kernel(kind: str, model: Optional[nn.Module] = None, *example_inputs) -> None:
    """Choose the eager inference kernel: "plain" (default: public PyTorch ops, nothing compiled) or "fused"
    (one Inductor kernel per input pattern, compiled on first use). With `model` and `example_inputs`, one
    forward under no_grad compiles the kernels that model needs now rather than on its first real call."""
    global _eager_kernel
    if kind not in EAGER_KERNELS:
        from fxsparse.errors import SelectionError

        raise SelectionError(f"unknown eager kernel {kind!r}; choose one of {EAGER_KERNELS}")
    _eager_kernel = kind
    if model is not None:
        with torch.no_grad():
            model(*example_inputs)


def eager_kernel() -> str:
    """The eager inference kernel in use: "plain" or "fused"."""
    return _eager_kernel


def _band_3d(x3: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The operator on an (outer, C, inner) view, from the raw state: the body of the fused kernel."""
    return _band(x3, mean.to(x3.dtype).view(1, -1, 1), (alpha * std).to(x3.dtype).view(1, -1, 1))


def _band_3d_(x3: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x3.copy_(_band_3d(x3, mean, std, alpha))


@functools.lru_cache(maxsize=None)
def _fused_band(key: tuple) -> Callable:
    """The compiled kernel for one (dtype, device, size-1 pattern, in place) key. Each key gets its own
    function object built from the body's code, so each has its own Dynamo cache entry and many keys never
    reach the recompile limit (if one did, Dynamo would run the body eagerly: slower, still correct)."""
    body = _band_3d_ if key[-1] else _band_3d
    code = body.__code__.replace(co_name=f"{body.__name__}fused_{len(_fused_band.keys)}")
    _fused_band.keys.append(key)
    return torch.compile(types.FunctionType(code, body.__globals__, code.co_name), dynamic=True, fullgraph=True)


_fused_band.keys = []  # type: ignore[attr-defined]
_fused_failed: "set[tuple]" = set()   # keys dropped after a failure: their inputs take the plain ops
_fused_proven: "set[tuple]" = set()   # in-place keys that ran once on a scratch copy


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
    if _eager_kernel != "fused" or x.numel() < FUSED_MIN_ELEMENTS or x.dtype not in _FUSED_DTYPES:
        return False
    if not _lean_allowed(x) or x.device.type not in ("cpu", "cuda"):
        return False
    # guards of the opt-in path only (the default plain ops need neither): functorch transforms and
    # dispatch modes see the plain ops
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None


def _run_fused(x: torch.Tensor, mean, std, alpha, dim: int, inplace: bool) -> Optional[torch.Tensor]:
    """The fused kernel's result, or None when this input's pattern has no working kernel."""
    x3 = _as_3d(x, dim)
    if x3 is None:
        return None
    key = (x.dtype, x.device, tuple(size == 1 for size in x3.shape), inplace)
    if key in _fused_failed:
        return None
    try:
        if inplace and key not in _fused_proven:  # first run on a scratch copy: x stays whole if it fails
            _fused_band(key)(x3.clone(), mean, std, alpha)
            _fused_proven.add(key)
        elif not inplace:
            y3 = _fused_band(key)(x3, mean, std, alpha)
    except Exception as exc:  # noqa: BLE001 -- any failure: this pattern goes back to the plain ops
        import warnings

        _fused_failed.add(key)
        warnings.warn(FusedKernelWarning(
            f"the fused eager kernel failed for {x.dtype} input of shape {tuple(x.shape)} on {x.device} "
            f"({first_line(exc, 200)}); such inputs now "
            "run on the plain ops (fxsparse.set_eager_kernel('plain') silences this)"), stacklevel=4)
        return None
    if inplace:
        try:
            _fused_band(key)(x3, mean, std, alpha)
        except Exception as exc:
            from fxsparse.errors import FxsparseError

            _fused_failed.add(key)
            raise FxsparseError(
                "the fused eager kernel failed while writing in place; the activation's input may be "
                "half-written, so it is not retried. Run with fxsparse.set_eager_kernel('plain')") from exc
        return x
    if x.is_contiguous():
        return y3.view(x.shape)
    n, c, h, w = x.shape
    return y3.view(n, h, w, c).permute(0, 3, 1, 2)


def mean_sparse(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor, dim: int,
                inplace: bool = False, straight_through=False,
                tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The operator as a function of its state (MeanSparse.forward, and the compile backend's graphs).
    `inplace` writes into `x` (the activation was in place, so every alias of `x` must see the result).
    `straight_through`: False (exact gradient), True or "identity" (BPDA), "smooth" (the smooth band's
    gradient at temperature `tau`, a 0-d tensor); the forward is exact in every case."""
    if not straight_through and _use_fused(x):
        y = _run_fused(x, mean, std, alpha, dim, inplace)
        if y is not None:
            return y
    shape = [1] * x.dim()
    shape[dim] = -1
    mean = mean.to(x.dtype).view(shape)
    threshold = (alpha * std).to(x.dtype).view(shape)
    if straight_through == "smooth" and tau is not None:
        y = _SmoothBandWhere.apply(x, mean, threshold, tau)
        return x.copy_(y) if inplace else y
    if straight_through:
        y = _StraightThroughWhere.apply(x, mean, threshold)
        return x.copy_(y) if inplace else y
    if _lean_allowed(x):
        return _band_lean(x, mean, threshold, inplace)
    y = _band(x, mean, threshold)
    if inplace:
        return x.copy_(y)
    if not _dense(x):
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

    # Set by the splice pass when the input is a fresh tensor that only this operator reads
    # (passes/private_inputs.py); reported by the audit, never used to overwrite the input. Class-level defaults, so
    # that operators pickled before these existed still load.
    private_input: bool = False
    producer_hooks: Tuple[dict, ...] = ()
    zscore_estimated: bool = False  # the replaced-fraction histogram is a one-pass estimate (calibrate)

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
        # False, or the surrogate gradient in use: "identity" (BPDA) or "smooth" (at temperature `tau`, a 0-d
        # buffer so a new tau never recompiles; not saved: it is attack state). See fxsparse.straight_through.
        self.straight_through = False
        self.register_buffer("tau", torch.tensor(0.1), persistent=False)
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
                           getattr(self, "tau", None))

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
