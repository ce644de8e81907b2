"""set_alpha and straight_through (fxsparse/operators.py): every form, every error, thread safety."""
import threading

import pytest
import torch
from torch import nn

import fxsparse


def test_set_alpha_forms_and_errors(resnet):
    _, gm = resnet
    fxsparse.set_alpha(gm, 0.1)
    assert all(r.alpha == pytest.approx(0.1) for r in fxsparse.audit(gm))
    fxsparse.set_alpha(gm, {"layer4.*": 0.3, "relu": 0.0, "layer1.0.relu_1_meansparse": 0.05})
    alphas = {r.site: r.alpha for r in fxsparse.audit(gm)}
    assert alphas["relu"] == 0.0 and alphas["layer1.0.relu_1"] == pytest.approx(0.05)
    assert alphas["layer4.1.relu"] == pytest.approx(0.3) and alphas["layer2.0.relu"] == pytest.approx(0.1)
    for bad in (-0.1, float("nan"), float("inf"), "x"):
        with pytest.raises(fxsparse.SelectionError):
            fxsparse.set_alpha(gm, bad)
    with pytest.raises(fxsparse.SelectionError, match="no site named"):
        fxsparse.set_alpha(gm, {"layer9.relu": 0.1})
    fresh = fxsparse.prepare(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(fxsparse.CalibrationError, match="not calibrated"):
        fxsparse.set_alpha(fresh, 0.2)
    fxsparse.set_alpha(fresh, 0.0)  # zero needs no statistics


def test_straight_through_context(resnet):
    model, gm = resnet
    fxsparse.set_alpha(gm, 0.5)
    x = torch.randn(2, 3, 32, 32)

    def grad_of(module):
        xi = x.clone().requires_grad_(True)
        module(xi).sum().backward()
        return xi.grad

    g_plain = grad_of(gm)
    with fxsparse.straight_through(gm):
        with fxsparse.straight_through(gm):  # nesting is counted
            pass
        assert all(op.straight_through for op in fxsparse.meansparse_ops(gm).values())
        g_st = grad_of(gm)
        with torch.no_grad():
            out_st = gm(x)
    assert not any(op.straight_through for op in fxsparse.meansparse_ops(gm).values())
    with torch.no_grad():
        assert torch.equal(out_st, gm(x))
    assert not torch.allclose(g_plain, g_st)

    errors = []

    def worker():
        try:
            for _ in range(20):
                with fxsparse.straight_through(gm):
                    assert all(op.straight_through for op in fxsparse.meansparse_ops(gm).values())
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not any(op.straight_through for op in fxsparse.meansparse_ops(gm).values())
