"""Property tests of the MeanSparse operator itself."""
import pytest
import torch
from hypothesis import given, strategies as st

from fxsparse import MeanSparse

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}


@st.composite
def cases(draw, dtypes=DTYPES):
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    dim = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    channels = shape[dim]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if ndim == 4 and draw(st.booleans()):
        x = x.to(memory_format=torch.channels_last)
    mean = torch.randn(channels, generator=gen) * 0.5
    std = torch.rand(channels, generator=gen) + 0.1
    alpha = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0, 3.0]))
    op = MeanSparse(channels, dim)
    op.mean.copy_(mean)
    op.std.copy_(std)
    op.alpha.fill_(alpha)
    op.count.fill_(1.0)
    return op, x


def _bits(t):
    return t.contiguous().view(BITS[t.dtype])


def _bands(op, x):
    """Elements clearly inside and clearly outside the band (float64 arithmetic, 10% margin)."""
    shape = [1] * x.dim()
    shape[op.dim] = -1
    mean = op.mean.double().view(shape)
    width = float(op.alpha) * op.std.double().view(shape)
    dist = (x.double() - mean).abs()
    return dist < 0.9 * width - 1e-2, dist > 1.1 * width + 1e-2


@given(cases())
def test_alpha_zero_is_identity_bit_for_bit(case):
    op, x = case
    op.alpha.zero_()
    flat = x.contiguous().clone().view(-1)
    flat[0] = float("nan")
    if flat.numel() > 2:
        flat[1] = -0.0
        flat[2] = float("inf")
    special = flat.view(x.shape)
    for inp in (x, special):
        y = op(inp)
        assert y.dtype == inp.dtype and y.shape == inp.shape
        assert torch.equal(_bits(y), _bits(inp))


@given(cases())
def test_outside_untouched_inside_replaced_by_channel_mean(case):
    op, x = case
    y = op(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    inside, outside = _bands(op, x)
    shape = [1] * x.dim()
    shape[op.dim] = -1
    mean = op.mean.to(x.dtype).view(shape).expand_as(x)
    assert torch.equal(_bits(y)[outside], _bits(x)[outside])
    assert torch.equal(y[inside], mean[inside])


@given(cases(dtypes=[torch.float32, torch.float64]))
def test_gradient_zero_inside_identity_outside(case):
    op, x = case
    x = x.detach().requires_grad_(True)
    op(x).sum().backward()
    inside, outside = _bands(op, x.detach())
    assert torch.all(x.grad[inside] == 0)
    assert torch.all(x.grad[outside] == 1)


@given(cases(dtypes=[torch.float32, torch.float64]))
def test_straight_through_gradient_is_identity_and_forward_unchanged(case):
    op, x = case
    expected = op(x)
    x = x.detach().requires_grad_(True)
    op.straight_through = True
    y = op(x)
    y.sum().backward()
    assert torch.equal(_bits(y.detach()), _bits(expected))
    assert torch.all(x.grad == 1)


@given(cases())
def test_inplace_writes_into_its_input(case):
    op, x = case
    expected = op(x)
    op.inplace = True
    x2 = x.clone()
    y = op(x2)
    assert y.data_ptr() == x2.data_ptr()
    assert torch.equal(_bits(y), _bits(expected))


def test_buffers_and_state_dict_names():
    op = MeanSparse(3, 1)
    assert set(op.state_dict()) == {"mean", "std", "alpha", "count"}
    assert op.alpha.dim() == 0 and op.channels == 3 and not op.calibrated


def test_module_dtype_cast_keeps_working():
    op = MeanSparse(4, 1)
    op.mean.copy_(torch.arange(4.0))
    op.alpha.fill_(1.0)
    op.count.fill_(1)
    op = op.half()
    x = torch.zeros(2, 4, 3, dtype=torch.float16)
    assert op(x).dtype == torch.float16


@given(cases(dtypes=[torch.float32, torch.bfloat16]))
def test_views_with_gaps_keep_their_strides(case):
    """A slice of a split has gaps; the operator's output keeps its strides, so a following activation runs on
    the same memory layout as in the original program (and rounds the same way)."""
    op, x = case
    wide = torch.cat([x, x, x], dim=-1)
    view = wide[..., : x.shape[-1]]
    y = op(view)
    strides = lambda t: [st for sz, st in zip(t.shape, t.stride()) if sz > 1]  # noqa: E731
    assert strides(y) == strides(view)
    assert torch.equal(y, op(view.contiguous()))


@pytest.mark.parametrize("shape,dim,channels_last", [((2, 8, 9, 7), 1, False), ((2, 8, 9, 7), 1, True),
                                                     ((3, 11, 16), 2, False), ((5, 12), 1, False),
                                                     ((1, 6, 5, 1), 1, False)])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_eager_kernel_equals_plain_ops(monkeypatch, shape, dim, channels_last, inplace):
    """In inference, inputs above FUSED_MIN_ELEMENTS take one compiled kernel in eager mode: the plain ops'
    bits and strides, in place too. With autograd on, the plain ops run (and give the gradients)."""
    import fxsparse.ops as ops

    torch.manual_seed(0)
    x = torch.randn(shape) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, std = torch.randn(shape[dim]), torch.rand(shape[dim]) + 0.1
    monkeypatch.setattr(ops, "FUSED_MIN_ELEMENTS", 0)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(ops, "FUSED_EAGER", fused)
        compiled_before = len(ops._fused_band.keys)
        xi = x.clone()
        y = ops.mean_sparse(xi, mean, std, torch.tensor(0.4), dim, inplace=inplace)
        assert (y is xi) == inplace
        results.append((y, y.stride()))
        if fused:  # the kernel for this (dtype, device, size-1 pattern, inplace) exists now
            assert ops.FUSED_EAGER and len(ops._fused_band.keys) >= compiled_before
            assert any(k[0] == x.dtype and k[-1] == inplace for k in ops._fused_band.keys)
        assert torch.equal(ops.mean_sparse(x.clone(), mean, std, torch.tensor(0.0), dim, inplace=inplace), x)
    (y1, s1), (y2, s2) = results
    assert torch.equal(y1, y2) and s1 == s2 == x.stride()


def test_fused_eager_kernel_is_skipped_under_autograd_and_low_precision(monkeypatch):
    import fxsparse.ops as ops

    monkeypatch.setattr(ops, "FUSED_MIN_ELEMENTS", 0)
    x = torch.randn(2, 3, 4)
    assert ops._use_fused(x)
    assert not ops._use_fused(x.clone().requires_grad_(True))
    with torch.no_grad():
        assert ops._use_fused(x.clone().requires_grad_(True))
    assert not ops._use_fused(x.to(torch.bfloat16)) and not ops._use_fused(x.to(torch.float16))
    assert not ops._use_fused(x.to("meta"))
    xg = x.clone().requires_grad_(True)
    y = ops.mean_sparse(xg, torch.zeros(4), torch.ones(4), torch.tensor(0.5), -1)
    y.sum().backward()
    assert torch.equal(xg.grad, (x.abs() >= 0.5).float())  # zero gradient inside the band


def test_fused_eager_kernels_never_hit_the_recompile_limit(monkeypatch):
    """One compiled kernel per (dtype, size-1 pattern, inplace), dynamic in the sizes: many shapes, ranks and
    layouts in one process keep using it (a shared kernel used to fall back after 8 recompiles)."""
    import fxsparse.ops as ops

    monkeypatch.setattr(ops, "FUSED_MIN_ELEMENTS", 0)
    before = set(ops._fused_band.keys)
    gen = torch.Generator().manual_seed(1)
    for i in range(24):
        shape = [(i % 3) + 1, 3 + i, (i % 5) + 2, (i % 4) + 1][: 2 + i % 3]
        x = torch.randn(shape, generator=gen)
        c = x.shape[1]
        mean, std = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.1
        y = ops.mean_sparse(x, mean, std, torch.tensor(0.3), 1)
        monkeypatch.setattr(ops, "FUSED_EAGER", False)
        assert torch.equal(y, ops.mean_sparse(x, mean, std, torch.tensor(0.3), 1))
        monkeypatch.setattr(ops, "FUSED_EAGER", True)
    assert ops.FUSED_EAGER  # no compile failure switched it off
    assert len(set(ops._fused_band.keys) - before) <= 8  # float32, not in place: at most 2^3 size-1 patterns
