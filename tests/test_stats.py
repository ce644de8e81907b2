"""The one statistics formula (fxsparse/calibrate/stats.py): exact pooled moments for any batching and order, and
the z-score histogram behind the replaced fractions."""
import pytest
import torch
from hypothesis import given, strategies as st

import fxsparse
from fxsparse.calibrate.stats import ChannelStats
from fxsparse.testing.data import two_pass_moments


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
    """float64=True: float64 throughout, equal to the two-pass reference to float64 rounding. Default: per-row
    moments in the input dtype (each the exact value rounded once to float32), merged in float64."""
    x, dim, cuts, order = case
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    batches = list(torch.tensor_split(x, cuts, dim=0))
    mean, std = two_pass_moments(x, dim)
    scale = 1 + mean.abs().max().item()
    exact = ChannelStats(dim, float64=True)
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
    mean, std = two_pass_moments(x, dim)
    fast = ChannelStats(dim)
    for part in torch.tensor_split(x, 2, dim=0):
        fast.update(part)
    bound = 1e-6 * (std + mean.abs())
    assert ((fast.mean - mean).abs() <= bound).all() and ((fast.std - std).abs() <= bound).all()


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
