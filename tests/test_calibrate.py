"""Calibration (fxsparse/calibrate/): exact site statistics, invariant to batching; every data form; errors."""
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.testing.data import CountingData, two_pass_moments
from fxsparse.inputs import read_batch


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 5)
        self.act2 = nn.GELU()

    def forward(self, x):
        x = self.act(self.conv(x))
        return self.act2(self.fc(x.mean((2, 3))))


def _site_input_reference(model, data):
    conv_out = torch.cat([model.conv(b) for b in data])
    fc_out = torch.cat([model.fc(torch.relu(model.conv(b)).mean((2, 3))) for b in data])
    return {"act": two_pass_moments(conv_out, 1), "act2": two_pass_moments(fc_out, 1)}


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_calibrate_model_sites_exact_and_batch_size_invariant(batch):
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(24, 3, 6, 6)
    gm = fxsparse.prepare(model, x[:2])
    data = list(torch.split(x, batch))
    fxsparse.calibrate(gm, data)
    with torch.no_grad():
        ref = _site_input_reference(model, [x])
    ops = fxsparse.meansparse_ops(gm)
    assert set(ops) == {"act", "act2"}
    for site, (mean, std) in ref.items():
        torch.testing.assert_close(ops[site].mean.double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ops[site].std.double(), std, rtol=1e-6, atol=1e-6)
        assert ops[site].calibrated


def test_calibrate_accepts_pairs_dicts_and_loaders_and_keeps_mode():
    model = Tiny()
    x = torch.randn(12, 3, 6, 6)
    y = torch.zeros(12, dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    results = []
    for data in (loader, [(x, y)], [{"image": x}], iter([x[:6], x[6:]])):
        gm = fxsparse.prepare(model, x[:2])
        gm.train()
        fxsparse.calibrate(gm, data)
        assert gm.training
        results.append(fxsparse.meansparse_ops(gm)["act"].mean.clone())
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-7)


def test_calibration_errors_are_specific():
    model = Tiny()
    gm = fxsparse.prepare(model, torch.randn(2, 3, 6, 6))
    with pytest.raises(fxsparse.CalibrationError, match="empty"):
        fxsparse.calibrate(gm, [])
    with pytest.raises(fxsparse.CalibrationError, match="batch 0"):
        fxsparse.calibrate(gm, [torch.randn(2, 5, 6, 6)])
    with pytest.raises(fxsparse.CalibrationError, match="cannot read"):
        fxsparse.calibrate(gm, ["not a tensor"])
    bad = torch.randn(2, 3, 6, 6)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxsparse.CalibrationError, match="non-finite.*batch 1"):
        fxsparse.calibrate(gm, [torch.randn(2, 3, 6, 6), bad])
    assert issubclass(fxsparse.CalibrationError, fxsparse.FxsparseError)


def test_read_batch_forms():
    """The one batch reader (fxsparse/inputs.py) calibration uses: a tensor, (input, target), {"input": x}."""
    t = torch.zeros(1)
    assert read_batch(t).args[0] is t
    assert read_batch((t, 3)).args[0] is t
    assert read_batch({"input": t}).args[0] is t


def test_replaced_fraction_matches_operator_on_calibration_data():
    torch.manual_seed(1)
    model = Tiny().eval()
    x = torch.randn(16, 3, 6, 6)
    gm = fxsparse.sparsify(model, [x], alpha=0.25)
    fxsparse.calibrate(gm, [x], measure="exact")
    op = fxsparse.meansparse_ops(gm)["act"]
    conv_out = model.conv(x).detach()
    inside = ((conv_out - op.mean.view(1, -1, 1, 1)).abs() < 0.25 * op.std.view(1, -1, 1, 1)).double().mean()
    record = {r.site: r for r in fxsparse.audit(gm)}["act"]
    assert abs(record.replaced - inside.item()) < 1e-6


def test_one_pass_estimate_is_close_to_the_exact_count_and_marked_as_an_estimate():
    """The default reads the data once and estimates the replaced fractions (grid fixed by the first batch,
    whose statistics differ from the final ones); measure="exact" reads it twice and counts them."""
    from fxsparse.calibrate.stats import ZSCORE_GRID

    torch.manual_seed(3)
    model = Tiny().eval()
    data = CountingData([torch.randn(8, 3, 6, 6) * (1 + i / 8) + i / 8 for i in range(6)])
    estimated = fxsparse.calibrate(fxsparse.prepare(model, data.batches[0]), data)
    fxsparse.set_alpha(estimated, 0.3)
    assert data.iterations == 1
    exact = fxsparse.calibrate(fxsparse.prepare(model, data.batches[0]), data, measure="exact")
    assert data.iterations == 3
    for name, op in fxsparse.meansparse_ops(estimated).items():
        ref = fxsparse.meansparse_ops(exact)[name]
        assert torch.equal(op.mean, ref.mean) and torch.equal(op.std, ref.std)
        assert op.zscore_estimated and not ref.zscore_estimated
        est, true = op.zscore_counts, ref.zscore_counts
        assert est[0] == 0 and bool((est[1:] >= est[:-1] - 1e-12).all()) and float(est[-1]) <= 1 + 1e-12
        assert float((est - true).abs().max()) < 0.02, name
    record = fxsparse.audit(estimated)[0]
    assert record.replaced_estimated and not fxsparse.audit(exact)[0].replaced_estimated
    assert "| ~" in fxsparse.audit(estimated).to_markdown()
    assert len(ZSCORE_GRID) == len(est)


def test_measure_false_leaves_no_stale_fractions_and_bad_values_are_refused():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    gm = fxsparse.sparsify(Tiny().eval(), [x], alpha=0.3)
    assert fxsparse.audit(gm)[0].replaced is not None
    fxsparse.calibrate(gm, [x * 2], measure=False)
    assert fxsparse.audit(gm)[0].replaced is None  # the old histogram belonged to the old statistics
    with pytest.raises(fxsparse.CalibrationError, match="measure must be"):
        fxsparse.calibrate(gm, [x], measure="twice")
    with pytest.warns(UserWarning, match="one-shot iterator"):
        fxsparse.calibrate(gm, iter([x]), measure="exact")
    assert fxsparse.meansparse_ops(gm)["act"].zscore_estimated


@pytest.mark.slow
def test_compiled_statistics_pass_equals_the_eager_pass():
    """calibrate(compile=True): one torch.compile'd program computes the moments (and the histogram sample);
    statistics equal the eager pass's to float rounding, the histogram closely."""
    torch.manual_seed(0)
    model = Tiny().eval()
    data = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(4)]
    eager = fxsparse.calibrate(fxsparse.prepare(model, data[0]), data)
    torch._dynamo.reset()
    compiled = fxsparse.calibrate(fxsparse.prepare(model, data[0]), data, compile=True)
    for name, op in fxsparse.meansparse_ops(compiled).items():
        ref = fxsparse.meansparse_ops(eager)[name]
        torch.testing.assert_close(op.mean, ref.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(op.std, ref.std, rtol=1e-5, atol=1e-6)
        assert int(op.count) == int(ref.count)
        assert float((op.zscore_counts - ref.zscore_counts).abs().max()) < 1e-3
