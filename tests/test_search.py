"""search_alpha: validation data only, the clean-accuracy budget, strategies, per-stage alphas."""
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.robust.search import stage_of

EPS = 0.05


class Tripwire:
    """A loader that fails the test if anything iterates it."""

    def __iter__(self):
        raise AssertionError("the test split was touched")


class Counting:
    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()


@pytest.fixture(scope="module")
def setup():
    """Calibration, validation and test data from disjoint pixel ranges, so where each input came from shows."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(64, 1, 8, 8, generator=gen) * 0.4
    val_x = torch.rand(40, 1, 8, 8, generator=gen) * 0.4
    test_x = 0.6 + torch.rand(40, 1, 8, 8, generator=gen) * 0.4
    model = _model()
    with torch.no_grad():
        val = (val_x, model(val_x).argmax(1))
        test = (test_x, model(test_x).argmax(1))
    gm = fxsparse.sparsify(model, [train], alpha=0.0, progress=False)
    return gm, val, test


def test_search_sees_validation_data_only(setup):
    gm, (vx, vy), test = setup
    val = Counting([(vx[:20], vy[:20]), (vx[20:], vy[20:])])
    seen = []
    hook = gm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        result = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=3", alphas=(0.0, 0.3, 1.0),
                                       max_clean_drop=0.05)
    finally:
        hook.remove()
    assert val.iterations == 1  # read once, the same batches for every alpha
    assert result.n_val == 40 and len(result.table) == 3
    inputs = torch.cat([s.flatten(1) for s in seen])
    # every input the model saw is a validation image or within eps of one; the test images are >= 0.6
    assert inputs.max() <= 0.4 + EPS + 1e-6
    with pytest.raises(AssertionError, match="test split was touched"):  # only evaluate, later, reads it
        fxsparse.evaluate(gm, Tripwire(), eps=EPS)
    report = fxsparse.evaluate(gm, test, eps=EPS, attacks=["clean"], search=result)  # disjoint: accepted
    assert report.n == 40
    with pytest.raises(fxsparse.FxsparseError, match="shares 40 example"):
        fxsparse.evaluate(gm, (vx, vy), eps=EPS, attacks=["clean"], search=result)


def test_choice_respects_the_clean_budget_and_prefers_small_alphas(setup):
    gm, val, _ = setup
    result = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=3", alphas=(0.0, 0.1, 0.5, 1.5, 3.0),
                                   max_clean_drop=0.0)
    base = result.baseline
    assert base.alpha == 0.0 and base.allowed
    for t in result.table:
        assert t.allowed == (t.clean >= base.clean)
    allowed = [t for t in result.table if t.allowed]
    best = max(t.robust for t in allowed)
    assert result.robust == best
    assert result.alpha == min(t.alpha for t in allowed if t.robust == best)
    assert all(float(op.alpha) == pytest.approx(result.alpha) for op in fxsparse.meansparse_ops(gm).values())
    assert "**chosen**" in result.to_markdown()


def test_refine_per_stage_and_apply_false(setup):
    gm, val, _ = setup
    fxsparse.set_alpha(gm, 0.0)
    result = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=2", alphas=(0.0, 0.2, 0.4),
                                   strategy="refine", rounds=1, per_stage=True, max_clean_drop=1.0, apply=False)
    phases = [t.phase for t in result.table]
    assert phases[:3] == ["grid"] * 3 and "refine 1" in phases
    assert set(result.stages) == {"2", "4"}  # the two ReLUs of the Sequential
    assert isinstance(result.alpha, dict) and set(result.alpha) == set(fxsparse.meansparse_ops(gm))
    assert any(p.startswith("stage ") for p in phases)
    assert all(float(op.alpha) == 0.0 for op in fxsparse.meansparse_ops(gm).values())  # apply=False restores
    named = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=2", alphas=(0.0, 0.2),
                                  per_stage={"first": "2", "second": ["4"]}, score="worst")
    assert set(named.stages) == {"first", "second"} and named.score == "worst"


def test_search_errors(setup):
    gm, val, _ = setup
    with pytest.raises(fxsparse.FxsparseError, match="score"):
        fxsparse.search_alpha(gm, val, eps=EPS, score="best")
    with pytest.raises(fxsparse.FxsparseError, match="unknown attack"):
        fxsparse.search_alpha(gm, val, eps=EPS, attack="fgsm")
    with pytest.raises(fxsparse.SelectionError, match="matches no site"):
        fxsparse.search_alpha(gm, val, eps=EPS, per_stage={"x": "nothing.*"})
    with pytest.raises(fxsparse.SelectionError, match="no MeanSparse"):
        fxsparse.search_alpha(_model(), val, eps=EPS)
    with pytest.raises(fxsparse.FxsparseError, match="empty"):
        fxsparse.search_alpha(gm, [], eps=EPS)


def test_stage_of():
    assert stage_of("stages.0.blocks.1.mlp.act") == "stages.0"
    assert stage_of("layer1.0.relu") == "layer1"
    assert stage_of("relu2") == "relu2"
    assert stage_of("blocks.3.mlp.act") == "blocks.3"
    assert stage_of("stem.act") == "stem"
