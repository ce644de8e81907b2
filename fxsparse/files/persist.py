"""Save a sparsified model's MeanSparse state, and load it into the same architecture, without pickle.

The file (safetensors with a JSON header, see `fxsparse/files/safefile.py`) holds what fxsparse adds to a model and
nothing of the model itself: per site the buffers `mean`, `std`, `alpha`, `count` and the calibration
histogram, and in the header the sites (kind, channel axis and how it was decided, channel count), what
`prepare` was told (selection, placement, channel_dims overrides, example input shapes), the capture path,
and the fxsparse and torch versions. `load` re-applies the pass to the model it is given exactly as recorded,
refuses the file if the sites differ in any way (or if a newer fxsparse wrote it), and copies the state in:
same model weights in, same outputs out, bit for bit.

The header also records a fingerprint of the weights the statistics were calibrated on: statistics are a
property of those weights, so `load` into the same architecture with other weights (a fine-tuned or
another checkpoint) refuses unless told `weights_may_differ=True`.

Format versions: 1 (selection, placement, input shapes); 2 adds channel_dims and each site's axis_default
(and, in later writes, the optional weights fingerprint, absent from older files and then not checked).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Dict, List, Mapping

import torch
from torch import fx, nn

from fxsparse.util import model_state
from fxsparse._meta import CAPTURE_META, PREPARE_META
from fxsparse._version import __version__
from fxsparse.api import prepare, splice_part
from fxsparse.capture import copy_model
from fxsparse.errors import FxsparseTypeError, NoActivationWarning, PersistenceError
from fxsparse.inputs import call_from_record
from fxsparse.ops import MeanSparse, meansparse_ops
from fxsparse.passes.locate import Selection
from fxsparse.files.safefile import read, write

FORMAT = "fxsparse-meansparse"
FORMAT_VERSION = 2
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


def _selection(saved: Mapping[str, Any]) -> Selection:
    kinds = saved["kinds"]
    return Selection(kinds=None if kinds is None else tuple(kinds), include=tuple(saved["include"]),
                     exclude=tuple(saved["exclude"]))


def _site(op: MeanSparse) -> Dict[str, Any]:
    return {"site": op.site, "module_path": op.module_path, "kind": op.kind, "node": op.node, "dim": op.dim,
            "channels": op.channels, "axis_rule": op.axis_rule, "axis_default": getattr(op, "axis_default", False),
            "inplace": op.inplace, "policy": getattr(op, "policy", "activations")}


def save(gm: nn.Module, path: "os.PathLike[str] | str") -> None:
    """Write the MeanSparse state of `gm` (from fxsparse.prepare or sparsify) to `path`."""
    gm = getattr(gm, "_orig_mod", gm)  # torch.compile's wrapper: save the module it compiles
    gm = _sparsified_part(gm)
    record = gm.meta.get(PREPARE_META) if isinstance(gm, fx.GraphModule) else None
    if record is None:
        raise PersistenceError(f"fxsparse.save takes the GraphModule returned by fxsparse.prepare or sparsify, "
                               f"got a {type(gm).__name__} without fxsparse's record of how it was prepared: pass "
                               "the sparsified model, not the original")
    tensors: Dict[str, torch.Tensor] = {}
    for name, op in meansparse_ops(gm).items():
        for buffer in BUFFERS:
            tensors[f"{name}/{buffer}"] = getattr(op, buffer)
        if op.zscore_counts is not None:
            tensors[f"{name}/zscore_edges"], tensors[f"{name}/zscore_counts"] = op.zscore_edges, op.zscore_counts
            tensors[f"{name}/zscore_estimated"] = torch.tensor(bool(op.zscore_estimated))
    report = gm.meta.get(CAPTURE_META)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "fxsparse_version": __version__, "torch_version": torch.__version__,
        "capture_path": getattr(report, "path", None), "prepare": record,
        "sites": [_site(op) for op in meansparse_ops(gm).values()],
        "weights_fingerprint": weights_fingerprint(gm),
    }
    write(path, tensors, header)


def _sparsified_part(model: nn.Module) -> nn.Module:
    """The GraphModule fxsparse made: the model itself, or the part `prepare(..., submodule=)` replaced."""
    if isinstance(model, fx.GraphModule) and PREPARE_META in model.meta:
        return model
    parts = [m for m in model.modules() if isinstance(m, fx.GraphModule) and m.meta.get(PREPARE_META, {}).get("submodule")]
    return parts[0] if len(parts) == 1 else model


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
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise PersistenceError(f"{path} was written by fxsparse {header.get('fxsparse_version')} in a newer format "
                               f"({header.get('format_version')}); upgrade fxsparse to read it")
    try:
        record = header["prepare"]
        selection, inputs = _selection(record["select"]), _example_inputs(model, record, path)
        saved_sites = {s["site"]: {field: s[field] for field in CHECKED_FIELDS} for s in header["sites"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise PersistenceError(f"{path} has an incomplete header ({type(exc).__name__}: {exc}); write it again "
                               "with fxsparse.save") from exc
    with warnings.catch_warnings():
        if saved_sites:  # a model without sites gets the mismatch error below, not a warning as well
            warnings.simplefilter("ignore", NoActivationWarning)
        told = {"placement": record["placement"]} if record.get("placement") else {}
        if record.get("channel_dims"):
            told["channel_dims"] = {str(k): int(v) for k, v in record["channel_dims"].items()}
        call = call_from_record(record, inputs)
        if record.get("submodule"):  # a part of the model: the part's recorded inputs, spliced into a copy
            gm = splice_part(copy_model(model), record["submodule"], call, record["model_inputs"],
                             selection, header.get("capture_path") or "auto", told.get("placement"),
                             told.get("channel_dims"))
        else:
            gm = prepare(model, call, selection, capture=header.get("capture_path") or "auto", **told)
    ops = meansparse_ops(gm)
    differences = _differences(saved_sites, ops)
    if differences:
        raise PersistenceError(
            f"{path} does not match this model: " + "; ".join(differences)
            + ". It was saved from another architecture, or with another selection or activation registry: load it "
              "into the model it was saved from")
    saved_print, this_print = header.get("weights_fingerprint"), weights_fingerprint(_sparsified_part(gm))
    if saved_print and this_print and saved_print != this_print and not weights_may_differ:
        raise PersistenceError(
            f"{path} was calibrated on other weights than this model's (weights fingerprint {saved_print} in the "
            f"file, {this_print} here): its statistics describe another model's activations. Load it into the "
            "model it was saved from, calibrate this one again, or pass weights_may_differ=True if it is meant")
    _restore(ops, tensors, path)
    return gm
