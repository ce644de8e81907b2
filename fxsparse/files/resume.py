"""Resumable evaluations: what a long `evaluate` or `search_alpha` has finished, saved as it goes.

A file holds tensors (per-example outcomes of the finished batches or trials) and a JSON header with the
run's configuration (attacks, eps, seed, batch size, the model's operators and alphas, ...). Rerunning the
same call with the same file resumes after the last saved point and gives the result of an uninterrupted
run; a file written by a different configuration is refused, naming what differs, rather than mixed in.
The one resume-file class of the project: calibration (fxsparse/calibrate/checkpoint.py), evaluation and
alpha search all keep their progress in one.
Writes are atomic (fxsparse/files/safefile.py); under torch.distributed each rank keeps `<path>.rank<r>`. The file
is deleted when the run finishes.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple

import torch

from fxsparse.calibrate.distributed import rank_and_size
from fxsparse.errors import PersistenceError
from fxsparse.files.safefile import read, write


class ResumeFile:
    """Saved progress of one run of kind `what` ("calibration", "evaluation", "alpha search") with
    configuration `config` (JSON-able); `load` returns what an identical earlier run saved, `save` replaces
    it. A refused file raises `error` (the caller's stage error; PersistenceError by default)."""

    def __init__(self, path: "os.PathLike[str] | str", what: str, config: Mapping[str, Any],
                 error: type = PersistenceError):
        rank, size = rank_and_size()
        path = os.fspath(path)
        self.path = f"{path}.rank{rank}" if size > 1 else path
        self.what = what
        self.config = {**dict(config), "world_size": size}
        self.error = error

    def load(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """(tensors, progress) saved by an identical run, or ({}, {}) when there is no file."""
        if not os.path.exists(self.path):
            return {}, {}
        tensors, header = read(self.path, f"{self.what} checkpoint")
        if header.get("kind") != self.what:
            raise self.error(f"{self.path} is not an {self.what} checkpoint; delete it or choose another path")
        saved = header.get("config", {})
        if saved != self.config:
            differs = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
            raise self.error(
                f"{self.path} was written by an {self.what} with other settings ({', '.join(differs)} differ); "
                "rerun with the same settings to resume, or delete the file to start over")
        return tensors, header.get("progress", {})

    def save(self, tensors: Mapping[str, torch.Tensor], progress: Mapping[str, Any]) -> None:
        write(self.path, dict(tensors), {"kind": self.what, "config": self.config, "progress": dict(progress)})

    def discard(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
