"""Pictures where people would rather look than read (matplotlib, the `plot` extra).

    fig = plot_search(result)                 validation accuracy against alpha, 95% intervals, chosen alpha
    fig = plot_audit(report, "sites.png")     per site, in graph order: fraction replaced and channel std
    plot_search(result, ax=my_axes)           into the user's own axes (a subplot of their figure)

Each returns the matplotlib Figure (a notebook shows it), draws into `ax=` when given, and writes a PNG of
`size` inches at `dpi` only when given a path. Figures are made without pyplot, so the user's backend
(Jupyter's inline one included) and pyplot's list of open figures are left alone.
"""
from __future__ import annotations

import os
from typing import Sequence

from fxsparse.errors import FxsparseError


def _figure(size: Sequence[float], rows: int = 1, sharex: bool = False):
    """(figure, axes) without pyplot: no backend switch, nothing left open."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise FxsparseError("plots need matplotlib: pip install 'fxsparse[plot]'") from exc
    fig = Figure(figsize=tuple(size))
    axes = fig.subplots(rows, 1, sharex=sharex)
    return fig, axes


def _finish(fig, path, dpi: int, own: bool):
    if own:
        fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig


def plot_search(result, path=None, *, ax=None, size: Sequence[float] = (7.0, 4.5), dpi: int = 100):
    """Clean and robust validation accuracy of every global alpha a `SearchResult` tried (per-stage trials
    are not on one alpha axis and are left out), with their Wilson 95% intervals; the chosen alpha is marked."""
    trials = sorted((t for t in result.table if isinstance(t.alpha, (int, float))), key=lambda t: t.alpha)
    if not trials:
        raise FxsparseError("the search tried no global alpha to plot")
    alphas = [t.alpha for t in trials]
    own = ax is None
    fig, ax = _figure(size) if own else (ax.figure, ax)
    for field, label, colour in (("clean", "clean", "tab:blue"), ("robust", f"robust ({result.score})", "tab:red")):
        values = [getattr(t, field) for t in trials]
        lows, highs = zip(*(getattr(t, f"{field}_interval") for t in trials))
        ax.plot(alphas, [100 * v for v in values], "o-", color=colour, label=label)
        ax.fill_between(alphas, [100 * v for v in lows], [100 * v for v in highs], color=colour, alpha=0.15)
    if isinstance(result.alpha, (int, float)):
        ax.axvline(result.alpha, color="black", linestyle="--", linewidth=1, label=f"chosen alpha = {result.alpha:g}")
    ax.set_xlabel("alpha (band half-width in channel standard deviations)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"alpha search: {result.attack}, {result.n_val} validation examples, 95% intervals")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _finish(fig, path, dpi, own)


def plot_audit(report, path=None, *, ax=None, size: Sequence[float] = (9.0, 5.0), dpi: int = 100):
    """Per site in graph order: the fraction of calibration elements replaced at the site's alpha (top) and
    the mean channel std of its input (bottom, log scale). `ax`: a pair of axes (top, bottom)."""
    records = [r for r in report if r.calibrated]
    if not records:
        raise FxsparseError("the model is not calibrated: nothing to plot (run fxsparse.calibrate first)")
    depth = list(range(len(records)))
    own = ax is None
    fig, (top, bottom) = _figure(size, rows=2, sharex=True) if own else (ax[0].figure, ax)
    top.bar(depth, [100 * (r.replaced or 0.0) for r in records], color="tab:red")
    top.set_ylabel("replaced (%)")
    top.set_title(f"{len(records)} MeanSparse sites, in graph order")
    bottom.semilogy(depth, [max(r.std_mean, 1e-12) for r in records], "o-", color="tab:blue", markersize=3)
    bottom.set_ylabel("mean channel std")
    bottom.set_xlabel("site (depth)")
    if len(records) <= 40:
        bottom.set_xticks(depth)
        bottom.set_xticklabels([r.site for r in records], rotation=90, fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _finish(fig, path, dpi, own)
