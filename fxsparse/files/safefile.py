"""One file format for everything fxsparse writes: safetensors tensors plus a JSON header, no pickle.

The header lives in the safetensors metadata under "fxsparse" and carries a SHA-256 of the tensors, so a
file damaged anywhere (header or data) is refused rather than loaded as wrong statistics. Writes go to a
temporary file in the same folder first and replace the target atomically: a crash mid-write leaves the old
file or none, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Tuple

import torch

from fxsparse.errors import PersistenceError

HEADER_KEY = "fxsparse"


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write(path: "os.PathLike[str] | str", tensors: Dict[str, torch.Tensor], header: Dict[str, Any]) -> None:
    """Write `tensors` and the JSON-able `header` to `path` atomically."""
    from safetensors.torch import save

    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = dict(header, sha256=_digest(cpu))
    blob = save(cpu, metadata={HEADER_KEY: json.dumps(meta, sort_keys=True)})
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: "os.PathLike[str] | str", what: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, header) of a file written by `write`; PersistenceError naming `what` if it is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PersistenceError(f"no {what} at {path}; check the path (files are written by fxsparse.save)")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(HEADER_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:
        raise PersistenceError(f"{path} is not a readable {what} (corrupt or truncated?): "
                               f"{type(exc).__name__}: {exc}; write it again") from exc
    if raw is None:
        raise PersistenceError(f"{path} is a safetensors file but not a {what} (no '{HEADER_KEY}' header): load "
                               "plain weights with model.load_state_dict")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise PersistenceError(f"{path}: the {what}'s header is not valid JSON (corrupt file?): {exc}; write it again") from exc
    if not isinstance(header, dict) or header.get("sha256") != _digest(tensors):
        raise PersistenceError(f"{path}: the {what}'s contents do not match their checksum (corrupt file); "
                               "write it again")
    return tensors, header
