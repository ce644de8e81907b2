"""Straight-through gradients, each attack on a tiny model, and fxsparse.evaluate's two columns."""
import sys

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.robust import attacks
from fxsparse.robust.evaluation import ATTACKS, evaluate, parse_attack

from fxsparse.testing.markers import needs_reference_attacks
from test_evaluation_scale import Interrupted, StopsOnce


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
    op.refresh_bounds()
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
    ("pgd", {"steps": 10}),
    *[pytest.param(name, options, marks=needs_reference_attacks) for name, options in (
        ("apgd-ce", {"steps": 10}), ("apgd-dlr", {"steps": 10}), ("apgd-t", {"steps": 5, "targets": 2}),
        ("square", {"queries": 40}))],
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


@needs_reference_attacks
def test_standard_autoattack_runs_with_small_budgets(data):
    x, y = data
    model = _tiny()
    adv = attacks.autoattack(model, x[:12], y[:12], 0.08, steps=3, queries=10, seed=0)
    assert (adv - x[:12]).abs().max() <= 0.08 + 1e-6
    with torch.no_grad():
        assert (model(adv).argmax(1) == y[:12]).float().mean() < 1.0


def test_missing_reference_attacks_are_a_clear_error(monkeypatch, data):
    x, y = data
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", None)  # nor RobustBench's git package
    with pytest.raises(fxsparse.FxsparseError, match=r"fxsparse\[eval\]"):
        attacks.apgd(_tiny(), x, y, 0.1)


@needs_reference_attacks
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


@needs_reference_attacks
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


# -- guards on the data and the budget -----------------------------------------------------------------------

@pytest.mark.parametrize("transform,match", [
    (lambda x: (x - 0.5) / 0.25, "with_normalization"),  # ImageNet-style normalised images
    (lambda x: x * 255, "divide the images by 255"),
    (lambda x: x + 0.5, "bounds"),
])
def test_evaluate_and_search_refuse_data_outside_the_bounds(data, sparse, transform, match):
    x, y = data
    bad = transform(x)
    later = [(x[:24], y[:24]), (bad[24:], y[24:])]  # the second batch is out of range: every batch is checked
    with pytest.raises(fxsparse.InputRangeError, match=match):
        evaluate(_tiny(), later, eps=0.03, attacks=["clean"])
    with pytest.raises(fxsparse.InputRangeError, match=match):
        fxsparse.search_alpha(sparse, (bad, y), eps=0.03, attack="pgd:steps=1", alphas=(0.0, 0.1))
    ev = evaluate(_tiny(), (bad, y), eps=0.03, attacks=["clean"], bounds=(float(bad.min()), float(bad.max())))
    assert ev.n == 48  # the same data with its own bounds is accepted


def test_budgets_in_the_wrong_units_are_refused_and_common_ones_pass(data):
    from fxsparse.robust.guards import check_budget, check_l2_budget

    x, y = data
    with pytest.raises(fxsparse.InputRangeError, match="Did you mean 8/255"):
        evaluate(_tiny(), (x, y), eps=8, attacks=["clean"])
    with pytest.raises(fxsparse.InputRangeError, match="Did you mean 8/255"):
        check_budget(0.3, "linf", (0.0, 1.0))
    check_budget(64 / 255, "linf", (0.0, 1.0))
    check_budget(16 / 255, "linf", (0.0, 1.0))
    check_budget(8.0, "linf", (0.0, 255.0))  # 8/255 of a 0-255 range is fine
    check_l2_budget(3.0, torch.zeros(1, 3, 224, 224), (0.0, 1.0))  # ImageNet L2
    check_l2_budget(0.5, torch.zeros(1, 3, 32, 32), (0.0, 1.0))    # CIFAR-10 L2
    with pytest.raises(fxsparse.InputRangeError, match="diameter"):
        check_l2_budget(56.0, torch.zeros(1, 3, 32, 32), (0.0, 1.0))
    with pytest.raises(fxsparse.InputRangeError, match="diameter"):
        evaluate(_tiny(), (x, y), eps=8.5, norm="l2", attacks=["clean"])  # 8 x 8 grey: diameter 8


def test_with_normalization_moves_the_normalisation_into_the_model(data):
    x, y = data
    mean, std = (0.4,), (0.2,)
    inner = _tiny()
    wrapped = fxsparse.with_normalization(inner, mean, std)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), inner((x - 0.4) / 0.2))
    gm = fxsparse.sparsify(wrapped, [x], alpha=0.2, progress=False)
    assert len(fxsparse.meansparse_ops(gm)) == 1
    assert evaluate(gm, (x, y), eps=0.03, attacks=["clean"]).n == 48  # [0, 1] images pass the guard
    with pytest.raises(fxsparse.FxsparseValueError, match="std must be > 0"):
        fxsparse.with_normalization(inner, mean, (0.0,))
    with pytest.raises(fxsparse.FxsparseTypeError, match="sequence of numbers"):
        fxsparse.with_normalization(inner, "imagenet", std)


def test_normalization_of_timm_and_torchvision():
    import timm
    import torchvision
    imagenet = [0.485, 0.456, 0.406, 0.229, 0.224, 0.225]

    def flat(pair):
        return [v for part in pair for v in part]

    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained=False)
        clip = timm.create_model("vit_base_patch16_clip_224", pretrained=False)
    assert flat(fxsparse.normalization_of(model)) == pytest.approx(imagenet, abs=1e-6)
    assert flat(fxsparse.normalization_of(clip)) == pytest.approx([0.4815, 0.4578, 0.4082, 0.2686, 0.2613, 0.2758],
                                                                   abs=1e-4)  # not ImageNet's: read, not assumed
    cfg = timm.data.resolve_data_config({}, model=clip)
    assert fxsparse.normalization_of(cfg) == fxsparse.normalization_of(clip)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    assert flat(fxsparse.normalization_of(weights)) == pytest.approx(imagenet, abs=1e-6)
    with pytest.raises(fxsparse.FxsparseValueError, match="pass mean and std"):
        fxsparse.normalization_of(nn.Linear(2, 2))


# -- any classifier output ---------------------------------------------------------------------------------

class _Output(nn.Module):
    """The tiny model returning its logits wrapped as `form`."""

    def __init__(self, form):
        super().__init__()
        self.net, self.form = _tiny(), form

    def forward(self, x):
        z = self.net(x)
        return {"tuple": (z, z.detach()), "list": [z], "dict": {"logits": z, "hidden": z},
                "custom": {"scores": z}}[self.form]


@needs_reference_attacks
@pytest.mark.parametrize("form", ["tuple", "list", "dict", "custom"])
def test_every_output_form_gives_the_same_evaluation(data, form):
    x, y = data
    reference = evaluate(_tiny(), (x, y), eps=0.08, attacks=["clean", "pgd:steps=3", "apgd-ce:steps=3"])
    model = _Output(form).eval()
    logits = (lambda out: out["scores"]) if form == "custom" else None
    ev = evaluate(model, (x, y), eps=0.08, attacks=["clean", "pgd:steps=3", "apgd-ce:steps=3"], logits=logits)
    for a, b in zip(reference.results, ev.results):
        assert torch.equal(a.correct["plain"], b.correct["plain"]), a.attack
    if form == "custom":
        with pytest.raises(fxsparse.FxsparseTypeError, match="logits="):
            evaluate(model, (x, y), eps=0.08, attacks=["clean"])


@needs_reference_attacks
@pytest.mark.slow  # importing transformers and capturing with torch.export: several seconds
def test_tiny_hugging_face_vit_sparsified_and_evaluated():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.rand(12, 3, 16, 16)
    with torch.no_grad():
        y = model(x).logits.argmax(1)
    gm = fxsparse.sparsify(model, [x], alpha=0.0, progress=False)
    assert len(fxsparse.meansparse_ops(gm)) == 2  # one GELU per encoder layer
    before = evaluate(model, (x, y), eps=2 / 255, attacks=["clean", "pgd:steps=1", "apgd-ce:steps=1"])
    after = evaluate(gm, (x, y), eps=2 / 255, attacks=["clean", "pgd:steps=1", "apgd-ce:steps=1"], baseline=before)
    assert before["clean"].plain == 1.0 and after["clean"].plain == 1.0
    for a, b in zip(before.results, after.results):  # alpha = 0: the same model, the same outcomes
        assert torch.equal(a.correct["plain"], b.correct["plain"]), a.attack
    assert all(r.verdict == "within noise" and r.gained == r.lost == 0 for r in after.comparison.rows)
    adv = attacks.pgd(gm, x, y, 2 / 255, steps=1)  # the attacks take the ModelOutput directly too
    assert (adv - x).abs().max() <= 2 / 255 + 1e-6


# -- the paired before / after verdict ---------------------------------------------------------------------

def test_mcnemar_exact_matches_the_binomial_tail():
    from fxsparse.robust.compare import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)   # 2 * P(Bin(5, 1/2) = 0)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(14, 1) < 0.05 < mcnemar_exact(8, 3)


def test_compare_pairs_examples_and_says_when_a_difference_is_noise(data, sparse):
    x, y = data
    before = evaluate(_tiny(), (x, y), eps=0.1, attacks=["clean", "pgd:steps=5"])
    fxsparse.set_alpha(sparse, 0.0)
    same = fxsparse.compare(before, evaluate(sparse, (x, y), eps=0.1, attacks=["clean", "pgd:steps=5"]))
    assert all(r.gained == r.lost == 0 and r.p_value == 1.0 and r.verdict == "within noise" for r in same.rows)
    fxsparse.set_alpha(sparse, 3.0)
    after = evaluate(sparse, (x, y), eps=0.1, attacks=["clean", "pgd:steps=5"], baseline=before)
    fxsparse.set_alpha(sparse, 0.0)
    row = after.comparison.row("pgd", "bpda")
    b, a = before["pgd"].correct["plain"], after["pgd"].correct["bpda"]
    assert (row.gained, row.lost) == (int((~b & a).sum()), int((b & ~a).sum()))
    assert row.difference == pytest.approx(float(a.float().mean() - b.float().mean()))
    assert row.verdict == ("within noise" if row.p_value >= 0.05 else ("better" if row.difference > 0 else "worse"))
    # every column the sparsified model ran is paired (surrogates and transfer too), then the worst case
    assert [(r.attack, r.mode) for r in after.comparison.rows] == (
        [("clean", "plain")] + [("pgd (steps=5)", m) for m in after["pgd"].correct]
        + [("worst case, every attack", "both")])
    assert {"smooth", "anneal", "transfer"} <= set(after["pgd"].correct)
    worst = after.comparison.rows[-1]
    assert worst.after == pytest.approx(float(torch.stack(
        [c for r in after.results for c in r.correct.values()]).all(0).float().mean()))
    md = after.to_markdown()
    assert "McNemar p" in md and "within noise" in md or "better" in md or "worse" in md
    assert after.to_dict()["comparison"]["n"] == 48
    with pytest.raises(fxsparse.FxsparseValueError, match="not paired"):
        fxsparse.compare(before, evaluate(_tiny(), (x, y), eps=0.05, attacks=["clean"]))


def test_scheduled_pgd_is_at_least_as_strong_as_fixed_step_pgd(data):
    x, y = data
    model = _tiny()
    fixed = attacks.pgd(model, x, y, 0.05, steps=10)
    cosine = attacks.pgd(model, x, y, 0.05, steps=10, schedule="cosine", momentum=0.75)
    assert (cosine - x).abs().max() <= 0.05 + 1e-6 and cosine.min() >= 0 and cosine.max() <= 1
    with torch.no_grad():
        acc_fixed = (model(fixed).argmax(1) == y).float().mean()
        acc_cosine = (model(cosine).argmax(1) == y).float().mean()
    assert acc_cosine <= acc_fixed


# --- the adaptive columns (issue 20) ------------------------------------------------------------------------
def test_worst_is_the_per_example_minimum_and_later_columns_attack_survivors_only(data, sparse):
    x, y = data
    fxsparse.set_alpha(sparse, 1.0)
    seen = []
    real = ATTACKS["pgd"].fn

    def spy(model, xs, ys, eps, **options):
        seen.append(len(ys))
        return real(model, xs, ys, eps, **options)

    from fxsparse.robust import evaluation as ev_module

    kind = ATTACKS["pgd"]
    ev_module.ATTACKS["pgd"] = ev_module.AttackKind(spy, True, kind.defaults, kind.per_example)
    try:
        ev = evaluate(sparse, (x, y), eps=0.1, attacks=["clean", "pgd:steps=5"], batch_size=48,
                      keep_adversarial=True)
    finally:
        ev_module.ATTACKS["pgd"] = kind
        fxsparse.set_alpha(sparse, 0.0)
    r = ev["pgd"]
    assert list(r.correct) == list(ev_module.MODES)
    columns = torch.stack([c for res in ev.results for c in res.correct.values()])
    assert ev.worst() == float(columns.all(0).float().mean())  # the per-example minimum over every column
    # plain and bpda attack all 48; smooth the survivors of both; anneal passes (one per tau) and transfer
    # the survivors of everything before them
    alive = r.correct["plain"] & r.correct["bpda"]
    assert seen[:2] == [48, 48] and seen[2] == int(alive.sum()) == r.attacked["smooth"]
    assert r.attacked["transfer"] == int((alive & r.correct["smooth"] & r.correct["anneal"]).sum())
    assert not (r.correct["transfer"] & ~alive).any()  # a column never resurrects a lost example
    assert sum(r.found().values()) == int((~columns[1:].all(0)).sum())  # each loss attributed once
    md = ev.to_markdown()
    assert "smooth band" in md and "transfer from alpha 0" in md and "losses found by:" in md
    for mode, adv in r.adversarial.items():  # kept, one per example, inside the ball
        assert adv.shape == x.shape and (adv - x).abs().max() <= 0.1 + 1e-6


def test_transfer_restores_alphas_exactly_and_can_come_from_a_base_model(data, sparse):
    x, y = data
    ops = list(fxsparse.meansparse_ops(sparse).values())
    with torch.no_grad():
        ops[0].alpha.fill_(0.3)  # a float32 value: restored bit for bit
        ops[0].refresh_bounds()  # a direct write: the bounds follow (FXSPARSE_CHECK_BOUNDS catches a miss)
    before = ops[0].alpha.clone()
    ev = evaluate(sparse, (x, y), eps=0.1, attacks=["pgd:steps=3"], modes=("transfer",))
    assert torch.equal(ops[0].alpha, before)
    base = evaluate(sparse, (x, y), eps=0.1, attacks=["pgd:steps=3"], modes=("plain", "transfer"),
                    transfer_from=_tiny(), survivors_only=False)
    with torch.no_grad():
        ops[0].alpha.zero_()
    plain_on_base = evaluate(_tiny(), (x, y), eps=0.1, attacks=["pgd:steps=3"], modes=("plain",))
    # crafted on the base model: at alpha 0.3 the sparsified model scores them, not the base
    assert ev["pgd"].transfer is not None and base["pgd"].transfer is not None
    assert plain_on_base["pgd"].plain <= 1.0


@pytest.mark.slow
def test_on_the_trained_digits_cnn_a_surrogate_column_finds_what_identity_bpda_misses():
    from fxsparse.tools import demo

    splits = demo.load_digits_splits()
    model = demo.trained_model(splits, log=lambda *_: None)
    gm = fxsparse.sparsify(model, demo.batches(splits["train"], 256), alpha=0.5, progress=False)
    x, y = splits["test"]
    ev = evaluate(gm, (x, y), eps=0.1, attacks=["pgd"], modes=("bpda", "smooth"), survivors_only=False)
    bpda, smooth = ev["pgd"].correct["bpda"], ev["pgd"].correct["smooth"]
    assert int((bpda & ~smooth).sum()) >= 5  # measured: about 6 points of accuracy at alpha 0.5
    assert ev["pgd"].smooth < ev["pgd"].bpda


def test_kept_adversarial_examples_rescore_as_given_inputs(data, sparse):
    x, y = data
    fxsparse.set_alpha(sparse, 1.0)
    try:
        ev = evaluate(sparse, (x, y), eps=0.1, attacks=["pgd:steps=5"], modes=("plain", "bpda"),
                      keep_adversarial=True, batch_size=20)
        kept = ev["pgd"].adversarial["bpda"]
        again = evaluate(sparse, (x, y), eps=0.1, attacks=["clean"], adversarial={"bpda-pgd": kept},
                         batch_size=16)
        assert torch.equal(again["given: bpda-pgd"].correct["plain"], ev["pgd"].correct["bpda"])
        assert again.worst() == float(again["given: bpda-pgd"].correct["plain"].float().mean())
        with pytest.raises(fxsparse.FxsparseValueError, match="eps"):
            evaluate(sparse, (x, y), eps=0.1, attacks=["clean"], adversarial=(x + 0.2).clamp(0, 1))
        with pytest.raises(fxsparse.FxsparseValueError, match="one per example"):
            evaluate(sparse, (x, y), eps=0.1, attacks=["clean"], adversarial=x[:10])
        with pytest.raises(fxsparse.FxsparseTypeError):
            evaluate(sparse, (x, y), eps=0.1, attacks=["clean"], adversarial=[x])
    finally:
        fxsparse.set_alpha(sparse, 0.0)


@pytest.mark.parametrize("modes", [("plain", "bpda"), ("bpda",)])
def test_a_resumed_run_scores_given_inputs_at_their_examples(tmp_path, modes):
    """Given adversarial inputs are matched to their examples after a resume too (the offset counts the
    batches restored from the checkpoint), and their row is restored whatever the modes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(18, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    gm = fxsparse.sparsify(net, [x], alpha=0.3, progress=False)
    with torch.no_grad():
        y = gm(x).argmax(1)
    given = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).sign()).clamp(0, 1)
    options = dict(eps=0.05, attacks=["clean", "pgd:steps=2"], modes=modes, adversarial=given, progress=False)
    whole = evaluate(gm, StopsOnce(x, y, at=99), **options)
    data, path = StopsOnce(x, y, at=2), tmp_path / "eval.ckpt"
    with pytest.raises(Interrupted):
        evaluate(gm, data, checkpoint=path, **options)
    resumed = evaluate(gm, data, checkpoint=path, **options)
    assert resumed.n == whole.n == 18
    for a, b in zip(resumed.results, whole.results):
        assert a.correct.keys() == b.correct.keys() and all(torch.equal(a.correct[m], b.correct[m]) for m in a.correct)
