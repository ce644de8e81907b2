"""ThreatModel (fxsparse/robust/threat.py): validation, the keywords and the object give the same run, clashes."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse import ThreatModel
from fxsparse.robust.threat import RunSettings


def test_canonical_and_frozen():
    t = ThreatModel(8 / 255, "Linf", (0, 1))  # AutoAttack's spelling, integer bounds
    assert (t.norm, t.bounds) == ("linf", (0.0, 1.0)) and isinstance(t.eps, float)
    assert ThreatModel(0.5, "L2").norm == "l2" and ThreatModel(0).eps == 0.0
    assert t == ThreatModel(8 / 255) and hash(t) == hash(ThreatModel(8 / 255))
    assert t.keywords() == {"eps": 8 / 255, "norm": "linf", "bounds": (0.0, 1.0)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.eps = 0.1


@pytest.mark.parametrize("args, error, match", [
    ((0.1, "l1"), fxsparse.FxsparseValueError, "norm must be"),
    ((-0.1,), fxsparse.FxsparseValueError, "eps must be a finite number"),
    ((float("nan"),), fxsparse.FxsparseValueError, "eps must be a finite number"),
    ((True,), fxsparse.FxsparseValueError, "eps must be a finite number"),
    ((8,), fxsparse.InputRangeError, "Did you mean 8/255"),
    ((0.1, "linf", (1.0, 0.0)), fxsparse.FxsparseValueError, "low < high"),
    ((0.1, "linf", (0.0, float("inf"))), fxsparse.FxsparseValueError, "finite"),
    ((0.1, "linf", None), fxsparse.FxsparseTypeError, "pair of numbers"),
])
def test_validation_names_the_fix(args, error, match):
    with pytest.raises(error, match=match):
        ThreatModel(*args)


def test_eps_fits_the_bounds():
    assert ThreatModel(8.0, "linf", (0.0, 255.0)).eps == 8.0  # 8/255 of a 0-255 range is fine
    with pytest.raises(fxsparse.InputRangeError):
        ThreatModel(0.3)
    ThreatModel(64 / 255)
    t = ThreatModel(10.0, "l2")
    with pytest.raises(fxsparse.InputRangeError, match="diameter"):
        t.check_l2(torch.zeros(2, 1, 8, 8))  # the box's diameter is 8
    t.check_l2(torch.zeros(2, 1, 16, 16))
    ThreatModel(0.2).check_l2(torch.zeros(2, 1, 1, 1))  # nothing to check for L-inf


def test_admits_the_ball_and_the_bounds():
    t = ThreatModel(0.1)
    x = torch.full((2, 3), 0.5)
    assert t.admits(x, x + 0.1) and not t.admits(x, x + 0.2)
    assert not ThreatModel(0.1).admits(torch.ones(1, 3), torch.ones(1, 3) + 0.05)  # leaves the bounds
    assert ThreatModel(0.5, "l2").admits(x, x + 0.2) and not ThreatModel(0.3, "l2").admits(x, x + 0.2)


def test_resolve_keywords_object_and_clash():
    assert ThreatModel.resolve(eps=0.1) == ThreatModel(0.1, "linf", (0.0, 1.0))
    t = ThreatModel(0.1, "l2")
    assert ThreatModel.resolve(t) is t
    with pytest.raises(fxsparse.FxsparseValueError, match="both threat= and eps=, norm="):
        ThreatModel.resolve(t, eps=0.1, norm="l2")
    with pytest.raises(fxsparse.FxsparseTypeError, match="give the attack budget: eps="):
        ThreatModel.resolve()
    with pytest.raises(fxsparse.FxsparseTypeError, match="must be a fxsparse.ThreatModel"):
        ThreatModel.resolve((0.1, "linf"))


def test_run_settings_checks():
    s = RunSettings.of(eps=0.1, seed=np.int64(3), batch_size=np.int32(16))
    assert (s.seed, s.batch_size, s.max_examples) == (3, 16, None) and type(s.seed) is int
    assert s.to_dict() == {"eps": 0.1, "norm": "linf", "bounds": [0.0, 1.0], "seed": 3, "batch_size": 16,
                           "max_examples": None}
    for bad in (dict(batch_size=0), dict(batch_size=2.5), dict(max_examples=0), dict(seed="0")):
        with pytest.raises(fxsparse.FxsparseValueError, match=next(iter(bad))):
            RunSettings.of(eps=0.1, **bad)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 6, 6, generator=gen)
    return x, _model()(x).argmax(1).detach()


def test_evaluate_keywords_and_object_agree(data):
    model = fxsparse.sparsify(_model(), [data[0]], alpha=0.5, progress=False)
    common = dict(attacks=["clean", "pgd:steps=2"], modes=("plain", "bpda"), progress=False)
    by_keywords = fxsparse.evaluate(model, data, eps=0.1, norm="L2", bounds=(0, 1), **common)
    by_object = fxsparse.evaluate(model, data, threat=ThreatModel(0.1, "l2"), **common)
    assert by_keywords.to_dict() | {"attacks": None} == by_object.to_dict() | {"attacks": None}
    for a, b in zip(by_keywords.results, by_object.results):
        assert a.correct.keys() == b.correct.keys()
        assert all(torch.equal(a.correct[m], b.correct[m]) for m in a.correct)
    assert by_object.norm == "l2" and by_object.eps == 0.1
    with pytest.raises(fxsparse.FxsparseValueError, match="both threat= and eps="):
        fxsparse.evaluate(model, data, threat=ThreatModel(0.1), eps=0.1, **common)
    with pytest.raises(fxsparse.FxsparseValueError, match="both threat= and bounds="):
        fxsparse.evaluate(model, data, threat=ThreatModel(0.1), bounds=(0, 1), **common)
    with pytest.raises(TypeError, match="eps="):
        fxsparse.evaluate(model, data, **common)
    with pytest.raises(fxsparse.FxsparseValueError, match="both threat= and eps="):  # a curve: eps is a list
        fxsparse.evaluate(model, data, threat=ThreatModel(0.1), eps=[0.05, 0.1], **common)


def test_search_alpha_keywords_and_object_agree(data):
    model = fxsparse.sparsify(_model(), [data[0]], alpha=0.0, progress=False)
    common = dict(attack="pgd:steps=2", alphas=(0.0, 0.5), score="bpda", max_clean_drop=1.0, progress=False)
    with pytest.warns(fxsparse.SearchWarning):
        by_keywords = fxsparse.search_alpha(model, data, eps=0.1, norm="Linf", **common)
        by_object = fxsparse.search_alpha(model, data, threat=ThreatModel(0.1), **common)
    assert [t.to_dict() for t in by_keywords.table] == [t.to_dict() for t in by_object.table]
    assert by_keywords.alpha == by_object.alpha
    with pytest.raises(fxsparse.FxsparseValueError, match="both threat= and norm="):
        fxsparse.search_alpha(model, data, threat=ThreatModel(0.1), norm="linf", **common)


def test_an_evaluation_knows_its_threat_model_and_pairs_only_with_the_same():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.rand(6, 3, 2, 2) * 0.5 + 0.25, torch.arange(6) % 3
    a = fxsparse.evaluate(model, (x, y), eps=0.1, attacks=["clean"], bounds=(0.0, 1.0))
    b = fxsparse.evaluate(model, (x, y), threat=fxsparse.ThreatModel(0.1, "Linf", (0.0, 2.0)), attacks=["clean"])
    assert a.threat == fxsparse.ThreatModel(0.1) and b.threat.bounds == (0.0, 2.0)
    assert a.to_dict()["bounds"] == [0.0, 1.0]
    with pytest.raises(fxsparse.FxsparseValueError, match="bounds"):
        fxsparse.compare(a, b)
