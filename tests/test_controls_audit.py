"""set_alpha, straight_through and the audit views."""
import json
import threading

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.testing.models import build


@pytest.fixture(scope="module")
def resnet():
    model, _ = build("tv_resnet18")
    gm = fxsparse.sparsify(model, [torch.randn(4, 3, 32, 32) for _ in range(2)], alpha=0.2)
    return model, gm


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


def test_audit_views(resnet):
    _, gm = resnet
    fxsparse.set_alpha(gm, 0.2)
    audit = fxsparse.audit(gm)
    assert len(audit) == 17
    r = audit[0]
    assert (r.site, r.module_path, r.kind, r.node, r.dim, r.channels) == ("relu", "relu", "relu", "relu", 1, 64)
    assert r.axis_rule == "BatchNorm2d bn1" and not r.axis_default and 0 < r.replaced < 1
    doc = json.loads(audit.to_json())
    assert doc["capture"]["path"] == "fx" and len(doc["sites"]) == 17
    assert doc["sites"][0]["site"] == "relu"
    md = audit.to_markdown()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 18 and "17 sites" in md
    g = audit.to_networkx()
    marked = [n for n, d in g.nodes(data=True) if d.get("meansparse")]
    assert len(marked) == 17
    import networkx as nx
    assert nx.is_directed_acyclic_graph(g)
    for n in marked:  # each operator feeds an activation node
        assert any(g.nodes[s].get("activation") == "relu" for s in g.successors(n))


def test_state_dict_keys_read_like_the_model(resnet):
    _, gm = resnet
    keys = gm.state_dict().keys()
    assert "layer1.0.relu_meansparse.mean" in keys and "layer1.0.relu_1_meansparse.std" in keys
    assert "layer1.0.conv1.weight" in keys
