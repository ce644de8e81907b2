"""Resumable calibration: the partial statistics of a long calibration, saved every N batches.

A checkpoint holds, per site, the running (count, mean, M2) of the statistics pass with the state of its
one-pass histogram (grid and counts), or during the second (measure="exact") pass the finished statistics
and the partial histogram counts, plus how many batches are done.
Resuming skips that many batches of the data and carries on, so the data must be replayed in the same order
(a DataLoader without shuffling, or with a fixed sampler seed). Because batches merge in the same order, an
interrupted and resumed run gives bit-identical statistics to an uninterrupted one. Under
`torch.distributed` each rank keeps its own file (`<path>.rank<r>`). The file is deleted when calibration
finishes.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from fxsparse.calibrate.distributed import rank_and_size
from fxsparse.errors import CalibrationError
from fxsparse.ops import MeanSparse
from fxsparse.files.safefile import read, write
from fxsparse.calibrate.stats import ChannelStats, ZScoreCounter, ZScoreSketch

FORMAT = "fxsparse-calibration-checkpoint"
PHASES = ("statistics", "measure")


class CalibrationCheckpoint:
    """Saves and restores the partial state of `fxsparse.calibrate` for the operators `ops` (by site)."""

    def __init__(self, path: "os.PathLike[str] | str", every: int, ops: Dict[str, MeanSparse]):
        if not isinstance(every, int) or every < 1:
            raise CalibrationError(f"checkpoint_every must be a positive number of batches, got {every!r}")
        rank, self.world_size = rank_and_size()
        path = os.fspath(path)
        self.path = f"{path}.rank{rank}" if self.world_size > 1 else path
        self.every = every
        self.ops = ops

    def _sites(self) -> Dict[str, int]:
        return {name: op.channels for name, op in self.ops.items()}

    def restore(self, stats: Dict[MeanSparse, ChannelStats], counters: Dict[MeanSparse, ZScoreCounter],
                sketches: Optional[Dict[MeanSparse, ZScoreSketch]] = None) -> Tuple[str, int]:
        """Fill `stats` and `sketches` (in the measure phase, `counters`) from the file; (phase, batches done)."""
        if not os.path.exists(self.path):
            return PHASES[0], 0
        tensors, header = read(self.path, "calibration checkpoint")
        self._check(header)
        phase = header["phase"]
        try:
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
            return phase, int(header["batches_done"])
        except (KeyError, TypeError, ValueError) as exc:
            self._refuse(f"is incomplete ({type(exc).__name__}: {exc})")

    def _refuse(self, why: str):
        raise CalibrationError(f"checkpoint {self.path} {why}; delete it to calibrate from the start")

    def _check(self, header) -> None:
        if header.get("format") != FORMAT or header.get("phase") not in PHASES:
            self._refuse("is not a calibration checkpoint of this fxsparse version")
        if header.get("world_size") != self.world_size:
            self._refuse(f"was written by {header.get('world_size')} process(es), not {self.world_size}")
        saved, ours = header.get("sites", {}), self._sites()
        if saved != ours:
            missing = sorted(set(ours) - set(saved))
            extra = sorted(set(saved) - set(ours))
            channels = sorted(n for n in set(saved) & set(ours) if saved[n] != ours[n])
            self._refuse(f"belongs to another model (sites missing from it: {missing[:5]}, sites the model lacks: "
                         f"{extra[:5]}, channel counts differ at: {channels[:5]})")

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
        header = {"format": FORMAT, "phase": phase, "batches_done": batches_done,
                  "world_size": self.world_size, "sites": self._sites()}
        write(self.path, tensors, header)

    def after_batch(self, phase: str, batches_done: int, stats, counters=None, sketches=None) -> None:
        """Save when `batches_done` is a multiple of `every`."""
        if batches_done % self.every == 0:
            self.save(phase, batches_done, stats, counters, sketches)

    def discard(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
