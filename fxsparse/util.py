"""Small helpers every layer uses (imports nothing from fxsparse, so any module may import it)."""
from __future__ import annotations

import itertools
import sys
from typing import Callable, List, Optional, Tuple

import torch
from torch import fx, nn


def model_state(model: nn.Module) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    """(device of the model's first parameter or buffer, dtype of its first floating one); None for what a
    stateless model does not have. Stops at the first floating tensor: no walk over every parameter."""
    device = None
    for t in itertools.chain(model.parameters(), model.buffers()):
        device = device or t.device
        if t.is_floating_point():
            return t.device, t.dtype
    return device, None


def model_device(model: nn.Module, default: str = "cpu") -> torch.device:
    """Where the model's state lives (`default` for a model without parameters or buffers)."""
    device, _ = model_state(model)
    return device if device is not None else torch.device(default)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """"TypeName: first line of the message", at most `limit` characters: for messages that quote a failure."""
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def free_name(base: str, taken: Callable[[str], bool], start: int = 0) -> str:
    """`base` if not `taken`, else the first free `base_1`, `base_2`, ... from `start` on (how torch.fx and
    fxsparse name a module's second call)."""
    if start == 0 and not taken(base):
        return base
    count = max(start, 1)
    while taken(f"{base}_{count}"):
        count += 1
    return f"{base}_{count}"


def submodule_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    """The module a call_module node calls, None for any other node (or a target that is gone)."""
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def scoped(scope: str, leaf: str) -> str:
    """"scope.leaf", or "leaf" at the root."""
    return f"{scope}.{leaf}" if scope else leaf


def in_notebook() -> bool:
    """Running in a Jupyter kernel (where stderr is no terminal but a bar shows as a widget)? IPython is not
    imported to find out: a kernel has imported it already."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def show_progress(enabled: Optional[bool]) -> bool:
    """Whether a bar shows: as asked, else when stderr is a terminal or the code runs in a notebook."""
    return (sys.stderr.isatty() or in_notebook()) if enabled is None else bool(enabled)


def progress_bar(total: Optional[int], desc: str, unit: str, enabled: Optional[bool], leave: bool = True,
                 iterable=None):
    """A tqdm bar (tqdm.auto: a widget in Jupyter, text in a terminal), shown per `show_progress`; given an
    `iterable`, iterating the bar iterates it (a hidden bar passes its items straight through)."""
    shown = show_progress(enabled)
    if iterable is not None and not shown:
        return iterable  # untouched: a disabled tqdm still iterates a re-iterable once when it is made
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not shown)


def split_spec(spec: str) -> Tuple[str, List[Tuple[str, str, Optional[str]]]]:
    """"name:key=value,key=value" -> ("name", [(item, key, value)]), value None where an item has no "=":
    the option syntax attacks and surrogates share; each caller checks its own names, keys and values."""
    name, _, rest = spec.partition(":")
    items = []
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        items.append((item, key.strip(), value if eq else None))
    return name.strip().lower(), items
