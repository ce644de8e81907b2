"""Resumable calibration: an interrupted run resumed from its checkpoint equals an uninterrupted run, bit for bit."""
import importlib
import os

import pytest
import torch

import fxsparse
from fxsparse.testing.bad_inputs import Small

BATCHES = [torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(7)]


class Interrupted(Exception):
    pass


class FailsOnce:
    """The calibration data, replayable; iteration number `on_pass` stops with Interrupted at batch `at`."""

    def __init__(self, on_pass: int, at: int):
        self.on_pass, self.at, self.passes = on_pass, at, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(BATCHES):
            if self.passes == self.on_pass and i == self.at:
                raise Interrupted(f"pass {self.passes}, batch {i}")
            yield batch


def _state(gm):
    return {f"{name}.{key}": value for name, op in fxsparse.meansparse_ops(gm).items()
            for key, value in [("mean", op.mean), ("std", op.std), ("count", op.count),
                               ("zscore_counts", op.zscore_counts)]}


def _prepared():
    torch.manual_seed(0)
    return fxsparse.prepare(Small().eval(), BATCHES[0])


def _forward_calls(gm):
    calls = []
    gm.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("measure, on_pass, at, expected_calls", [
    (True, 1, 5, 7 - 4),             # one pass (histogram estimated in it), checkpoint after batch 4
    ("exact", 1, 5, (7 - 4) + 7),    # statistics pass: 3 batches left, then the measure pass
    ("exact", 2, 3, 7 - 2),          # measure pass, checkpoint after batch 2: statistics kept, 5 batches left
], ids=["one-pass", "statistics-pass", "measure-pass"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, measure, on_pass, at, expected_calls):
    reference = fxsparse.calibrate(_prepared(), BATCHES, measure=measure)

    path = str(tmp_path / "calibration.ckpt")
    gm = _prepared()
    with pytest.raises(Interrupted):
        fxsparse.calibrate(gm, FailsOnce(on_pass, at), checkpoint=path, checkpoint_every=2, measure=measure)
    assert os.path.exists(path)

    resumed = _prepared()
    calls = _forward_calls(resumed)
    fxsparse.calibrate(resumed, BATCHES, checkpoint=path, checkpoint_every=2, measure=measure)
    assert len(calls) == expected_calls  # the batches in the checkpoint were skipped, not run again
    assert not os.path.exists(path)      # finished: the checkpoint is gone

    ours, theirs = _state(resumed), _state(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), [k for k in theirs if not torch.equal(ours[k], theirs[k])]


def test_checkpoint_files_are_written_atomically_and_every_n_batches(tmp_path, monkeypatch):
    from fxsparse.files import safefile

    written = []
    original = safefile.write
    monkeypatch.setattr(importlib.import_module("fxsparse.files.resume"), "write", lambda path, t, h: (written.append(h["progress"]["batches_done"]),
                                                                         original(path, t, h)))
    fxsparse.calibrate(_prepared(), BATCHES, checkpoint=str(tmp_path / "c"), checkpoint_every=3)
    assert written == [3, 6]  # one pass
    fxsparse.calibrate(_prepared(), BATCHES, checkpoint=str(tmp_path / "c"), checkpoint_every=3, measure="exact")
    assert written == [3, 6, 3, 6, 0, 3, 6]  # statistics 3, 6; start of measure; measure 3, 6
    assert os.listdir(tmp_path) == []   # no temporary files left, checkpoint removed
