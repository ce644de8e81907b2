"""Straight-through gradients, each attack on a tiny model, and fxsparse.evaluate's two columns."""
import sys

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.robust import attacks
from fxsparse.robust.evaluation import ATTACKS, evaluate, parse_attack

pytest.importorskip("pyautoattack")


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    x = torch.rand(48, 1, 8, 8)
    return x, _tiny()(x).argmax(1)  # labels the model gets right: every failure is the attack's doing


@pytest.fixture(scope="module")
def sparse(data):
    x, _ = data
    gm = fxsparse.sparsify(_tiny(), [x], alpha=0.0, progress=False)
    return gm


def test_straight_through_gradient_is_the_identity_inside_the_band():
    op = fxsparse.MeanSparse(3, dim=1)
    op.mean.copy_(torch.tensor([0.0, 1.0, -1.0]))
    op.std.copy_(torch.tensor([1.0, 2.0, 0.5]))
    op.count.fill_(10)
    op.alpha.fill_(0.5)
    x = torch.randn(64, 3, 5, dtype=torch.float64, requires_grad=True)
    inside = ((x - op.mean.double().view(1, 3, 1)).abs() < 0.5 * op.std.double().view(1, 3, 1)).detach()
    assert inside.any() and (~inside).any()
    g = torch.randn_like(x)
    (plain,) = torch.autograd.grad(op(x), x, g)
    assert torch.equal(plain, torch.where(inside, torch.zeros_like(g), g))  # masked inside the band
    model = nn.Sequential(op)
    with fxsparse.straight_through(model):
        y = model(x)
        (st,) = torch.autograd.grad(y, x, g)
    assert torch.equal(st, g)  # identity everywhere, inside the band included
    with torch.no_grad():
        assert torch.equal(y, op(x))  # forward unchanged
    assert not op.straight_through  # restored on exit


@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 0.6)])
@pytest.mark.parametrize("name,options", [
    ("pgd", {"steps": 10}), ("apgd-ce", {"steps": 10}), ("apgd-dlr", {"steps": 10}),
    ("apgd-t", {"steps": 5, "targets": 2}), ("square", {"queries": 40}),
])
def test_each_attack_on_a_tiny_model(data, name, options, norm, eps):
    x, y = data
    model = _tiny()
    fn = ATTACKS[name].fn
    state = torch.get_rng_state()
    adv = fn(model, x, y, eps, norm=norm, seed=3, **options)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is kept
    delta = (adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all() and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (model(adv).argmax(1) == y).float().mean() < 1.0  # it fools the model on some examples
    assert torch.equal(adv, fn(model, x, y, eps, norm=norm, seed=3, **options))  # deterministic by seed


def test_standard_autoattack_runs_with_small_budgets(data):
    x, y = data
    model = _tiny()
    adv = attacks.autoattack(model, x[:12], y[:12], 0.08, steps=3, queries=10, seed=0)
    assert (adv - x[:12]).abs().max() <= 0.08 + 1e-6
    with torch.no_grad():
        assert (model(adv).argmax(1) == y[:12]).float().mean() < 1.0


def test_missing_pyautoattack_is_a_clear_error(monkeypatch, data):
    x, y = data
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(fxsparse.FxsparseError, match=r"fxsparse\[eval\]"):
        attacks.apgd(_tiny(), x, y, 0.1)


def test_reference_attacks_refuse_other_input_ranges(data):
    x, y = data
    with pytest.raises(fxsparse.FxsparseError, match="inside the model"):
        attacks.square(_tiny(), x, y, 0.1, bounds=(-1.0, 1.0))


def test_parse_attack():
    assert parse_attack("pgd") == ("pgd", {"steps": 20})
    assert parse_attack("PGD:steps=50, restarts=2") == ("pgd", {"steps": 50, "restarts": 2})
    assert parse_attack("square:queries=10,p_init=0.3") == ("square", {"queries": 10, "p_init": 0.3})
    with pytest.raises(fxsparse.FxsparseError, match="unknown attack"):
        parse_attack("cw")
    with pytest.raises(fxsparse.FxsparseError, match="key=value"):
        parse_attack("pgd:steps")


def test_evaluate_reports_both_columns_and_bpda_sees_through_the_mask(data, sparse):
    x, y = data
    fxsparse.set_alpha(sparse, 2.0)  # a wide band: most gradients through the operator are zero
    ev = evaluate(sparse, (x, y), eps=0.15, attacks=["clean", "pgd:steps=5", "square:queries=20"], seed=0,
                  batch_size=20)
    assert ev.n == 48 and ev.operators == 1
    assert [r.attack for r in ev.results] == ["clean", "pgd", "square"]
    pgd = ev["pgd"]
    assert pgd.plain is not None and pgd.bpda is not None and not pgd.bpda_note
    assert pgd.bpda < pgd.plain  # the adaptive attack finds what the masked gradient hides
    assert ev["square"].bpda == ev["square"].plain and ev["square"].bpda_note == "no gradient used"
    worst = ev.worst()
    assert worst <= min(r.plain for r in ev.results) and worst <= pgd.bpda
    md = ev.to_markdown()
    assert "BPDA (straight-through)" in md and "| pgd (steps=5) |" in md and "48 examples" in md
    assert ev.to_dict()["attacks"][1]["bpda"] == pgd.bpda
    again = evaluate(sparse, (x, y), eps=0.15, attacks=["pgd:steps=5"], seed=0, batch_size=20)
    assert torch.equal(again["pgd"].correct["bpda"], pgd.correct["bpda"])  # deterministic given the seed
    fxsparse.set_alpha(sparse, 0.0)


def test_evaluate_inputs_and_errors(data, sparse):
    x, y = data
    loader = [(x[:30], y[:30]), (x[30:], y[30:])]
    ev = evaluate(_tiny(), loader, eps=0.1, attacks=["clean"], max_examples=40, modes=("plain",))
    assert ev.n == 40 and ev["clean"].plain == 1.0 and ev["clean"].bpda is None
    assert ev["clean"].correct["plain"].shape == (40,)
    with pytest.raises(fxsparse.FxsparseError, match="modes"):
        evaluate(sparse, (x, y), eps=0.1, modes=("adaptive",))
    with pytest.raises(fxsparse.FxsparseError, match="eps"):
        evaluate(sparse, (x, y), eps=-1)
    with pytest.raises(fxsparse.FxsparseError, match=r"\(input, label\)"):
        evaluate(sparse, [x], eps=0.1)
