"""Property tests of the MeanSparse operator itself."""
import pytest
import torch
from hypothesis import given, strategies as st

from fxsparse import MeanSparse, ops
from fxsparse.compile import fused

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
    op.refresh_bounds()  # direct writes to the state refresh the bounds themselves
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
    op.refresh_bounds()
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
    op.refresh_bounds()
    op = op.half()
    assert op.mean.dtype == op.std.dtype == torch.float16 and op.count.dtype == torch.int64
    x = torch.tensor([0.3, 1.4, 1.6, 3.0], dtype=torch.float16).view(1, 4, 1).expand(2, 4, 3).contiguous()
    y = op(x)
    # means 0, 1, 2, 3 and std 1 at alpha 1: each value lies within one std of its channel's mean and becomes
    # that mean, in float16; a value outside every band stays
    assert y.dtype == torch.float16 and torch.equal(y[:, :, 0], torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2).half())
    far = torch.full((1, 4, 1), 10.0, dtype=torch.float16)
    assert torch.equal(op(far), far)


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


def test_default_eager_path_compiles_nothing_and_overwrites_only_in_place(monkeypatch):
    """Eager by default is plain public PyTorch: no torch.compile call, the input untouched unless the
    activation was in place, the result equal to the textbook formula bit for bit."""
    import fxsparse.ops as ops

    def no_compile(*args, **kwargs):
        raise AssertionError("the default eager path compiled something")

    monkeypatch.setattr(torch, "compile", no_compile)
    assert fused.eager_kernel() == "plain"
    torch.manual_seed(0)
    mean, std, alpha = torch.randn(8), torch.rand(8) + 0.1, torch.tensor(0.4)
    for x in (torch.randn(4, 8, 33, 35), torch.randn(4, 8, 33, 35).to(memory_format=torch.channels_last)):
        expected = ops._band(x, *(t.view(1, -1, 1, 1) for t in (mean, *ops.bounds(mean, std, alpha))))
        with torch.no_grad():
            before = x.clone()
            y = ops.mean_sparse(x, mean, std, alpha, 1)
            assert y is not x and torch.equal(x, before) and torch.equal(y, expected) and y.stride() == x.stride()
            y = ops.mean_sparse(x, mean, std, alpha, 1, inplace=True)
            assert y is x and torch.equal(x, expected)


def _kernel(monkeypatch, kind):
    """Switch the eager kernel for one test (monkeypatch restores both the name and the hook)."""
    monkeypatch.setattr(fused, "_eager_kernel", kind)
    monkeypatch.setattr(ops, "_eager_kernel_hook", fused._run_fused if kind == "fused" else None)


def _fused(monkeypatch):
    _kernel(monkeypatch, "fused")
    return ops


@pytest.mark.slow
@pytest.mark.parametrize("shape,dim,channels_last", [((2, 8, 9, 7), 1, False), ((2, 8, 9, 7), 1, True),
                                                     ((3, 11, 16), 2, False), ((5, 12), 1, False),
                                                     ((1, 6, 5, 1), 1, False)])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_eager_kernel_equals_plain_ops(monkeypatch, shape, dim, channels_last, inplace):
    """With set_eager_kernel("fused"), inference inputs above FUSED_MIN_ELEMENTS take one compiled kernel:
    the plain ops' bits and strides, in place too."""
    import fxsparse.ops as ops

    torch.manual_seed(0)
    x = torch.randn(shape) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, std = torch.randn(shape[dim]), torch.rand(shape[dim]) + 0.1
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", 0)
    results = []
    for kind in ("fused", "plain"):
        _kernel(monkeypatch, kind)
        xi = x.clone()
        y = ops.mean_sparse(xi, mean, std, torch.tensor(0.4), dim, inplace=inplace)
        assert (y is xi) == inplace
        results.append((y, y.stride()))
        if kind == "fused":  # the kernel for this (dtype, device, size-1 pattern, inplace) exists and works
            assert any(k[0] == x.dtype and k[-1] == inplace for k in fused._fused_band.keys)
            assert not fused._fused_failed
        assert torch.equal(ops.mean_sparse(x.clone(), mean, std, torch.tensor(0.0), dim, inplace=inplace), x)
    (y1, s1), (y2, s2) = results
    assert torch.equal(y1, y2) and s1 == s2 == x.stride()


@pytest.mark.slow
@given(st.data())
def test_fused_kernel_property_above_threshold(data):
    """Property: above the size threshold, contiguous or channels-last, any alpha (0 included, with NaN, -0.0
    and inf in the input), the fused kernel returns the plain ops' bits."""
    import fxsparse.ops as ops
    channels = data.draw(st.integers(1, 24))
    n = data.draw(st.integers(1, 3))
    h, w = data.draw(st.integers(2, 40)), data.draw(st.integers(2, 40))
    if n * channels * h * w < fused.FUSED_MIN_ELEMENTS:
        n = -(-fused.FUSED_MIN_ELEMENTS // (channels * h * w))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(n, channels, h, w, generator=gen) * 2).to(dtype)
    x.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=dtype)
    if data.draw(st.booleans()):
        x = x.to(memory_format=torch.channels_last)
    mean, std = torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.1
    alpha = torch.tensor(data.draw(st.sampled_from([0.0, 0.1, 0.5, 2.0])))
    inplace = data.draw(st.booleans())
    with torch.no_grad():
        try:
            fused.set_eager_kernel("fused")
            assert fused._use_fused(x)
            y = ops.mean_sparse(x.clone(), mean, std, alpha, 1, inplace=inplace)
        finally:
            fused.set_eager_kernel("plain")
        expected = ops.mean_sparse(x.clone(), mean, std, alpha, 1, inplace=inplace)
    assert not fused._fused_failed
    strides = lambda t: [st for sz, st in zip(t.shape, t.stride()) if sz > 1]  # noqa: E731 (size-1: any)
    assert torch.equal(_bits(y), _bits(expected)) and strides(y) == strides(x)
    if float(alpha) == 0:
        assert torch.equal(_bits(y), _bits(x))


def test_fused_kernel_failure_falls_back_per_pattern_with_a_warning(monkeypatch):
    """A kernel that fails is dropped for its pattern only, with a FusedKernelWarning; an in-place kernel fails
    first on a scratch copy (the input stays whole), and a failure on the input itself is an error, never a
    retry on a half-written tensor."""
    import fxsparse

    ops = _fused(monkeypatch)
    monkeypatch.setattr(fused, "_fused_failed", set())
    monkeypatch.setattr(fused, "_fused_proven", set())
    calls = []

    def broken(key):
        def kernel(x3, *state):
            calls.append(key)
            raise RuntimeError("no C++ compiler")
        return kernel

    monkeypatch.setattr(fused, "_fused_band", broken)
    mean, std, alpha = torch.zeros(4), torch.ones(4), torch.tensor(0.5)
    x = torch.randn(64, 4, 64)
    with torch.no_grad():
        for inplace in (False, True):
            xi = x.clone()
            with pytest.warns(fused.FusedKernelWarning, match="plain ops"):
                y = ops.mean_sparse(xi, mean, std, alpha, 1, inplace=inplace)
            assert torch.equal(y, torch.where(x.abs() < 0.5, 0.0, x)) and (y is xi) == inplace
            n = len(calls)
            ops.mean_sparse(x.clone(), mean, std, alpha, 1, inplace=inplace)  # dropped: not tried again
            assert len(calls) == n
        assert len(fused._fused_failed) == 2
        monkeypatch.setattr(fused, "_fused_failed", set())
        proven = (torch.float32, x.device, (False, False, False), True)
        fused._fused_proven.add(proven)
        with pytest.raises(fxsparse.FxsparseError, match="half-written"):
            ops.mean_sparse(x.clone(), mean, std, alpha, 1, inplace=True)
    with pytest.raises(fxsparse.SelectionError, match="unknown eager kernel"):
        fxsparse.set_eager_kernel("fastest")


def test_fused_eager_kernel_is_skipped_under_autograd_and_low_precision(monkeypatch):
    ops = _fused(monkeypatch)
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", 0)
    x = torch.randn(2, 3, 4)
    assert fused._use_fused(x)
    assert not fused._use_fused(x.clone().requires_grad_(True))
    with torch.no_grad():
        assert fused._use_fused(x.clone().requires_grad_(True))
    assert not fused._use_fused(x.to(torch.bfloat16)) and not fused._use_fused(x.to(torch.float16))
    assert not fused._use_fused(x.to("meta"))
    xg = x.clone().requires_grad_(True)
    y = ops.mean_sparse(xg, torch.zeros(4), torch.ones(4), torch.tensor(0.5), -1)
    y.sum().backward()
    assert torch.equal(xg.grad, (x.abs() >= 0.5).float())  # zero gradient inside the band


@pytest.mark.slow
def test_fused_eager_kernels_never_hit_the_recompile_limit(monkeypatch):
    """One compiled kernel per (dtype, size-1 pattern, inplace), dynamic in the sizes: many shapes, ranks and
    layouts in one process keep using it (a shared kernel used to fall back after 8 recompiles)."""
    ops = _fused(monkeypatch)
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", 0)
    before = set(fused._fused_band.keys)
    gen = torch.Generator().manual_seed(1)
    for i in range(24):
        shape = [(i % 3) + 1, 3 + i, (i % 5) + 2, (i % 4) + 1][: 2 + i % 3]
        x = torch.randn(shape, generator=gen)
        c = x.shape[1]
        mean, std = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.1
        y = ops.mean_sparse(x, mean, std, torch.tensor(0.3), 1)
        _kernel(monkeypatch, "plain")
        assert torch.equal(y, ops.mean_sparse(x, mean, std, torch.tensor(0.3), 1))
        _kernel(monkeypatch, "fused")
    assert not fused._fused_failed  # no compile failure dropped a kernel
    assert len(set(fused._fused_band.keys) - before) <= 8  # float32, not in place: at most 2^3 size-1 patterns


def _calibrated_op(channels=4, dim=1, alpha=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    op = MeanSparse(channels, dim)
    op.mean.copy_(torch.randn(channels, generator=gen))
    op.std.copy_(torch.rand(channels, generator=gen) + 0.1)
    op.alpha.fill_(alpha)
    op.count.fill_(1)
    return op.refresh_bounds()


def test_bounds_are_mean_minus_plus_alpha_std_and_not_saved():
    op = _calibrated_op()
    assert torch.equal(op.lo, op.mean - op.alpha * op.std) and torch.equal(op.hi, op.mean + op.alpha * op.std)
    assert set(op.state_dict()) == {"mean", "std", "alpha", "count"}  # derived, so files keep their keys
    lo = op.lo
    op.alpha.fill_(0.25)
    op.refresh_bounds()
    assert op.lo is lo and torch.equal(op.lo, op.mean - 0.25 * op.std)  # in place: compiled code sees it


def test_alpha_zero_never_replaces_a_value_equal_to_the_mean():
    """lo = hi = mean at alpha 0 and both comparisons are strict: x == mean is kept with its own bits (a
    mean of 0.0 does not turn an input -0.0 into +0.0), as are NaN and infinities."""
    op = MeanSparse(3, 1)
    op.mean.copy_(torch.tensor([0.0, 1.5, -2.0]))
    op.refresh_bounds()
    x = torch.tensor([[-0.0, 1.5, -2.0], [0.0, float("nan"), float("inf")]]).view(2, 3, 1)
    for t in (x, x.double(), x.half(), x.bfloat16()):
        assert torch.equal(_bits(op(t)), _bits(t))
    with torch.no_grad():
        assert torch.equal(_bits(op(x.clone())), _bits(x))


def test_bounds_follow_set_alpha_calibration_load_and_cast():
    """Every writer of mean, std or alpha refreshes lo / hi: set_alpha, calibrate, load_state_dict (into a
    fresh operator or a whole model), and `.to()` moves and casts them with the state."""
    import fxsparse

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    gm = fxsparse.prepare(model, (data[0],))
    fxsparse.calibrate(gm, data, progress=False)
    (op,) = fxsparse.meansparse_ops(gm).values()
    assert torch.equal(op.lo, op.mean) and torch.equal(op.hi, op.mean)  # calibrated, alpha still 0
    fxsparse.set_alpha(gm, 0.5)
    assert torch.equal(op.hi, op.mean + 0.5 * op.std)
    fresh = fxsparse.prepare(model, (data[0],))
    fresh.load_state_dict(gm.state_dict())
    (loaded,) = fxsparse.meansparse_ops(fresh).values()
    assert torch.equal(loaded.lo, op.lo) and torch.equal(loaded.hi, op.hi)
    assert torch.equal(fresh(data[1]), gm(data[1]))
    gm.double()  # in place: the bounds follow the buffers they derive from
    assert op.lo.dtype == op.hi.dtype == torch.float64 and torch.equal(op.hi, op.mean + op.alpha * op.std)


@given(cases(dtypes=[torch.float32, torch.float64]))
def test_bounds_formulation_equals_the_distance_formulation_off_the_edges(case):
    """`lo < x < hi` and `|x - mean| < alpha * std` differ only by rounding at the band's edges: elements
    clearly inside or outside are treated alike."""
    op, x = case
    y = op(x)
    shape = [1] * x.dim()
    shape[op.dim] = -1
    mean = op.mean.to(x.dtype).view(shape)
    reference = torch.where((x - mean).abs() < (op.alpha * op.std).to(x.dtype).view(shape), mean, x)
    inside, outside = _bands(op, x)
    assert torch.equal(y[inside | outside], reference[inside | outside])


def test_pickled_operator_round_trips_with_its_bounds():
    """Pickles from before the bounds existed are not read (pre-1.0); a pickle now carries lo / hi."""
    import pickle

    op = _calibrated_op()
    copy = pickle.loads(pickle.dumps(op))
    x = torch.randn(2, 4, 3)
    assert torch.equal(copy.lo, op.lo) and torch.equal(copy.hi, op.hi) and torch.equal(copy(x), op(x))


def test_stale_bounds_are_caught_while_the_check_is_on():
    """A write to `op.mean` without `refresh_bounds()` leaves lo / hi stale; with the check on (the suite
    runs with FXSPARSE_CHECK_BOUNDS=1, tests/conftest.py) the next eager call says so and names the fix."""
    from fxsparse import config
    from fxsparse.errors import FxsparseError

    op = _calibrated_op()
    x = torch.randn(2, 4, 3)
    try:
        config.set_check_bounds(True)
        op(x)
        op.mean.add_(1.0)
        with pytest.raises(FxsparseError, match="refresh_bounds"):
            op(x)
        op.refresh_bounds()
        op(x)
        op.std.mul_(2.0)
        with torch.no_grad(), pytest.raises(FxsparseError, match="stale"):
            op(x)
        config.set_check_bounds(False)
        op(x)  # off: not checked (the caller's own responsibility)
    finally:
        config.set_check_bounds(None)


def test_the_bounds_check_stays_out_of_compiled_graphs():
    from fxsparse import config

    op = _calibrated_op()
    x = torch.randn(2, 4, 3)
    try:
        config.set_check_bounds(True)
        compiled = torch.compile(op, backend="eager", fullgraph=True)  # a graph break would raise
        assert torch.equal(compiled(x), op(x))
    finally:
        config.set_check_bounds(None)


@pytest.mark.parametrize("mode", [False, True, "smooth"])
def test_gradients_through_an_in_place_site_on_a_view(mode):
    """An in-place site whose input is a view (a channel slice, as in torchvision's RAFT and the README's
    two-input recipe): the exact gradient (kept elements get the incoming gradient, replaced ones 0) and the
    surrogates work, and the result equals the out-of-place operator's."""
    op = _calibrated_op()
    op.inplace = True
    op.straight_through = mode if mode != "smooth" else "smooth"
    if mode == "smooth":
        op.tau = torch.tensor(0.1)
    leaf = torch.randn(2, 4, 6, requires_grad=True)
    y = op(leaf * 1.0)[..., 1:4]  # a fresh tensor, then a view of it
    z = op(leaf.clone()[..., :3])  # the op's input is itself a view (written in place)
    (y.sum() + z.sum()).backward()
    reference = _calibrated_op()
    reference.straight_through = op.straight_through
    if mode == "smooth":
        reference.tau = torch.tensor(0.1)
    x = leaf.detach()[..., :3].clone().requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(z, reference(x))
    if mode is False:
        reference(x).sum().backward()
        inside = (x > reference.lo[:, None]) & (x < reference.hi[:, None])
        torch.testing.assert_close(x.grad, (~inside).float())
