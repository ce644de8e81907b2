"""Surrogate gradients (issue 20): exact forward, the smooth band's backward, one compiled graph per kind."""
import pytest
import torch

import fxsparse
from fxsparse.ops import MeanSparse, smooth_band_slope
from fxsparse.operators import Surrogate, parse_surrogate
from test_compile import counted_compile


def _op(alpha=0.5):
    op = MeanSparse(4)
    op.mean.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    op.std.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    op.count.fill_(10)
    op.alpha.fill_(alpha)
    return op


def test_parse():
    assert parse_surrogate("identity") == Surrogate("identity") == parse_surrogate(None)
    assert parse_surrogate("smooth:tau=0.3") == Surrogate("smooth", (0.3,))
    assert parse_surrogate("smooth").taus == (0.1,)
    assert parse_surrogate("anneal:taus=1/0.3/0.1").taus == (1.0, 0.3, 0.1)
    assert str(parse_surrogate("anneal:taus=1/0.1")) == "anneal:taus=1/0.1"
    for bad in ("gauss", "smooth:tau=-1", "smooth:tau=1/2", "identity:tau=1", "smooth:t=1", 3):
        with pytest.raises(fxsparse.FxsparseError):
            parse_surrogate(bad)


@pytest.mark.parametrize("surrogate", ["identity", "smooth:tau=0.3", "smooth:tau=0.05"])
def test_forward_exact_and_backward_is_the_surrogates(surrogate):
    op = _op()
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    op = op.double()
    exact = op(x)
    xi = x.clone().requires_grad_(True)
    with fxsparse.straight_through(op, surrogate=surrogate):
        out = op(xi)
        out.sum().backward()
    assert torch.equal(out.detach(), exact)
    if surrogate == "identity":
        assert torch.equal(xi.grad, torch.ones_like(x))
        return
    tau = parse_surrogate(surrogate).taus[0]
    mean, t = op.mean.view(1, -1, 1, 1), (op.alpha * op.std).view(1, -1, 1, 1)
    xs = x.clone().requires_grad_(True)
    d = xs - mean
    smooth = mean + d * torch.sigmoid((d.abs() - t) / (tau * t))
    smooth.sum().backward()
    torch.testing.assert_close(xi.grad, xs.grad)
    assert abs(float(op.tau) - 0.1) < 1e-7 and not op.straight_through  # restored on exit


def test_smooth_band_is_the_identity_at_alpha_zero_and_small_deep_inside():
    x = torch.tensor([0.0, 0.01, 5.0])
    zero = torch.zeros(())
    assert torch.equal(smooth_band_slope(x, zero, zero, torch.tensor(0.1)), torch.ones(3))
    slope = smooth_band_slope(x, zero, torch.tensor(1.0), torch.tensor(0.1))
    assert slope[0] < 1e-3 and slope[1] < 1e-3 and abs(float(slope[2]) - 1) < 1e-6


def test_nesting_restores_the_outer_surrogate():
    op = _op()
    with fxsparse.straight_through(op, "smooth:tau=0.3"):
        with fxsparse.straight_through(op):
            assert op.straight_through == "identity"
        assert op.straight_through == "smooth" and abs(float(op.tau) - 0.3) < 1e-7
    assert op.straight_through is False and abs(float(op.tau) - 0.1) < 1e-7


def test_one_compiled_graph_per_surrogate_kind():
    """The kind is a Python attribute (a new program: one graph each); tau is a 0-d buffer (no recompile)."""
    gm, compiled, counter, x = counted_compile("tv_resnet18")
    with torch.no_grad():
        reference = compiled(x)
    grads = {}
    for _ in range(2):
        for surrogate in ("identity", "smooth:tau=0.3", "smooth:tau=0.05", "anneal:taus=1/0.1"):
            with fxsparse.straight_through(gm, surrogate):
                xi = x.clone().requires_grad_(True)
                out = compiled(xi)
                out.sum().backward()
            assert torch.equal(out.detach(), reference)
            grads[surrogate] = xi.grad
        with torch.no_grad():
            assert torch.equal(compiled(x), reference)
    assert counter.frame_count == 3  # inference, identity, smooth: not one per toggle or per tau
    assert not torch.equal(grads["smooth:tau=0.3"], grads["smooth:tau=0.05"])  # the new tau is seen
    assert not torch.equal(grads["identity"], grads["smooth:tau=0.3"])
