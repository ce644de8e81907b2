"""Plots return a Figure, draw into given axes, write PNG files of the size asked for only given a path,
and leave matplotlib's backend alone."""
import pytest
import torch
from PIL import Image
from torch import nn

import fxsparse
from fxsparse.errors import FxsparseError
from fxsparse.robust.compare import wilson
from fxsparse.robust.plots import plot_audit, plot_search

pytest.importorskip("matplotlib")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 64, 4)).eval()


def _png(path, size, dpi=100):
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (int(size[0] * dpi), int(size[1] * dpi))
    assert len(set(image.convert("L").tobytes())) > 10  # something was drawn, not a blank canvas


def test_search_plot(tmp_path):
    x = torch.rand(32, 1, 8, 8)
    gm = fxsparse.sparsify(_model(), [x], alpha=0.0, progress=False)
    y = gm(x).argmax(1).detach()
    result = fxsparse.search_alpha(gm, (x, y), eps=0.05, attack="pgd:steps=2", alphas=(0.0, 0.3, 0.6),
                                   max_clean_drop=1.0)
    plot_search(result, tmp_path / "search.png", size=(6, 4))
    _png(tmp_path / "search.png", (6, 4))


def test_audit_plot(tmp_path):
    gm = fxsparse.sparsify(_model(), [torch.rand(16, 1, 8, 8)], alpha=0.3, progress=False)
    plot_audit(fxsparse.audit(gm), tmp_path / "audit.png", size=(8, 5))
    _png(tmp_path / "audit.png", (8, 5))
    with pytest.raises(FxsparseError, match="not calibrated"):
        plot_audit(fxsparse.audit(fxsparse.prepare(_model(), torch.rand(2, 1, 8, 8))), tmp_path / "x.png")


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_plots_return_a_figure_take_axes_and_leave_the_backend_alone(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    backend = matplotlib.get_backend()
    x = torch.rand(32, 1, 8, 8)
    gm = fxsparse.sparsify(_model(), [x], alpha=0.0, progress=False)
    y = gm(x).argmax(1).detach()
    result = fxsparse.search_alpha(gm, (x, y), eps=0.05, attack="pgd:steps=1", alphas=(0.0, 0.3),
                                   max_clean_drop=1.0)
    before = set(tmp_path.iterdir())
    fig = result.plot()
    assert isinstance(fig, Figure) and set(tmp_path.iterdir()) == before  # nothing written without a path
    mine = Figure()
    ax = mine.subplots()
    assert plot_search(result, ax=ax) is mine and ax.lines
    top, bottom = Figure().subplots(2, 1)
    assert plot_audit(fxsparse.audit(gm), ax=(top, bottom)) is top.figure
    assert matplotlib.get_backend() == backend


def test_results_render_as_tables_in_a_notebook():
    x = torch.rand(16, 1, 8, 8)
    gm = fxsparse.sparsify(_model(), [x], alpha=0.0, progress=False)
    y = gm(x).argmax(1).detach()
    result = fxsparse.search_alpha(gm, (x, y), eps=0.05, attack="pgd:steps=1", alphas=(0.0, 0.3),
                                   max_clean_drop=1.0)
    report = fxsparse.evaluate(gm, (x, y), eps=0.05, attacks=["clean"])
    for shown in (result, report, fxsparse.audit(gm)):
        assert shown._repr_markdown_() == shown.to_markdown() and "|" in shown._repr_markdown_()


def test_robustness_curve_over_eps(tmp_path):
    from fxsparse.robust.curve import RobustnessCurve

    x = torch.rand(16, 1, 8, 8)
    gm = fxsparse.sparsify(_model(), [x], alpha=0.2, progress=False)
    y = gm(x).argmax(1).detach()
    curve = fxsparse.evaluate(gm, (x, y), eps=[0.0, 0.05, 0.2], attacks=["clean", "pgd:steps=2"])
    assert isinstance(curve, RobustnessCurve) and curve.eps == [0.0, 0.05, 0.2] and len(curve) == 3
    single = fxsparse.evaluate(gm, (x, y), eps=0.05, attacks=["clean", "pgd:steps=2"])
    assert curve[1].worst() == single.worst()  # each point is the single-eps evaluation
    assert curve.worst()[0] >= curve.worst()[-1] and "| eps |" in curve._repr_markdown_()
    curve.plot(tmp_path / "curve.png")
    _png(tmp_path / "curve.png", (7, 4.5))
