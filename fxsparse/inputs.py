"""Model inputs: what `prepare` is given, what it records, and how a calibration batch is read against it.

`example_inputs` follow `torch.export`: the tuple of positional arguments (`(a, b)` for a model that takes two
images, `([img],)` for a detector that takes a list of images), a single tensor, or a dict of keyword
arguments (`{"pixel_values": x}`). Internally they are a `Call` (positional args, keyword args).

A calibration batch is read by one rule (`read_batch`), checked against the call `prepare` saw:
  - a tensor is the model's one input;
  - a tuple or list is an (input, target) pair: its first element is the model's first input. A model that
    takes several inputs cannot be fed this way (which element is which?): give dict batches or a
    `forward_loop`; a first element that does not fit what `prepare` saw (a tensor where a list was seen)
    is refused with that fix, never guessed around;
  - a dict whose keys name inputs of the graph (`{"image1": a, "image2": b}`, `{"pixel_values": x,
    "labels": y}`) passes those keys as keyword arguments; other keys (labels the graph does not take) are
    left out. Without names to go by, the input is under 'input' or 'image' (INPUT_KEYS; evaluation reads
    the label under TARGET_KEYS: 'label', 'labels', 'target', 'targets'). `sparsify` takes its example
    inputs from the first batch the same way (`example_call`), leaving out targets, so that the graph is the
    inference program.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from fxsparse.util import model_state
from fxsparse._meta import PREPARE_META, sparsified_part
from fxsparse.errors import CalibrationError, FxsparseTypeError, FxsparseValueError

# The one key vocabulary of dict batches without names to go by: where the input and the target are.
INPUT_KEYS = ("input", "image")
TARGET_KEYS = ("label", "labels", "target", "targets")


@dataclasses.dataclass
class Call:
    """One call of a model: positional and keyword arguments (tensors, or lists / tuples / dicts of them)."""

    args: tuple
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def leaves(self) -> List[torch.Tensor]:
        found: List[torch.Tensor] = []
        fx.node.map_aggregate((self.args, self.kwargs),
                              lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
        return found

    def to(self, device) -> "Call":
        move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        return Call(fx.node.map_aggregate(self.args, move), dict(fx.node.map_aggregate(self.kwargs, move)))

    def describe(self) -> str:
        leaves = self.leaves()
        return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in leaves) or "no tensors"


def default_input_shape(model: nn.Module) -> Tuple[int, ...]:
    """(C, H, W) from timm's pretrained_cfg, else from the first conv or linear layer (224 x 224 images)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, 224, 224)
        if isinstance(m, nn.Conv1d):
            return (m.in_channels, 128)
        if isinstance(m, nn.Conv3d):
            return (m.in_channels, 16, 112, 112)
        if isinstance(m, nn.Linear):
            return (m.in_features,)
    raise FxsparseValueError(f"cannot guess an input shape for {type(model).__name__}; pass example_inputs")


def default_example_inputs(model: nn.Module, batch: int = 2) -> Tuple[torch.Tensor, ...]:
    device, dtype = model_state(model)
    return (torch.randn(batch, *default_input_shape(model), device=device or torch.device("cpu"),
                        dtype=dtype or torch.float32),)


def _is_tensor_tree(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_is_tensor_tree(v) for v in value)
    if isinstance(value, Mapping):
        return len(value) > 0 and all(isinstance(k, str) and _is_tensor_tree(v) for k, v in value.items())
    return False


def as_call(example_inputs) -> Call:
    """`example_inputs` as a Call: a tensor, a tuple of positional arguments, a dict of keyword arguments."""
    if isinstance(example_inputs, Call):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Call((example_inputs,))
    if isinstance(example_inputs, Mapping) and example_inputs and _is_tensor_tree(example_inputs):
        return Call((), dict(example_inputs))
    if (isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str) and example_inputs
            and all(_is_tensor_tree(v) for v in example_inputs)):
        return Call(tuple(example_inputs))
    raise FxsparseTypeError(
        f"example_inputs must be a tensor, a tuple of the model's positional arguments (tensors or lists of "
        f"tensors, as in torch.export: (a, b) for two images, ([img],) for a detector), or a dict of keyword "
        f"tensors; got {type(example_inputs).__name__}")


# -- the record prepare keeps (JSON), and a call rebuilt from it -------------------------------------------
def _tree(value, leaves: List[torch.Tensor]):
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return len(leaves) - 1
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_tree(v, leaves) for v in value]}
    if isinstance(value, Mapping):
        return {"dict": {str(k): _tree(v, leaves) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"const": value}  # RAFT's num_flow_updates=12
    raise FxsparseTypeError(f"example inputs may hold tensors, lists, tuples, dicts and plain numbers, not "
                        f"{type(value).__name__}")


def call_record(call: Call, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Shapes, dtypes and nesting of a call, and the names of the model's inputs it binds."""
    leaves: List[torch.Tensor] = []
    tree = {"args": [_tree(a, leaves) for a in call.args], "kwargs": {k: _tree(v, leaves) for k, v in call.kwargs.items()}}
    return {"input_shapes": [list(t.shape) for t in leaves], "input_dtypes": [str(t.dtype) for t in leaves],
            "input_tree": tree, "input_names": bound_names(model, call) if model is not None else None}


def _untree(node, leaves):
    if isinstance(node, int):
        return leaves[node]
    if "list" in node:
        return [_untree(v, leaves) for v in node["list"]]
    if "tuple" in node:
        return tuple(_untree(v, leaves) for v in node["tuple"])
    if "const" in node:
        return node["const"]
    return {k: _untree(v, leaves) for k, v in node["dict"].items()}


def call_from_record(record: Mapping[str, Any], leaves: Sequence[torch.Tensor]) -> Call:
    """The call a record describes, with `leaves` (tensors of the recorded shapes) in it."""
    tree = record["input_tree"]
    return Call(tuple(_untree(a, leaves) for a in tree["args"]),
                {k: _untree(v, leaves) for k, v in tree["kwargs"].items()})


def bound_names(model: nn.Module, call: Call) -> Optional[List[str]]:
    """The forward parameter names the call binds, positional first ('image1', 'image2'), or None."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*call.args, **call.kwargs)
    except (TypeError, ValueError):
        return None
    return list(bound.arguments)


def forward_parameters(model: nn.Module) -> Optional[List[str]]:
    try:
        return [p.name for p in inspect.signature(model.forward).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return None


# -- reading a calibration batch ---------------------------------------------------------------------------
def find_record(model: nn.Module) -> Optional[Mapping[str, Any]]:
    """What `prepare` recorded about `model`'s inputs: its own record, or for a model with a sparsified part
    (prepare(..., submodule=)) the whole model's inputs the part recorded."""
    part = sparsified_part(model)
    if part is None:
        return None
    record = part.meta[PREPARE_META]
    if part is model:
        return record
    return record["model_inputs"] if record.get("submodule") else None


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _fits(value, tree_node) -> bool:
    """Does `value` have the structure prepare saw (tensor where a tensor was, list where a list was)?"""
    if isinstance(tree_node, int):
        return isinstance(value, torch.Tensor)
    if "dict" in tree_node:
        return isinstance(value, Mapping)
    return isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value)


def read_batch(batch: Any, record: Optional[Mapping[str, Any]] = None) -> Call:
    """The model call one calibration batch stands for (the rule is in the module docstring)."""
    tree = (record or {}).get("input_tree")
    names = (record or {}).get("input_names")
    n_args = len(tree["args"]) + len(tree["kwargs"]) if tree else 1
    if isinstance(batch, torch.Tensor):
        if tree and n_args > 1:
            raise CalibrationError(_several_inputs(names, n_args, "a tensor"))
        return Call((batch,))
    if isinstance(batch, Mapping):
        if names:
            taken = {k: v for k, v in batch.items() if k in names}
            if taken:
                missing = [n for n in names if n not in taken]
                if missing:
                    raise CalibrationError(f"calibration batch (a dict with keys {sorted(batch)[:8]}) lacks the "
                                           f"model input(s) {missing} that fxsparse.prepare was given")
                return Call((), taken)
        x = keyed(batch, INPUT_KEYS)
        if isinstance(x, torch.Tensor):
            if tree and n_args > 1:
                raise CalibrationError(_several_inputs(names, n_args, f"a dict with keys {sorted(batch)[:8]}"))
            return Call((x,))
        raise CalibrationError(
            f"cannot read model inputs from a dict batch with keys {sorted(batch)[:8]}: give keys that name the "
            f"model's inputs ({names or 'its forward parameters'}), or an {' / '.join(map(repr, INPUT_KEYS))} tensor")
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if tree and n_args > 1:
            raise CalibrationError(_several_inputs(names, n_args, f"a {type(batch).__name__} (read as (input, "
                                                   "target))"))
        if tree:
            seen = tree["args"][0] if tree["args"] else next(iter(tree["kwargs"].values()))
            if not _fits(first, seen):
                raise CalibrationError(
                    f"a {type(batch).__name__} batch is read as (input, target), so its first element is the "
                    f"model's input; here that is {_kind(first)}, but fxsparse.prepare saw "
                    f"{'a tensor' if isinstance(seen, int) else 'a list of tensors'}. Give batches (input, target) "
                    "with the input as prepare saw it (([img, ...], targets) for a detector), dict batches keyed "
                    "by the model's input names, or forward_loop=")
            if not tree["args"]:
                return Call((), {next(iter(tree["kwargs"])): first})
        if _is_tensor_tree(first):
            return Call((first,))
    hint = " (convert arrays with torch.from_numpy)" if type(batch).__module__.startswith("numpy") else ""
    raise CalibrationError(
        f"cannot read model inputs from a calibration batch of type {type(batch).__name__}{hint}; give tensors, "
        "(input, target) pairs, dicts keyed by the model's input names, or forward_loop=")


def keyed(batch: Mapping[str, Any], keys: Sequence[str]):
    """The value of the first of `keys` that `batch` holds, or None."""
    return next((batch[k] for k in keys if k in batch), None)


def example_call(model: nn.Module, batch: Any) -> Call:
    """Example inputs read off a first calibration batch: the keys of a dict batch that name forward parameters,
    as keywords, except targets (TARGET_KEYS: Hugging Face models take 'labels' to compute a loss, which
    calibration does not need and the graph would then always require; give example_inputs to capture with
    them); otherwise `read_batch`'s rule."""
    if isinstance(batch, Mapping):
        params = [p for p in forward_parameters(model) or [] if p not in TARGET_KEYS]
        taken = {k: v for k, v in batch.items() if k in params and isinstance(v, torch.Tensor)}
        if taken:
            return Call((), taken)
    required = _required_parameters(model)
    if isinstance(batch, (tuple, list)) and len(required) > 1:
        raise CalibrationError(
            f"{type(model).__name__} takes {len(required)} inputs ({', '.join(required)}), but a "
            f"{type(batch).__name__} batch is read as (input, target): give dict batches "
            f"{{{', '.join(repr(k) + ': ...' for k in required)}}}, or example_inputs=({', '.join(required)}) "
            "with forward_loop=fn, where fn(model) calls the model on your batches")
    return read_batch(batch)


def _required_parameters(model: nn.Module) -> List[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is inspect.Parameter.empty]


def _several_inputs(names, n: int, got: str) -> str:
    which = f" ({', '.join(names)})" if names else ""
    example = ", ".join(f"'{k}': ..." for k in (names or ["image1", "image2"]))
    return (f"the model was prepared with {n} inputs{which}, but a calibration batch is {got}, which fxsparse "
            f"reads as one input: give dict batches {{{example}}}, or forward_loop=fn where fn(model) calls the "
            "model on your batches")


def iter_batches(data: Any, batch_size: int = 256, max_examples: Optional[int] = None) -> Iterator[Tuple]:
    """(x, y) batches from an (x, y) pair of tensors, or from an iterable of (x, y) batches (a DataLoader)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].dim() > data[1].dim():
        inputs, labels = data
        source: Iterable = ((inputs[i:i + batch_size], labels[i:i + batch_size])
                            for i in range(0, len(inputs), batch_size))
    else:
        source = data
    seen = 0
    for batch in source:
        if isinstance(batch, Mapping):
            batch = (keyed(batch, INPUT_KEYS), keyed(batch, TARGET_KEYS))
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
                and isinstance(batch[1], torch.Tensor)):
            raise FxsparseTypeError(f"evaluation needs (input, label) batches of tensors, got {type(batch).__name__}; "
                                    "give an (x, y) pair of tensors or a DataLoader of (x, y) batches")
        x, y = batch[0], batch[1]
        if max_examples is not None:
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        if len(x):
            yield x, y
        seen += len(x)
        if max_examples is not None and seen >= max_examples:
            return
