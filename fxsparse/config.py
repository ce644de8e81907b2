"""Every fxsparse switch and `FXSPARSE_*` environment variable, in one place, read at call time.

Like timm's layers/config.py, each switch is an `is_x()` / `x()` accessor with a `set_x()`: a value set in
code wins; `set_x(None)` goes back to the environment, which is read on every call (so a variable set
after import, or per test, takes effect). Nothing else in fxsparse reads `os.environ` for its own switches.

    FXSPARSE_DEBUG                  1: let torch's own logs, prints and warnings through during capture
    FXSPARSE_SPATIAL_EXPORT_BUDGET  seconds a dynamic-spatial export may take before a fixed size is used
    FXSPARSE_EAGER_KERNEL           the eager inference kernel at start-up: "plain" (default) or "fused"
    FXSPARSE_CACHE                  where the tools keep downloads and the demo's trained model
    FXSPARSE_CHECK_BOUNDS           1: every eager MeanSparse call checks that lo / hi match mean, std, alpha

and the two torchrun variables the command reads (WORLD_SIZE, LOCAL_RANK: `launched_world()`).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from fxsparse.errors import FxsparseValueError

_set: Dict[str, object] = {}  # values set in code, by variable name; absent: read the environment
_FALSE = ("", "0", "false", "no", "off")


def _get(name: str, default: str) -> object:
    return _set[name] if name in _set else os.environ.get(name, default)


def _put(name: str, value: object) -> None:
    if value is None:
        _set.pop(name, None)
    else:
        _set[name] = value


def _flag(name: str) -> bool:
    """A yes / no switch: a bool set in code, or the variable (off when unset, empty, 0, false, no or off)."""
    value = _get(name, "")
    return value if isinstance(value, bool) else str(value).strip().lower() not in _FALSE


def is_debug() -> bool:
    """FXSPARSE_DEBUG: whether capture lets torch's own messages through."""
    return _flag("FXSPARSE_DEBUG")


def set_debug(flag: Optional[bool]) -> None:
    _put("FXSPARSE_DEBUG", None if flag is None else bool(flag))


def spatial_export_budget() -> float:
    """FXSPARSE_SPATIAL_EXPORT_BUDGET: seconds for an export with dynamic spatial sizes (default 20)."""
    value = _get("FXSPARSE_SPATIAL_EXPORT_BUDGET", "20")
    try:
        seconds = float(value)
    except ValueError:
        raise FxsparseValueError(f"FXSPARSE_SPATIAL_EXPORT_BUDGET must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise FxsparseValueError(f"FXSPARSE_SPATIAL_EXPORT_BUDGET must be positive, got {value!r}")
    return seconds


def set_spatial_export_budget(seconds: Optional[float]) -> None:
    _put("FXSPARSE_SPATIAL_EXPORT_BUDGET", None if seconds is None else float(seconds))


def is_check_bounds() -> bool:
    """FXSPARSE_CHECK_BOUNDS: whether eager MeanSparse calls verify their bounds (a debug net for a write to
    mean / std / alpha without `refresh_bounds()`; the test suite turns it on)."""
    return _flag("FXSPARSE_CHECK_BOUNDS")


def set_check_bounds(flag: Optional[bool]) -> None:
    _put("FXSPARSE_CHECK_BOUNDS", None if flag is None else bool(flag))


def eager_kernel_at_start() -> str:
    """FXSPARSE_EAGER_KERNEL: the eager kernel fxsparse.ops starts with (set_eager_kernel changes it later)."""
    return str(_get("FXSPARSE_EAGER_KERNEL", "plain"))


def cache_dir() -> str:
    """FXSPARSE_CACHE: the tools' cache folder (default ~/.cache/fxsparse)."""
    return str(_get("FXSPARSE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fxsparse")))


def set_cache_dir(path: Optional[str]) -> None:
    _put("FXSPARSE_CACHE", None if path is None else os.fspath(path))


def launched_world() -> "tuple[int, int]":
    """(WORLD_SIZE, LOCAL_RANK) as torchrun sets them; (1, 0) outside a launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise FxsparseValueError("WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them), got "
                                 f"{os.environ.get('WORLD_SIZE')!r} and {os.environ.get('LOCAL_RANK')!r}") from None
