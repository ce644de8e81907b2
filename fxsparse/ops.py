"""The MeanSparse operator: values close to their channel's mean are replaced by that mean.

    y = mean_c  if lo_c < x < hi_c  else x,    lo_c = mean_c - alpha * std_c,  hi_c = mean_c + alpha * std_c

`mean`, `std` and `alpha` are buffers, so moving, casting, saving and compiling treat them like any other
model state; `alpha` is a 0-d tensor changed in place, so a new alpha never triggers a recompile. The bounds
`lo` / `hi` are per-channel buffers derived from them (not saved: `state_dict` keeps its keys) and refreshed
in place by `MeanSparse.refresh_bounds()`, which every writer calls (set_alpha, calibration, loading a
state_dict, the compile backend): the forward is then two comparisons and a select per element, with no
`mean +- alpha * std` recomputed inside a compiled kernel. With alpha = 0, lo = hi = mean and both strict
comparisons are false everywhere (NaN included), so `torch.where` returns the input's own bits.

Eager mode is plain public PyTorch: nothing is compiled behind the user's back, and no private torch API is
needed for correct results. Speed comes from `torch.compile`, where the operator fuses into its neighbours'
kernels; `fxsparse.set_eager_kernel("fused")` (fxsparse/compile/fused.py) opts in to a compiled eager kernel, which
plugs in through `_eager_kernel_hook` so that this module imports nothing above it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from fxsparse.config import is_check_bounds
from fxsparse.errors import FxsparseValueError


class _StraightThroughWhere(torch.autograd.Function):
    """Forward: the MeanSparse output (written into `x` with `inplace`, eager only). Backward: the identity
    (BPDA), for adaptive attacks."""

    @staticmethod
    def forward(ctx, x, mean, lo, hi, inplace=False):
        if inplace:
            ctx.mark_dirty(x)
            return _band_lean(x, mean, lo, hi, True)
        return _band_no_grad(x, mean, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


class _ExactBand(torch.autograd.Function):
    """The operator with its own gradient (the input's where it is kept, 0 where it is replaced) from one byte
    mask: backward is one masked fill, where autograd through `_band`'s two selects keeps two full-size
    outputs and runs two selects and an add. It returns the mask beside the output (the setup_context form,
    which keeps torch.func transforms working, saves only inputs and outputs), so it never writes into `x`:
    autograd refuses a Function with two outputs that modifies a view in place, and an in-place site copies.
    Eager attacks only; compiled graphs keep `_band`, which Inductor fuses."""

    @staticmethod
    def forward(x, mean, lo, hi):
        inside = _inside(x, lo, hi)
        return _select(inside, mean, x, False), inside

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, grad, _):
        (inside,) = ctx.saved_tensors
        return grad.masked_fill(inside, 0), None, None, None


def _band_no_grad(x: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The forward of the surrogate Functions: one float temporary in eager mode, `_band` where traced."""
    if _eager(x):
        return _band_lean(x, mean, lo, hi, False)
    return _band(x, mean, lo, hi)


class _SmoothBandWhere(torch.autograd.Function):
    """Forward: the exact MeanSparse output. Backward: the gradient of the smooth band
    `mean + d * sigmoid((|d| - t) / (tau * t))`, d = x - mean, t = alpha * std: a surrogate that, unlike the
    identity, knows that values inside the band barely move the output (issue 20). t = 0: the identity."""

    @staticmethod
    def forward(ctx, x, mean, lo, hi, tau):
        # the slope, not x, is saved: an in-place activation overwrites x after this returns
        ctx.save_for_backward(smooth_band_slope(x, mean, hi - mean, tau))
        return _band_no_grad(x, mean, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None, None


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


def _band(x: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # two selects rather than `where((x > lo) & (x < hi), ...)`: in an Inductor kernel that is 4 vector ops
    # per element instead of 6 (no mask casts and no `and`); same result, NaN and alpha = 0 included
    return torch.where(x > lo, torch.where(x < hi, mean, x), x)


def _band_lean(x: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               inplace: bool) -> torch.Tensor:
    """`_band` with one full-size float temporary (the output; in place, the input itself) and byte masks.
    Public ops only, no autograd (`out=` records none)."""
    return _select(_inside(x, lo, hi), mean, x, inplace)


def _inside(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The byte mask lo < x < hi (false for NaN)."""
    inside = torch.gt(x, lo)
    inside &= torch.lt(x, hi)
    return inside


def _select(inside: torch.Tensor, mean: torch.Tensor, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """where(inside, mean, x) into `x` itself, or into a new tensor with x's layout."""
    if inplace:
        return torch.where(inside, mean, x, out=x)
    # `empty_like` keeps a dense layout (contiguous, channels-last, permuted); a view with gaps (a slice of a
    # split) keeps its strides too, so the activation runs on the same layout and alpha = 0 stays bit-exact
    out = (torch.empty_like(x) if _dense(x)
           else torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device))
    return torch.where(inside, mean, x, out=out)


def _lean_allowed(x: torch.Tensor) -> bool:
    """The `out=` formulation needs a plain tensor outside autograd, tracing and compilation (there the
    textbook `_band` is what Inductor fuses and what autograd differentiates)."""
    return _eager(x) and not (x.requires_grad and torch.is_grad_enabled())


def _eager(x: torch.Tensor) -> bool:
    """A plain tensor outside tracing and compilation: the eager-only formulations (byte masks, `out=`,
    custom autograd Functions) apply; traced, the textbook `_band` is what Inductor fuses."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def _as_3d(x: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
    """x viewed as (outer, C, inner) without copying, or None when its layout does not allow it."""
    d = dim % x.dim()
    if x.is_contiguous():
        outer = math.prod(x.shape[:d])
        return x.view(outer, x.shape[d], -1)
    if x.dim() == 4 and d == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(-1, x.shape[1], 1)
    return None


# Set by fxsparse/compile/fused.py while the opt-in fused eager kernel is on: (x, mean, lo, hi, dim, inplace) -> the
# result, or None for the plain ops below.
_eager_kernel_hook: Optional[Callable] = None


def bounds(mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lo, hi) = mean -+ alpha * std: the one place the band's edges are computed."""
    threshold = alpha * std
    return mean - threshold, mean + threshold


def mean_sparse_bounds(x: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dim: int,
                       inplace: bool = False, straight_through=False,
                       tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The operator from its precomputed bounds (MeanSparse.forward, and the compile backend's graphs).
    `inplace` writes into `x` (the activation was in place, so every alias of `x` must see the result).
    `straight_through`: False (exact gradient), True or "identity" (BPDA), "smooth" (the smooth band's
    gradient at temperature `tau`, a 0-d tensor); the forward is exact in every case."""
    hook = _eager_kernel_hook
    if hook is not None and not straight_through:
        y = hook(x, mean, lo, hi, dim, inplace)
        if y is not None:
            return y
    shape = [1] * x.dim()
    shape[dim] = -1
    mean, lo, hi = (t.to(x.dtype).view(shape) for t in (mean, lo, hi))
    if straight_through == "smooth" and tau is not None:
        y = _SmoothBandWhere.apply(x, mean, lo, hi, tau)
        return x.copy_(y) if inplace else y
    eager = _eager(x)
    if straight_through:
        y = _StraightThroughWhere.apply(x, mean, lo, hi, inplace and eager)
        return x.copy_(y) if inplace and not eager else y
    if _lean_allowed(x):
        return _band_lean(x, mean, lo, hi, inplace)
    if eager and x.requires_grad and torch.is_grad_enabled():
        y = _ExactBand.apply(x, mean, lo, hi)[0]
        return x.copy_(y) if inplace else y
    y = _band(x, mean, lo, hi)
    if inplace:
        return x.copy_(y)
    if not _dense(x):
        out = torch.empty_strided(x.size(), x.stride(), dtype=y.dtype, device=y.device)
        return out.copy_(y)
    return y


def mean_sparse(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, alpha: torch.Tensor, dim: int,
                inplace: bool = False, straight_through=False,
                tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The operator as a function of its raw state (bounds computed per call, per channel)."""
    lo, hi = bounds(mean, std, alpha)
    return mean_sparse_bounds(x, mean, lo, hi, dim, inplace, straight_through, tau)


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
        self._register_bounds()
        self.register_load_state_dict_post_hook(_refresh_after_load)
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
        self.axis_default = False  # the axis is the rank default: no rule decided it
        self.policy = "activations"  # the placement policy that chose the site
        # Set by the splice pass when the input is a fresh tensor that only this operator reads
        # (passes/private_inputs.py); reported by the audit, never used to overwrite the input.
        self.private_input = False
        self.producer_hooks: Tuple[dict, ...] = ()
        self.zscore_estimated = False  # the replaced-fraction histogram is a one-pass estimate (calibrate)
        # Calibration-time histogram of |x - mean| / std, for the audit's replaced fractions.
        self.zscore_edges: Optional[torch.Tensor] = None
        self.zscore_counts: Optional[torch.Tensor] = None

    def _register_bounds(self) -> None:
        # derived state, not saved (state_dict keys stay mean/std/alpha/count); `.to()` moves and casts them
        lo, hi = bounds(self.mean, self.std, self.alpha)
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("hi", hi, persistent=False)

    def refresh_bounds(self) -> "MeanSparse":
        """Recompute `lo` / `hi` from mean, std and alpha, in place where their device and dtype still match
        (compiled code keeps reading the same tensors: a new alpha never recompiles). Every writer of mean,
        std or alpha calls this; a direct write to those buffers must call it too."""
        with torch.no_grad():
            lo, hi = bounds(self.mean, self.std, self.alpha)
            for name, value in (("lo", lo), ("hi", hi)):
                current = getattr(self, name)
                if (current.device == value.device and current.dtype == value.dtype
                        and current.shape == value.shape and not current.is_inference()):
                    current.copy_(value)
                else:
                    setattr(self, name, value)
        return self

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.half()`, `.cuda()`: the bounds are recomputed from the cast state rather than rounded from
        # the old dtype's bounds (torch.nn.RNNBase hooks `_apply` the same way for its flat weights)
        out = super()._apply(fn, *args, **kwargs)
        self.refresh_bounds()
        return out

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
        if not torch.compiler.is_compiling() and is_check_bounds():  # a debug switch; never in a compiled graph
            check_bounds(self)
        return mean_sparse_bounds(x, self.mean, self.lo, self.hi, self.dim, self.inplace, self.straight_through,
                                  self.tau)

    def extra_repr(self) -> str:
        extra = ", inplace=True" if self.inplace else ""
        return f"channels={self.channels}, dim={self.dim}{extra}, site={self.site!r}"


def check_bounds(op: MeanSparse) -> None:
    """Raise if `op.lo` / `op.hi` are not the bounds of its current mean, std and alpha: some write to those
    buffers skipped `refresh_bounds()` (FXSPARSE_CHECK_BOUNDS / fxsparse.config.set_check_bounds turn this on
    for every eager call; it syncs with the device)."""
    if op.mean.is_meta or torch.jit.is_tracing():
        return
    with torch.no_grad():
        lo, hi = bounds(op.mean, op.std, op.alpha)
        fresh = all(old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
                    and torch.allclose(old, new, rtol=0, atol=0, equal_nan=True)
                    for old, new in ((op.lo, lo), (op.hi, hi)))
    if not fresh:
        raise FxsparseValueError(
            f"MeanSparse {op.site or 'operator'!r}: its bounds lo / hi are stale (mean, std or alpha was written "
            "without refreshing them); call op.refresh_bounds() after writing op.mean, op.std or op.alpha "
            "(fxsparse.set_alpha and calibrate do it for you)")


def _refresh_after_load(module: MeanSparse, incompatible_keys) -> None:
    module.refresh_bounds()


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
