"""Save a sparsified model's MeanSparse state, and load it into the same architecture, without pickle.

The file (safetensors with a JSON header, see `fxsparse/files/safefile.py`) holds what fxsparse adds to a model and
nothing of the model itself: per site the buffers `mean`, `std`, `alpha`, `count` and the calibration
histogram, and in the header the sites (kind, channel axis and how it was decided, channel count), what
`prepare` was told (its Recipe: selection, placement, channel_dims, capture; example input shapes), the
capture path, and the fxsparse and torch versions. `load` re-applies the pass to the model it is given exactly as recorded,
refuses the file if the sites differ in any way (or if another format version holds it), and copies the state in:
same model weights in, same outputs out, bit for bit.

The header also records a fingerprint of the weights the statistics were calibrated on: statistics are a
property of those weights, so `load` into the same architecture with other weights (a fine-tuned or
another checkpoint) refuses unless told `weights_may_differ=True`.

One format version is read, the current one (3: the header's `prepare` is the Recipe's record plus the example
call); a file in any other is refused, saying to save the model again (or upgrade fxsparse, for a newer one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from typing import Any, Dict, List, Mapping

import torch
from torch import fx, nn

from fxsparse.util import model_state
from fxsparse._meta import CAPTURE_META, PREPARE_META, sparsified_part
from fxsparse._version import __version__
from fxsparse.api import Recipe, prepare, splice_part
from fxsparse.capture import CAPTURE_METHODS, copy_model
from fxsparse.errors import FxsparseTypeError, NoActivationWarning, PersistenceError
from fxsparse.inputs import call_from_record
from fxsparse.ops import MeanSparse, meansparse_ops
from fxsparse.files.safefile import read, write

FORMAT = "fxsparse-meansparse"
FORMAT_VERSION = 3
BUFFERS = ("mean", "std", "alpha", "count")
CHECKED_FIELDS = ("kind", "dim", "channels")




FINGERPRINT_SAMPLES = 1024  # values read per parameter: fine-tuning moves them all, reading them all costs seconds


def weights_fingerprint(model: nn.Module):
    """A hash of the model's parameters (shapes and up to 1024 evenly spaced values each, rounded to bfloat16
    so that a half-precision copy of the same weights agrees), independent of parameter names and order;
    None when the weights live on the meta device."""
    digests = []
    for p in model.parameters():
        if p.is_meta:
            return None
        flat = p.detach().flatten()
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.bfloat16).view(torch.int16)
        digests.append(hashlib.sha256(repr(tuple(p.shape)).encode() + sample.numpy().tobytes()).hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:32]


def _site(op: MeanSparse) -> Dict[str, Any]:
    return {"site": op.site, "module_path": op.module_path, "kind": op.kind, "node": op.node, "dim": op.dim,
            "channels": op.channels, "axis_rule": op.axis_rule, "axis_default": op.axis_default,
            "inplace": op.inplace, "policy": op.policy}


def save(gm: nn.Module, path: "os.PathLike[str] | str") -> None:
    """Write the MeanSparse state of `gm` (from fxsparse.prepare or sparsify) to `path`."""
    gm = getattr(gm, "_orig_mod", gm)  # torch.compile's wrapper: save the module it compiles
    part = sparsified_part(gm)
    if part is None or not (part is gm or part.meta[PREPARE_META].get("submodule")):
        raise PersistenceError(f"fxsparse.save takes the GraphModule returned by fxsparse.prepare or sparsify, "
                               f"got a {type(gm).__name__} without fxsparse's record of how it was prepared: pass "
                               "the sparsified model, not the original")
    gm, record = part, part.meta[PREPARE_META]
    tensors: Dict[str, torch.Tensor] = {}
    for name, op in meansparse_ops(gm).items():
        for buffer in BUFFERS:
            tensors[f"{name}/{buffer}"] = getattr(op, buffer)
        if op.zscore_counts is not None:
            tensors[f"{name}/zscore_edges"], tensors[f"{name}/zscore_counts"] = op.zscore_edges, op.zscore_counts
            tensors[f"{name}/zscore_estimated"] = torch.tensor(bool(op.zscore_estimated))
    report = gm.meta[CAPTURE_META]
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "fxsparse_version": __version__, "torch_version": torch.__version__,
        "capture_path": report.path, "prepare": record,
        "sites": [_site(op) for op in meansparse_ops(gm).values()],
        "weights_fingerprint": weights_fingerprint(gm),
    }
    write(path, tensors, header)


def _example_inputs(model: nn.Module, record: Mapping[str, Any], path: str) -> List[torch.Tensor]:
    """Random inputs of the recorded shapes; floating ones in the model's dtype, on the model's device."""
    device, model_dtype = model_state(model)
    device = device or torch.device("cpu")
    inputs = []
    for shape, name in zip(record["input_shapes"], record["input_dtypes"]):
        dtype = getattr(torch, str(name).replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise PersistenceError(f"{path} records an unknown input dtype {name!r}")
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=model_dtype or dtype, device=device))
        else:
            inputs.append(torch.zeros(shape, dtype=dtype, device=device))
    return inputs


def _differences(by_name: Mapping[str, Mapping[str, Any]], ops: Mapping[str, MeanSparse]) -> List[str]:
    out = []
    missing = [n for n in by_name if n not in ops]
    extra = [n for n in ops if n not in by_name]
    if missing:
        out.append(f"{len(missing)} site(s) of the file are not in the model: {missing[:8]}")
    if extra:
        out.append(f"{len(extra)} site(s) of the model are not in the file: {extra[:8]}")
    for name, op in ops.items():
        if name in by_name:
            out.extend(f"site {name!r} has {field} {by_name[name][field]!r} in the file but {getattr(op, field)!r} "
                       "in the model" for field in CHECKED_FIELDS if by_name[name][field] != getattr(op, field))
    return out


def _restore(ops: Mapping[str, MeanSparse], tensors: Mapping[str, torch.Tensor], path: str) -> None:
    with torch.no_grad():
        for name, op in ops.items():
            for buffer in BUFFERS:
                target, t = getattr(op, buffer), tensors.get(f"{name}/{buffer}")
                if t is None or t.shape != target.shape:
                    got = "nothing" if t is None else f"shape {tuple(t.shape)}"
                    raise PersistenceError(f"{path} is corrupt: site {name!r} needs {buffer} of shape "
                                           f"{tuple(target.shape)}, the file has {got}")
                target.copy_(t)
            op.refresh_bounds()
            if f"{name}/zscore_counts" in tensors:
                op.zscore_edges = tensors[f"{name}/zscore_edges"].clone()
                op.zscore_counts = tensors[f"{name}/zscore_counts"].clone()
                op.zscore_estimated = bool(tensors.get(f"{name}/zscore_estimated", torch.tensor(False)))


def load(model: nn.Module, path: "os.PathLike[str] | str", *, weights_may_differ: bool = False) -> fx.GraphModule:
    """Re-apply the pass recorded in `path` to `model` and restore its MeanSparse state; `model` is untouched.

    Raises PersistenceError when the file is unreadable or corrupt, when its sites differ from the ones
    the pass finds in `model` (missing or extra sites, other kinds, channel axes or channel counts), or when
    `model` has other weights than the ones the statistics were calibrated on (`weights_may_differ=True`
    loads them anyway: the statistics then describe another model's activations).
    """
    if not isinstance(model, nn.Module):
        raise FxsparseTypeError(f"fxsparse.load needs the torch.nn.Module to load into, got {type(model).__name__}")
    path = os.fspath(path)
    tensors, header = read(path, "fxsparse file")
    if header.get("format") != FORMAT:
        raise PersistenceError(f"{path} holds {header.get('format')!r}, not a model saved by fxsparse.save")
    version = header.get("format_version")
    if version != FORMAT_VERSION:  # the project has never been released: one format, no older readers
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise PersistenceError(f"{path} was written by fxsparse {header.get('fxsparse_version')} in "
                               + (f"a newer format ({version}); upgrade fxsparse to read it" if newer else
                                  f"file format {version!r}; this fxsparse reads format {FORMAT_VERSION} only: save "
                                  "the model again with this fxsparse"))
    try:
        record = header["prepare"]
        recipe = Recipe.from_record(record)
        call = call_from_record(record, _example_inputs(model, record, path))
        saved_sites = {s["site"]: {field: s[field] for field in CHECKED_FIELDS} for s in header["sites"]}
        saved_print, taken = header["weights_fingerprint"], header["capture_path"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PersistenceError(f"{path} has an incomplete header ({type(exc).__name__}: {exc}); write it again "
                               "with fxsparse.save") from exc
    if taken in CAPTURE_METHODS:  # the path the saved graph took, not only the one asked for
        recipe = dataclasses.replace(recipe, capture=taken)
    with warnings.catch_warnings():
        if saved_sites:  # a model without sites gets the mismatch error below, not a warning as well
            warnings.simplefilter("ignore", NoActivationWarning)
        if record.get("submodule"):  # a part of the model: the part's recorded inputs, spliced into a copy
            gm = splice_part(copy_model(model), record["submodule"], call, record["model_inputs"], recipe)
        else:
            gm = prepare(model, call, recipe=recipe)
    ops = meansparse_ops(gm)
    differences = _differences(saved_sites, ops)
    if differences:
        raise PersistenceError(
            f"{path} does not match this model: " + "; ".join(differences)
            + ". It was saved from another architecture, or with another selection or activation registry: load it "
              "into the model it was saved from")
    this_print = weights_fingerprint(sparsified_part(gm))
    if saved_print and this_print and saved_print != this_print and not weights_may_differ:
        raise PersistenceError(
            f"{path} was calibrated on other weights than this model's (weights fingerprint {saved_print} in the "
            f"file, {this_print} here): its statistics describe another model's activations. Load it into the "
            "model it was saved from, calibrate this one again, or pass weights_may_differ=True if it is meant")
    _restore(ops, tensors, path)
    return gm
