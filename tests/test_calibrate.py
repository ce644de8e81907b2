"""Calibration: exact pooled statistics, invariant to batching and order; clear errors on bad data."""
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import fxsparse
from fxsparse.testing.data import CountingData
from fxsparse.inputs import read_batch
from fxsparse.calibrate.stats import ChannelStats


def _two_pass_reference(x: torch.Tensor, dim: int):
    xd = x.double().movedim(dim, 0).reshape(x.shape[dim], -1)
    mean = xd.mean(1)
    std = ((xd - mean[:, None]) ** 2).mean(1).sqrt()
    return mean, std


@st.composite
def datasets(draw):
    ndim = draw(st.integers(2, 4))
    dim = draw(st.integers(1, ndim - 1))
    shape = [draw(st.integers(5, 24))] + [draw(st.integers(1, 4)) for _ in range(ndim - 1)]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    offset = draw(st.sampled_from([0.0, 3.0, 1e3]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = torch.randn(shape, generator=gen) * scale + offset
    cuts = sorted(draw(st.lists(st.integers(1, shape[0] - 1), max_size=4, unique=True)))
    order = draw(st.permutations(range(len(cuts) + 1)))
    return x, dim, cuts, order


@given(datasets(), st.booleans())
def test_channel_stats_match_float64_two_pass_for_any_batching_and_order(case, channels_last):
    """exact=True: float64 throughout, equal to the two-pass reference to float64 rounding. Default: per-row
    moments in the input dtype (each the exact value rounded once to float32), merged in float64."""
    x, dim, cuts, order = case
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    batches = list(torch.tensor_split(x, cuts, dim=0))
    mean, std = _two_pass_reference(x, dim)
    scale = 1 + mean.abs().max().item()
    exact = ChannelStats(dim, exact=True)
    fast = ChannelStats(dim)
    for i in order:
        exact.update(batches[i])
        fast.update(batches[i])
    assert exact.count == fast.count == x.numel() // x.shape[dim]
    torch.testing.assert_close(exact.mean, mean, rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(exact.std, std, rtol=1e-9, atol=1e-12 * scale)
    bound = 1e-6 * (std + mean.abs())
    assert ((fast.mean - mean).abs() <= bound).all() and ((fast.std - std).abs() <= bound).all()


@pytest.mark.parametrize("shape,dim", [((6, 5, 40), 1), ((3, 4, 9, 9), 1), ((4, 7, 33), 2), ((2, 3, 5, 6), 3),
                                       ((5, 6, 3, 3), 1), ((4, 3, 8), 1)])
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (1e3, 1e-3), (-7.0, 50.0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_stats_on_long_rows_and_both_moment_kernels(shape, dim, offset, scale, channels_last):
    """Rows longer than SMALL_INNER take the two-pass sums, short ones the batch-norm kernel; both stay
    within float32 rounding of the float64 reference even when the mean dwarfs the spread."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * scale + offset
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    mean, std = _two_pass_reference(x, dim)
    fast = ChannelStats(dim)
    for part in torch.tensor_split(x, 2, dim=0):
        fast.update(part)
    bound = 1e-6 * (std + mean.abs())
    assert ((fast.mean - mean).abs() <= bound).all() and ((fast.std - std).abs() <= bound).all()


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
    return {"act": _two_pass_reference(conv_out, 1), "act2": _two_pass_reference(fc_out, 1)}


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


@given(st.integers(1, 6), st.integers(1, 40), st.randoms(use_true_random=False))
def test_zscore_histogram_counts_elements_inside_every_band(channels, per_channel, rng):
    """counts[k] = number of elements with |x - mean| < ZSCORE_GRID[k] * std, for every k; elements sit half
    a grid step from the band edges (away from rounding ties), beyond the grid, or exactly at a zero-std
    channel's mean (never inside: the band has width 0)."""
    from fxsparse.calibrate.stats import ZSCORE_GRID, ZScoreCounter

    op = fxsparse.MeanSparse(channels, dim=1)
    op.mean.copy_(torch.tensor([rng.uniform(-3, 3) for _ in range(channels)]))
    op.std.copy_(torch.tensor([rng.uniform(0.1, 5) for _ in range(channels)]))
    steps = torch.tensor([[rng.randint(0, 450) + 0.5 for _ in range(per_channel)] for _ in range(channels)])
    signs = torch.tensor([[rng.choice([-1.0, 1.0]) for _ in range(per_channel)] for _ in range(channels)])
    x = (op.mean[:, None] + signs * steps / 100 * op.std[:, None]).T.contiguous()  # (per_channel, channels)
    expected = (steps.flatten()[:, None] / 100 < ZSCORE_GRID[None, :]).sum(0).double()
    if channels > 1:  # the last channel: zero std, every element at its mean
        op.std[-1] = 0.0
        x[:, -1] = op.mean[-1]
        expected = (steps[:-1].flatten()[:, None] / 100 < ZSCORE_GRID[None, :]).sum(0).double()
    counter = ZScoreCounter(op)
    counter.update(x)
    assert counter.total == x.numel()
    torch.testing.assert_close(counter.counts, expected, rtol=0, atol=0)


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
