"""search_alpha: validation data only, the clean-accuracy budget, strategies, per-stage alphas."""
import warnings

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.testing.data import CountingData
from fxsparse.robust import search as search_module
from fxsparse.robust.search import NO_GAIN, Trial, _best, _choose, paired_p, stage_of

EPS = 0.05


class Tripwire:
    """A loader that fails the test if anything iterates it."""

    def __iter__(self):
        raise AssertionError("the test split was touched")


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
    val = CountingData([(vx[:20], vy[:20]), (vx[20:], vy[20:])])
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


def test_choice_follows_the_stated_rule(setup):
    gm, val, _ = setup
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = fxsparse.search_alpha(gm, val, eps=0.15, attack="pgd:steps=3", alphas=(0.0, 0.1, 0.5, 1.5, 3.0),
                                       max_clean_drop=0.0)
    base = result.baseline
    assert base.alpha == 0.0 and base.allowed
    for t in result.table:
        assert t.allowed == (t.clean >= base.clean)
        assert t.robust_interval[0] <= t.robust <= t.robust_interval[1] and t.n == 40
        assert t.p_vs_zero == pytest.approx(paired_p(t.robust_correct, base.robust_correct))
    best = _best(result.table)
    assert result.best_alpha == best.alpha
    if paired_p(best.robust_correct, base.robust_correct) >= 0.05 or best.robust <= base.robust:
        assert result.verdict == NO_GAIN and result.alpha == 0.0
    else:
        near = [t.alpha for t in result.table if t.allowed and t.robust > base.robust and t.p_vs_zero < 0.05
                and paired_p(t.robust_correct, best.robust_correct) >= 0.05]
        assert result.alpha == min(near) and result.verdict != NO_GAIN
    assert all(float(op.alpha) == pytest.approx(result.alpha) for op in fxsparse.meansparse_ops(gm).values())
    md = result.to_markdown()
    assert "**chosen**" in md and "Rule: " in md and "Verdict: " in md and "95% CI" in md


def _trials(robust_vectors, clean=None):
    """Synthetic trials at alphas 0, 0.1, 0.2, ... from per-example robust outcomes."""
    out = []
    for i, r in enumerate(robust_vectors):
        r = torch.tensor(r, dtype=torch.bool)
        c = 1.0 if clean is None else clean[i]
        out.append(Trial("grid", round(0.1 * i, 6), c, float(r.float().mean()), c >= (1.0 if clean is None else
                                                                                     clean[0]) - 0.01,
                         len(r), robust_correct=r))
    return out


def test_rule_picks_the_smallest_alpha_within_noise_of_the_best():
    n = 200
    zero = [True] * 80 + [False] * 120                  # 40%
    small = [True] * 110 + [False] * 90                 # 55%: 30 gained over 0, beyond noise
    best = [True] * 114 + [False] * 86                  # 57%: within noise of `small` (4 discordant)
    alpha, pick, verdict = _choose(_trials([zero, small, best]))
    assert alpha == 0.1 and pick.robust == pytest.approx(0.55) and verdict != NO_GAIN
    noise = [True] * 84 + [False] * 116                 # 42%: 4 gained over 0: within noise
    alpha, pick, verdict = _choose(_trials([zero, noise]))
    assert (alpha, verdict) == (0.0, NO_GAIN)
    # the clean budget excludes the best: the pick is among the admissible ones
    alpha, _, _ = _choose(_trials([zero, small, best], clean=[0.9, 0.9, 0.5]))
    assert alpha == 0.1
    assert len(zero) == len(small) == len(best) == n


def test_rule_warnings_no_gain_and_top_of_the_grid(setup, monkeypatch):
    gm, val, _ = setup
    outcomes = {0.0: [True] * 10 + [False] * 30, 0.2: [True] * 25 + [False] * 15,
                0.3: [True] * 30 + [False] * 10, 0.4: [True] * 38 + [False] * 2, 0.6: [True] * 40, 0.8: [True] * 40}
    monkeypatch.setattr(search_module, "evaluate", _fake_evaluate(gm, outcomes))
    with pytest.warns(fxsparse.SearchWarning, match="largest tried"):
        result = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=1", alphas=(0.0, 0.2, 0.4))
    assert result.alpha == 0.4 and result.verdict != NO_GAIN and "largest tried" in result.notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxsparse.SearchWarning)  # the best (0.6) is no longer the largest tried
        refined = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=1", alphas=(0.0, 0.2, 0.4),
                                        strategy="refine", rounds=1)
    tried = [t.alpha for t in refined.table]
    assert 0.6 in tried and 0.8 in tried and 0.3 in tried  # upward: 1.5 and 2 times the top; and bisected
    assert refined.best_alpha == 0.6 and refined.alpha == 0.4  # 0.4 is within noise of 0.6 (2 discordant)
    flat = {0.0: [True] * 20 + [False] * 20, 0.2: [True] * 22 + [False] * 18, 0.4: [True] * 21 + [False] * 19}
    monkeypatch.setattr(search_module, "evaluate", _fake_evaluate(gm, flat))
    with pytest.warns(fxsparse.SearchWarning, match="no detectable gain"):
        none = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=1", alphas=(0.0, 0.2, 0.4))
    assert none.alpha == 0.0 and none.verdict == NO_GAIN and not none.gain
    assert "no detectable gain" in none.verdict_line() and "no detectable gain" in none.to_markdown()


def _fake_evaluate(gm, outcomes):
    """evaluate() stand-in: clean 100%, robust outcomes from `outcomes` at the model's current alpha."""
    from fxsparse.robust.evaluation import AttackResult, Evaluation

    def fake(model, batches, **kwargs):
        alpha = round(float(next(iter(fxsparse.meansparse_ops(model).values())).alpha), 6)
        robust = torch.tensor(outcomes[alpha])
        clean = AttackResult("clean", {}, correct={"plain": torch.ones(40, dtype=torch.bool)})
        attack = AttackResult("pgd", {}, correct={"bpda": robust, "plain": robust})
        return Evaluation([clean, attack], 40, 0.05, "linf", 0, 2)

    return fake


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
    md = named.to_markdown()
    assert "**chosen**" in md and "first: " in md and "Verdict: " in md


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


def test_default_score_is_the_adaptive_worst_case(setup, monkeypatch):
    """The default score counts an example robust only if every column of evaluate left it robust."""
    from fxsparse.robust import search as search_module
    from fxsparse.robust.evaluation import MODES, AttackResult, Evaluation

    gm, val, _ = setup
    calls = []

    def fake(model, batches, **kwargs):
        calls.append(kwargs["modes"])
        alpha = float(next(iter(fxsparse.meansparse_ops(model).values())).alpha)
        ones = torch.ones(40, dtype=torch.bool)
        # identity BPDA sees a gain at alpha 0.2 that the smooth surrogate removes
        bpda = ones.clone() if alpha > 0 else torch.arange(40) < 20
        smooth = torch.arange(40) < 20
        clean = AttackResult("clean", {}, correct={m: ones for m in kwargs["modes"]})
        attack = AttackResult("pgd", {}, correct={m: {"bpda": bpda, "smooth": smooth}.get(m, ones)
                                                  for m in kwargs["modes"]})
        return Evaluation([clean, attack], 40, 0.05, "linf", 0, 2)

    monkeypatch.setattr(search_module, "evaluate", fake)
    adaptive = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=2", alphas=(0.0, 0.2), apply=False)
    assert adaptive.score == "adaptive" and calls[0] == MODES
    assert adaptive.alpha == 0.0 and adaptive.verdict == "no detectable gain"
    with pytest.warns(fxsparse.SearchWarning):
        bpda = fxsparse.search_alpha(gm, val, eps=EPS, attack="pgd:steps=2", alphas=(0.0, 0.2), score="bpda",
                                     apply=False)
    assert bpda.alpha == 0.2  # the identity-BPDA score reports the gain the adaptive worst case removes
