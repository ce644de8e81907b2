"""Resumable calibration: the partial statistics of a long calibration, saved every N batches.

A checkpoint holds, per site, the running (count, mean, M2) of the statistics pass with the state of its
one-pass histogram (grid and counts), or during the second (measure="exact") pass the finished statistics
and the partial histogram counts, plus how many batches are done.
Resuming skips that many batches of the data and carries on, so the data must be replayed in the same order
(a DataLoader without shuffling, or with a fixed sampler seed). Because batches merge in the same order, an
interrupted and resumed run gives bit-identical statistics to an uninterrupted one. Under
`torch.distributed` each rank keeps its own file (`<path>.rank<r>`). The file is deleted when calibration
finishes. The file itself is the project's one resume file (fxsparse/files/resume.py): its configuration is
the model's sites and channel counts (and the world size), its progress the phase and batches done.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from fxsparse.errors import CalibrationError
from fxsparse.ops import MeanSparse
from fxsparse.files.resume import ResumeFile
from fxsparse.calibrate.stats import ChannelStats, ZScoreCounter, ZScoreSketch

FORMAT = "fxsparse-calibration-checkpoint"
PHASES = ("statistics", "measure")


class CalibrationCheckpoint:
    """Saves and restores the partial state of `fxsparse.calibrate` for the operators `ops` (by site)."""

    def __init__(self, path: "os.PathLike[str] | str", every: int, ops: Dict[str, MeanSparse]):
        if not isinstance(every, int) or every < 1:
            raise CalibrationError(f"checkpoint_every must be a positive number of batches, got {every!r}")
        self.every = every
        self.ops = ops
        sites = {name: op.channels for name, op in ops.items()}
        self.file = ResumeFile(path, "calibration", {"format": FORMAT, "sites": sites}, error=CalibrationError)
        self.path = self.file.path

    def restore(self, stats: Dict[MeanSparse, ChannelStats], counters: Dict[MeanSparse, ZScoreCounter],
                sketches: Optional[Dict[MeanSparse, ZScoreSketch]] = None) -> Tuple[str, int]:
        """Fill `stats` and `sketches` (in the measure phase, `counters`) from the file; (phase, batches done)."""
        tensors, progress = self.file.load()
        if not progress:
            return PHASES[0], 0
        try:
            phase = progress["phase"]
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}")
            for name, op in self.ops.items():
                if f"{name}/mean" in tensors:
                    # on the device where the batch moments will be computed, so later merges need no copies
                    mean, m2 = (tensors[f"{name}/{k}"].to(op.mean.device) for k in ("mean", "m2"))
                    stats[op].merge(int(tensors[f"{name}/count"]), mean, m2)  # into empty statistics: a copy
                if phase == "measure":
                    counters[op].counts = tensors[f"{name}/zscore_counts"]
                    counters[op].total = int(tensors[f"{name}/zscore_total"])
                elif sketches is not None and f"{name}/sketch_counts" in tensors:
                    sketch, device = sketches[op], op.mean.device
                    sketch.center, sketch.scale, sketch.counts = (
                        tensors[f"{name}/sketch_{k}"].to(device) for k in ("center", "scale", "counts"))
                    sketch.total = int(tensors[f"{name}/sketch_total"])
            return phase, int(progress["batches_done"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"checkpoint {self.path} is incomplete ({type(exc).__name__}: {exc}); delete "
                                   "it to calibrate from the start") from exc

    def save(self, phase: str, batches_done: int, stats: Dict[MeanSparse, ChannelStats],
             counters: Optional[Dict[MeanSparse, ZScoreCounter]] = None,
             sketches: Optional[Dict[MeanSparse, ZScoreSketch]] = None) -> None:
        tensors = {}
        for name, op in self.ops.items():
            s = stats[op]
            if s.mean is not None:
                tensors[f"{name}/count"] = torch.tensor(s.count, dtype=torch.int64)
                tensors[f"{name}/mean"], tensors[f"{name}/m2"] = s.mean, s.m2
            if counters is not None:
                tensors[f"{name}/zscore_counts"] = counters[op].counts
                tensors[f"{name}/zscore_total"] = torch.tensor(counters[op].total, dtype=torch.int64)
            if sketches is not None and sketches[op].counts is not None:
                sketch = sketches[op]
                tensors.update({f"{name}/sketch_center": sketch.center, f"{name}/sketch_scale": sketch.scale,
                                f"{name}/sketch_counts": sketch.counts,
                                f"{name}/sketch_total": torch.tensor(sketch.total, dtype=torch.int64)})
        self.file.save(tensors, {"phase": phase, "batches_done": batches_done})

    def after_batch(self, phase: str, batches_done: int, stats, counters=None, sketches=None) -> None:
        """Save when `batches_done` is a multiple of `every`."""
        if batches_done % self.every == 0:
            self.save(phase, batches_done, stats, counters, sketches)

    def discard(self) -> None:
        self.file.discard()
