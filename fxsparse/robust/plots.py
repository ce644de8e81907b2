"""Pictures where people would rather look than read (matplotlib, the `plot` extra).

    plot_search(result, "alpha.png")   validation accuracy against alpha, with 95% intervals, chosen alpha marked
    plot_audit(report, "sites.png")    per site, in graph order: fraction replaced and channel std

Both write a PNG of a fixed size (`size` in inches at `dpi`) and return the path.
"""
from __future__ import annotations

import os
from typing import Sequence

from fxsparse.errors import FxsparseError


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise FxsparseError("plots need matplotlib: pip install 'fxsparse[plot]'") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int) -> str:
    path = os.fspath(path)
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_search(result, path, *, size: Sequence[float] = (7.0, 4.5), dpi: int = 100) -> str:
    """Clean and robust validation accuracy of every global alpha a `SearchResult` tried (per-stage trials
    are not on one alpha axis and are left out), with their Wilson 95% intervals; the chosen alpha is marked."""
    plt = _pyplot()
    trials = sorted((t for t in result.table if isinstance(t.alpha, (int, float))), key=lambda t: t.alpha)
    if not trials:
        raise FxsparseError("the search tried no global alpha to plot")
    alphas = [t.alpha for t in trials]
    fig, ax = plt.subplots(figsize=tuple(size))
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
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_audit(report, path, *, size: Sequence[float] = (9.0, 5.0), dpi: int = 100) -> str:
    """Per site in graph order: the fraction of calibration elements replaced at the site's alpha (top) and
    the mean channel std of its input (bottom, log scale)."""
    plt = _pyplot()
    records = [r for r in report if r.calibrated]
    if not records:
        raise FxsparseError("the model is not calibrated: nothing to plot (run fxsparse.calibrate first)")
    depth = list(range(len(records)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=tuple(size), sharex=True)
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
    fig.tight_layout()
    return _save(fig, path, dpi)
