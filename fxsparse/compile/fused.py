"""The opt-in fused eager kernel: one Inductor-compiled kernel per input pattern instead of the plain ops.

Kept out of ops.py so that the operator stays plain public PyTorch; it plugs into `ops._eager_kernel_hook`
while `set_eager_kernel("fused")` is on (or FXSPARSE_EAGER_KERNEL=fused at import).
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import torch
from torch import nn

import fxsparse.ops as ops
from fxsparse.config import eager_kernel_at_start
from fxsparse.util import first_line

# By default eager mode runs the public ops of ops.py (about four passes over memory). `set_eager_kernel("fused")`
# sends float32 / float64 inference inputs of at least FUSED_MIN_ELEMENTS elements through one
# Inductor-compiled kernel instead: every dense layout is viewed as (outer, C, inner), and one kernel with
# dynamic sizes serves each (dtype, device, size-1 pattern, in-place flag). Each kernel compiles on its first
# call (about a second on CPU, and a C++ compiler there; Inductor caches it on disk). Its bits equal the plain
# ops'. A kernel that fails to compile or run is dropped with a warning, and its inputs take the plain ops; an
# in-place kernel first runs on a scratch copy, so a failure never leaves a half-written input behind.
# Correct results never depend on it: gradients, low precision, torch.compile / export / tracing / dispatch
# modes always take the plain ops.
EAGER_KERNELS = ("plain", "fused")
_eager_kernel = eager_kernel_at_start()
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
    ops._eager_kernel_hook = _run_fused if kind == "fused" else None
    if model is not None:
        with torch.no_grad():
            model(*example_inputs)


def eager_kernel() -> str:
    """The eager inference kernel in use: "plain" or "fused"."""
    return _eager_kernel


def _band_3d(x3: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The operator on an (outer, C, inner) view, from the bounds: the body of the fused kernel."""
    shape = (1, -1, 1)
    return ops._band(x3, mean.to(x3.dtype).view(shape), lo.to(x3.dtype).view(shape), hi.to(x3.dtype).view(shape))


def _band_3d_(x3: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return x3.copy_(_band_3d(x3, mean, lo, hi))


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


def _use_fused(x: torch.Tensor) -> bool:
    """Whether `x` may take the fused kernel (the plain ops' own guards, plus this path's)."""
    if _eager_kernel != "fused" or x.numel() < FUSED_MIN_ELEMENTS or x.dtype not in _FUSED_DTYPES:
        return False
    if not ops._lean_allowed(x) or x.device.type not in ("cpu", "cuda"):
        return False
    # guards of the opt-in path only (the default plain ops need neither): functorch transforms and
    # dispatch modes see the plain ops
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None


def _run_fused(x: torch.Tensor, mean, lo, hi, dim: int, inplace: bool) -> Optional[torch.Tensor]:
    """The fused kernel's result, or None when this input does not take it or its pattern has no working
    kernel (the plain ops then run)."""
    if not _use_fused(x):
        return None
    x3 = ops._as_3d(x, dim)
    if x3 is None:
        return None
    key = (x.dtype, x.device, tuple(size == 1 for size in x3.shape), inplace)
    if key in _fused_failed:
        return None
    try:
        if inplace and key not in _fused_proven:  # first run on a scratch copy: x stays whole if it fails
            _fused_band(key)(x3.clone(), mean, lo, hi)
            _fused_proven.add(key)
        elif not inplace:
            y3 = _fused_band(key)(x3, mean, lo, hi)
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
            _fused_band(key)(x3, mean, lo, hi)
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


ops._eager_kernel_hook = _run_fused if _eager_kernel == "fused" else None
