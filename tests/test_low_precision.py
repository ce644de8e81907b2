"""float16 and bfloat16 models: statistics accumulated in float64, the operator run in the model's dtype."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fxsparse
from fxsparse.testing.bad_inputs import Small
from fxsparse.calibrate.stats import ChannelStats

LOW = [torch.float16, torch.bfloat16]


class FullSizeDtypes(TorchDispatchMode):
    """Dtypes of every floating op output as large as the activation (per-channel vectors do not count)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.dtypes = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() == self.numel:
            self.dtypes.add(out.dtype)
        return out


def _data(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(64, 3, 16, 16, generator=gen).to(dtype) for _ in range(5)]


@pytest.mark.parametrize("cast_after_prepare", [False, True], ids=["low-precision-model", "cast-after-prepare"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_model_calibrates_in_float64_and_runs_in_its_dtype(dtype, cast_after_prepare):
    torch.manual_seed(0)
    model = Small().eval()
    data = _data(dtype)
    if cast_after_prepare:
        gm = fxsparse.prepare(model, data[0].float()).to(dtype)
        model = model.to(dtype)
    else:
        model = model.to(dtype)
        gm = fxsparse.prepare(model, data[0])
    fxsparse.calibrate(gm, data)
    op = fxsparse.meansparse_ops(gm)["act"]
    with torch.no_grad():
        site_input = torch.cat([model.conv(x) for x in data]).double()  # what the site saw, in float64
    mean = site_input.mean((0, 2, 3))
    std = site_input.var((0, 2, 3), correction=0).sqrt()
    # accumulated in float64, rounded once to the buffers' dtype (the model's, or float32 when spliced into a
    # low-precision model)
    assert torch.equal(op.mean, mean.to(op.mean.dtype)) and torch.equal(op.std, std.to(op.std.dtype))
    assert op.count.dtype == torch.int64 and int(op.count) == 5 * 64 * 16 * 16  # > 65504: float16 would overflow

    x = data[0][:4]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # alpha = 0: bit for bit
        fxsparse.set_alpha(gm, 0.5)
        out = gm(x)
        conv_out = model.conv(x)
        with FullSizeDtypes(conv_out.numel()) as mode:
            y = op(conv_out)
    assert out.dtype == y.dtype == dtype and torch.isfinite(out).all()
    assert mode.dtypes == {dtype}  # no float32 / float64 copy of the activation
    assert not torch.equal(y, conv_out)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_moments_of_low_precision_values_are_float64_exact(dtype):
    # 2**17 values near 1000 with spread 1: in float16 their sum overflows, so the moments must not be taken in
    # the values' own dtype; in float64 they match a two-pass reference over the very same values
    x = (1000 + torch.randn(2 ** 17, 1, generator=torch.Generator().manual_seed(1))).to(dtype)
    stats = ChannelStats(dim=1)
    for chunk in x.split(1000):
        stats.update(chunk)
    ref = x.double()
    torch.testing.assert_close(stats.mean, ref.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.std, ref.std(0, correction=0), rtol=1e-9, atol=0)
