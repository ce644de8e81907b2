"""The torch.export path of capture: dynamic sizes where the model allows them, within a time limit.

Export is tried with dynamic batch, height and width, then a dynamic batch, then static shapes (and all of it
again after one warm-up forward, for modules that cache tensors on their first call). Making height and width
symbolic can cost minutes, so that attempt runs under a SIGALRM time limit (`config.spatial_export_budget`).
ATen nodes are named by the module that produced them (`annotate_module_paths`, from `nn_module_stack`; the
compile backend uses it too).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
from torch import fx, nn

from fxsparse.config import spatial_export_budget
from fxsparse._meta import ACTIVATION_MODULE_META, CAPTURE_META, PATH_META
from fxsparse.inputs import Call, bound_names
from fxsparse.capture.guard import InputGuard
from fxsparse.capture.tracer import CaptureReport


def annotate_module_paths(gm: fx.GraphModule, is_activation: Callable[[fx.Node, str, Optional[type]], bool],
                          path_of: Callable[[object], str] = str) -> None:
    """Name every node by the innermost module of its `nn_module_stack` (node.meta[PATH_META]), and mark the
    nodes `is_activation(node, path, module class)` says an activation module produced, so sites read the same
    as on the FX path."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path, cls = "", None
        if stack:
            raw, cls = list(stack.values())[-1]
            path = path_of(raw)
        node.meta[PATH_META] = path
        if is_activation(node, path, cls):
            node.meta[ACTIVATION_MODULE_META] = True


def _mark_export_paths(gm: fx.GraphModule, model: nn.Module) -> None:
    """An exported graph's paths; an ATen op is an activation module's when it is that module's own op."""
    from fxsparse.passes.kinds import kind_of_module

    def is_activation(node: fx.Node, path: str, cls) -> bool:
        if node.op != "call_function" or not path:
            return False
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return False
        kind = kind_of_module(module)
        return kind is not None and kind.matches_aten(node.target)

    annotate_module_paths(gm, is_activation, lambda raw: raw if isinstance(raw, str) else str(raw))


def _dynamic_shapes(model: nn.Module, call: Call, dims: str):
    """Dim.AUTO on the first dimension ("batch"), and with "spatial" also on the last two of tensors of 3 or
    more dims (height and width of a batch, or of one image in a detector's list), for every tensor of the
    call. AUTO lets export specialise a dim where the model needs it (a channel count, position embeddings),
    so it costs nothing where the model fixes the size."""
    from torch.export import Dim

    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        auto = {0: Dim.AUTO}
        if dims == "spatial" and t.dim() >= 3:
            auto.update({t.dim() - 2: Dim.AUTO, t.dim() - 1: Dim.AUTO})
        return auto

    def tree(value):  # plain lists, tuples and dicts, the structure export compares with the inputs'
        if isinstance(value, (list, tuple)):
            return type(value)(tree(v) for v in value)
        if isinstance(value, dict):
            return {k: tree(v) for k, v in value.items()}
        return spec(value)

    args = [tree(a) for a in call.args]
    if not call.kwargs:
        return tuple(args)
    names = bound_names(model, call)
    if names is None:
        return None
    return {**dict(zip(names, args)), **{k: tree(v) for k, v in call.kwargs.items()}}


class _Overtime(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _Overtime in the body after `seconds` (SIGALRM, so only in the main thread on POSIX; elsewhere
    the body runs unbounded)."""
    import signal
    import threading

    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Overtime()

    import time

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    remaining = signal.setitimer(signal.ITIMER_REAL, seconds)[0]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:  # an outer timer (a caller's own time limit) keeps what was left of it
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.monotonic() - started), 1e-3))


def export_graph(model: nn.Module, call: Call) -> fx.GraphModule:
    """`torch.export.export(strict=False)` of `model` (capture's own copy) on `call`, as a plain GraphModule."""
    from torch.export import export

    args, kwargs = tuple(call.args), dict(call.kwargs)
    notes: Dict[str, str] = {}

    def attempt(dims: Optional[str]):
        if dims is None:
            return export(model, args, kwargs, strict=False)
        shapes = _dynamic_shapes(model, call, dims)
        if dims != "spatial":
            return export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
        # Making height and width symbolic can cost export minutes of sympy simplification (timm's MobileViTv2:
        # 1.5 s with a dynamic batch, over 500 s with dynamic height and width too); past the budget
        # (config.spatial_export_budget) capture exports with a dynamic batch only and says so in its report.
        budget = spatial_export_budget()
        try:
            with _time_limit(budget):
                return export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
        except _Overtime:
            notes["dynamic_shapes"] = (
                f"height and width fixed at the example's: making them dynamic took export over "
                f"{budget:g} s (FXSPARSE_SPATIAL_EXPORT_BUDGET sets the budget); the batch stays "
                "dynamic")
            raise

    program, error = None, None
    for warmed in (False, True):
        if warmed:  # modules that cache tensors on their first eval forward (timm's TinyViT attention biases)
            with torch.no_grad():  # fill the cache for real; `model` is capture's own copy
                model(*args, **kwargs)
        for dims in ("spatial", "batch", None):
            if dims == "spatial" and "dynamic_shapes" in notes:
                continue  # over budget once: not again after the warm-up
            try:
                program = attempt(dims)
                break
            except Exception as exc:
                error = exc  # the last attempt's (static shapes, after a warm-up run) says the most
        if program is not None:
            break
    if program is None:
        raise error
    unlifted = program.module()
    # a plain GraphModule over the same graph: the exported module refuses .eval()/.train(), which calibration
    # and users call; the graph itself is the eval-mode program whatever the flag says
    gm = fx.GraphModule(unlifted, unlifted.graph, type(model).__name__)
    _mark_export_paths(gm, model)
    gm.meta[CAPTURE_META] = CaptureReport(path="export", reasons=notes)
    gm.register_forward_pre_hook(InputGuard(gm, [tuple(t.shape) for t in call.leaves()]), with_kwargs=True)
    return gm
