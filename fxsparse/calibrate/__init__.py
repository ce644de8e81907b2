"""Calibrate: exact per-channel mean and standard deviation of every site's input over the calibration data.

Each MeanSparse observes its input while it passes through unchanged (the model computes exactly what the
original computes). Per batch and channel we take count, mean and M2 in float64 and merge batches with the
parallel formula of Chan et al. (`fxsparse/calibrate/stats.py`): the result is the population statistics of all
elements, independent of batch size and order up to float64 rounding. Float16 and bfloat16 models are
accumulated the same way, in float64; only the final mean and std are stored in the model's dtype.

Under `torch.distributed` every rank calibrates on its shard and the partial statistics are merged across
ranks (`fxsparse/calibrate/distributed.py`). Long runs can save partial statistics every N batches and resume after an
interruption (`fxsparse/calibrate/checkpoint.py`).

The same pass estimates, per site, how many elements lie within z standard deviations of their channel mean
for a grid of z (`ZScoreSketch`: a per-channel histogram on a grid fixed by the first batch); the audit reads
the fraction the operator replaces at any alpha from it, marked as an estimate. `measure="exact"` counts
them exactly in a second pass instead.
"""
from __future__ import annotations

import collections.abc
import os
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch import fx, nn

from fxsparse.util import first_line, model_state, progress_bar
from fxsparse._meta import PREPARE_META
from fxsparse.calibrate.checkpoint import CalibrationCheckpoint
from fxsparse.calibrate.diagnose import failing_node
from fxsparse.calibrate.distributed import (check_same_across_ranks, failing_together, merge_stats_across_ranks, on_rank,
                                  sum_across_ranks, sum_counters_across_ranks)
from fxsparse.errors import CalibrationError, FxsparseError, FxsparseTypeError, NoActivationWarning
from fxsparse.inputs import Call, find_record, read_batch
from fxsparse.ops import MeanSparse, meansparse_ops
from fxsparse.calibrate.stats import ZSCORE_GRID, ChannelStats, ZScoreCounter, ZScoreSketch



class ForwardLoop:
    """Calibration data given as a function: `fn(model)` runs the model on the user's own batches (any
    number of inputs, keywords, lists), as NVIDIA ModelOpt's `forward_loop`. Each call of the model counts
    as one batch."""

    def __init__(self, fn: Callable[[nn.Module], Any]):  # checked by check_data_or_loop
        self.fn = fn


class _StopLoop(Exception):
    """Raised from the model's pre-hook once max_batches calls have run: ends the user's loop early."""


def check_data_or_loop(data: Any, forward_loop: Optional[Callable[[nn.Module], Any]]) -> None:
    """Calibration reads `data` or runs `forward_loop(model)`: exactly one of them, and the loop a function."""
    if (data is None) == (forward_loop is None):
        raise CalibrationError("give calibration data or forward_loop=fn (fn(model) runs the model on your "
                               "batches), not " + ("both" if data is not None else "neither"))
    if forward_loop is not None and not callable(forward_loop):
        raise FxsparseTypeError(f"forward_loop must be a function fn(model), got {type(forward_loop).__name__}")


def _total(data: Any, max_batches: Optional[int]) -> Optional[int]:
    try:
        n = len(data)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


class _SiteObserver:
    """A site's observer: checks that the input has the operator's channel count, then records it."""

    def __init__(self, op: MeanSparse, record: Callable[[torch.Tensor], None]):
        self.op, self.record = op, record

    def __call__(self, x: torch.Tensor) -> None:
        op = self.op
        if not isinstance(x, torch.Tensor) or not -x.dim() <= op.dim < x.dim() or x.shape[op.dim] != op.channels:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise CalibrationError(
                f"site {op.site!r} expects {op.channels} channels along dim {op.dim}, but its input has {got}")
        self.record(x)


def _prepared_inputs(gm: nn.Module) -> str:
    record = find_record(gm)
    if not record:
        return ""
    shapes = ", ".join(f"{tuple(s)} {d.replace('torch.', '')}"
                       for s, d in zip(record["input_shapes"], record["input_dtypes"]))
    return f"; fxsparse.prepare saw inputs [{shapes}]"


def _failure(gm: nn.Module, call: Call, i: int, exc: Exception) -> CalibrationError:
    """The error for a batch the model refused: names the batch, the rank and the layer or site."""
    if isinstance(exc, CalibrationError):  # raised by a site observer
        return CalibrationError(f"calibration batch {i}{on_rank()}: {exc}; calibrate on inputs like the ones "
                                f"given to fxsparse.prepare{_prepared_inputs(gm)}")
    ours = isinstance(exc, FxsparseError)  # the input guard's (channels, size): it already names the fix
    where = failing_node(gm, call.args) if not call.kwargs and not ours else None
    first = str(exc) if ours else first_line(exc)
    return CalibrationError(
        f"calibration batch {i}{on_rank()} (inputs [{call.describe()}]) failed in the model: "
        + (where or first)
        + f"{_prepared_inputs(gm)}. Check that the batches have the shape, dtype and layout the model expects")


def _forward(gm: nn.Module, call: Call, i: int) -> None:
    """Run one batch; a failure names the batch, the rank and the layer or site that refused it."""
    try:
        gm(*call.args, **call.kwargs)
    except Exception as exc:
        raise _failure(gm, call, i, exc) from exc


def _attach(observers: Dict[MeanSparse, Any]) -> None:
    for op, obs in observers.items():
        op.observer = _SiteObserver(op, obs.update)


def _detach(observers) -> None:
    for op in observers:
        op.observer = None


def _run_loop(gm, loop: ForwardLoop, observers, *, max_batches, start, after_batch) -> int:
    """Run the user's loop once; every call of `gm` is a batch. Calls before `start` (resuming) run with the
    observers detached; the loop is stopped after `max_batches` calls."""
    state = {"i": 0, "call": None, "in_call": False}

    def pre(module, args, kwargs):
        i = state["i"]
        if max_batches is not None and i >= max_batches:
            raise _StopLoop()
        (_attach if i >= start else _detach)(observers)
        state["call"], state["in_call"] = Call(tuple(args), dict(kwargs)), True

    def post(module, args, kwargs, output):
        i = state["i"]
        state["i"], state["in_call"] = i + 1, False
        if i >= start and after_batch is not None:
            after_batch(i + 1, state["call"].leaves())

    handles = [gm.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),  # before the input guard's
               gm.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            loop.fn(gm)
    except _StopLoop:
        pass
    except Exception as exc:
        if isinstance(exc, CalibrationError) and "calibration batch" in str(exc):
            raise
        if not state["in_call"]:  # the user's loop itself failed, between model calls
            raise CalibrationError(f"forward_loop raised after {state['i']} model call(s){on_rank()}: "
                                   f"{first_line(exc, 400)}") from exc
        raise _failure(gm, state["call"], state["i"], exc) from exc
    finally:
        for h in handles:
            h.remove()
        _detach(observers)
    return state["i"]


def _run_pass(gm, data, observers: Dict[MeanSparse, Any], *, max_batches, progress, desc, start=0,
              after_batch=None) -> int:
    """Feed the batches of `data` (an iterable, or a ForwardLoop) from index `start` on through `gm` with
    `observers` attached; returns the number of batches done (skipped ones included)."""
    if isinstance(data, ForwardLoop):
        return _run_loop(gm, data, observers, max_batches=max_batches, start=start, after_batch=after_batch)
    device, _ = model_state(gm)
    record = find_record(gm)
    _attach(observers)
    done = start
    try:
        with torch.no_grad():
            bar = progress_bar(_total(data, max_batches), desc, "batch", progress, leave=False, iterable=data)
            for i, batch in enumerate(bar):
                if max_batches is not None and i >= max_batches:
                    break
                if i < start:  # resuming: this batch is already in the statistics
                    continue
                call = read_batch(batch, record)
                if device is not None:
                    call = call.to(device)
                _forward(gm, call, i)
                done = i + 1
                if after_batch is not None:
                    after_batch(done, call.leaves())
    finally:
        _detach(observers)
    return done


def _check_finite(stats: Dict[MeanSparse, ChannelStats], i: int, inputs) -> None:
    parts = [t for s in stats.values() if s.last_batch is not None for t in s.last_batch]
    if not parts:
        return
    finite = bool(torch.cat(parts).isfinite().all())  # one sync per batch; cat promotes float32 to float64
    bad = [] if finite else [op.site for op, s in stats.items()
                             if s.last_batch is not None and not all(bool(t.isfinite().all()) for t in s.last_batch)]
    for s in stats.values():
        s.last_batch = None
    if bad:
        source = ("the batch itself holds NaN or Inf" if not all(bool(torch.isfinite(t).all()) for t in inputs)
                  else "the batch is finite, so the model overflows or divides by zero on it")
        raise CalibrationError(
            f"non-finite values (NaN or Inf) reached site(s) {bad[:5]} in calibration batch {i}{on_rank()}: "
            f"{source}; clean the data or calibrate the model in a wider dtype")


def _no_operators(gm: nn.Module) -> nn.Module:
    if not (isinstance(gm, fx.GraphModule) and PREPARE_META in gm.meta):
        raise CalibrationError("the model has no MeanSparse operators; run fxsparse.prepare first")
    warnings.warn(NoActivationWarning("the model has no MeanSparse operators (fxsparse.prepare found no "
                                      "selected activation), so there is nothing to calibrate"), stacklevel=3)
    return gm


def _write_statistics(stats: Dict[MeanSparse, ChannelStats]) -> None:
    missing = [op.site for op, s in stats.items() if s.mean is None]
    if missing:
        raise CalibrationError(f"site(s) {missing[:5]} never ran on the calibration data; give data that "
                               "reaches them, or exclude them with select={'exclude': [...]}")
    for op, s in stats.items():
        op.mean.copy_(s.mean.to(op.mean.dtype))
        op.std.copy_(s.std.to(op.std.dtype))
        op.count.fill_(int(s.count))
        op.refresh_bounds()
        op.zscore_edges = op.zscore_counts = None  # measured again below, or not at all: never stale
        op.zscore_estimated = False


class _Recorder:
    """A site's statistics and its one-pass histogram, fed from one observation (the histogram's grid comes
    from the first batch's moments, just computed by the statistics)."""

    def __init__(self, stats: ChannelStats, sketch: ZScoreSketch):
        self.stats, self.sketch = stats, sketch

    def update(self, x: torch.Tensor) -> None:
        self.stats.update(x)
        self.sketch.update(x, self.stats.last_batch)


def _statistics_pass(gm, data, stats, start: int, saver, passes, sketches=None, compile=False) -> None:
    """Per-channel moments on this rank (and, with `sketches`, the one-pass histograms), merged across ranks,
    written into the operators. With `compile`, one torch.compile'd program computes them
    (fxsparse/calibrate/compiled.py)."""
    def after_batch(n: int, inputs) -> None:
        _check_finite(stats, n - 1, inputs)
        if saver is not None:
            saver.after_batch("statistics", n, stats, sketches=sketches)

    observers = stats if sketches is None else {op: _Recorder(stats[op], sketches[op]) for op in stats}
    runner = gm
    if compile:
        from fxsparse.calibrate.compiled import compiled_statistics

        compiled = compiled_statistics(gm, stats, sketches)
        if compiled is not None:
            runner, observers = compiled, {}
    with failing_together():
        batches = _run_pass(runner, data, observers, desc="calibrate", start=start, after_batch=after_batch,
                            **passes)
    merge_stats_across_ranks(stats, {op: op.channels for op in stats})
    if sum_across_ranks(batches) == 0:
        raise CalibrationError("calibration data is empty: give at least one batch")
    _write_statistics(stats)
    if sketches is not None:  # each rank maps its own histogram onto the merged statistics, then ranks add up
        # against the statistics the operators hold (their dtype), so that a resumed run gives the same bits
        _write_zscores({op: sketch.counter(op.mean, op.std) for op, sketch in sketches.items()})


def _write_zscores(counters: Dict[MeanSparse, ZScoreCounter]) -> None:
    for c in counters.values():
        c.counts = c.counts.cpu()
    sum_counters_across_ranks(list(counters.values()))
    for op, c in counters.items():
        op.zscore_edges = ZSCORE_GRID.clone()
        op.zscore_counts = c.counts / max(c.total, 1)
        op.zscore_estimated = c.estimated


def _measure_pass(gm, data, stats, counters, start: int, saver, passes) -> None:
    """Second pass (measure="exact"): per site, the exact histogram of |x - mean| / std."""
    def after_batch(n: int, inputs) -> None:
        if saver is not None:
            saver.after_batch("measure", n, stats, counters)

    with failing_together():
        _run_pass(gm, data, counters, desc="measure", start=start, after_batch=after_batch, **passes)
    _write_zscores(counters)


def calibrate(
    gm: nn.Module,
    data: Optional[Iterable] = None,
    *,
    forward_loop: Optional[Callable[[nn.Module], Any]] = None,
    max_batches: Optional[int] = None,
    progress: Optional[bool] = None,
    measure: Union[bool, str] = True,
    checkpoint: Union[str, "os.PathLike[str]", None] = None,
    checkpoint_every: int = 100,
    float64: bool = False,
    compile: bool = False,
) -> fx.GraphModule:
    """Set every MeanSparse's `mean` and `std` from `data`; returns `gm`.

    Args:
        data: a DataLoader or any iterable of input tensors, (input, target) pairs or dicts keyed by the
            model's input names (fxsparse.inputs.read_batch states the rule). Under torch.distributed, each
            rank's own shard (e.g. through a DistributedSampler).
        forward_loop: instead of `data`, a function `fn(model)` that calls the model on the user's batches
            (several inputs, keywords, lists of images: anything the model takes). Every call is a batch;
            the loop runs under no_grad with the model in eval mode, once per pass (twice with `measure`).
        max_batches: stop after this many batches (per rank).
        progress: show a tqdm bar (default: when stderr is a terminal, or in a notebook).
        measure: how the audit's replaced fractions are taken. True (default): estimated in the statistics
            pass itself (one pass over the data; the audit marks them as estimates). "exact": counted in a
            second pass over the data (one-shot iterators, which cannot be read twice, get the estimate, with
            a warning). False: not at all.
        checkpoint: a file for partial statistics, written every `checkpoint_every` batches; if it exists,
            calibration resumes from it (replay the data in the same order). Deleted when calibration ends.
        float64: take each batch's moments in float64 (the batch is converted first). The default takes them
            in the activation's own dtype (a sum, then the sum of squared deviations from the batch mean; ATen's
            batch-norm statistics for short rows) and merges batches in float64: error within 1e-6 x
            (std + |mean|).
        compile: run the statistics pass as one torch.compile'd program whose reductions Inductor fuses into
            the forward's kernels (compiles on the first batch; statistics equal the eager pass's to float
            rounding). Models with operators inside opaque modules take the eager pass, with a warning.

    A model prepared without any selected activation has no operators: calibrate warns
    (NoActivationWarning) and returns it unchanged.
    """
    check_data_or_loop(data, forward_loop)
    if forward_loop is not None:
        data = ForwardLoop(forward_loop)
    ops = meansparse_ops(gm)
    if not ops:
        return _no_operators(gm)
    if not (isinstance(measure, bool) or measure == "exact"):
        raise CalibrationError(f"measure must be True, False or 'exact', got {measure!r}")
    if measure == "exact" and isinstance(data, collections.abc.Iterator):
        warnings.warn("calibrate(measure='exact') needs to read the data twice, but it is a one-shot iterator: "
                      "the replaced fractions are estimated in one pass instead", stacklevel=2)
        measure = True
    exact_measure = measure == "exact"
    saver = CalibrationCheckpoint(checkpoint, checkpoint_every, ops) if checkpoint is not None else None
    stats = {op: ChannelStats(op.dim, float64) for op in ops.values()}
    counters = {op: ZScoreCounter(op) for op in ops.values()}
    sketches = {op: ZScoreSketch(op) for op in ops.values()} if measure is True else None  # one pass
    phase, done = saver.restore(stats, counters, sketches) if saver is not None else ("statistics", 0)
    check_same_across_ranks(phase == "measure", "the phase to resume (delete the checkpoints to restart)")
    passes = dict(max_batches=max_batches, progress=progress)
    was_training = gm.training
    gm.eval()
    try:
        if phase == "statistics":
            _statistics_pass(gm, data, stats, done, saver, passes, sketches, compile)
            done = 0
            if saver is not None and exact_measure:
                saver.save("measure", 0, stats, counters)
        else:  # resuming the second pass: the statistics in the checkpoint are final
            _write_statistics(stats)
        if exact_measure:
            _measure_pass(gm, data, stats, counters, done, saver, passes)
        if saver is not None:
            saver.discard()
    finally:
        gm.train(was_training)
    return gm

