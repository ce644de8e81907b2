"""Compile-pipeline integration: compile modes, the fxsparse torch.compile backend, torch.export + .pt2,
and Inductor fusing the operator into its neighbours' kernels."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.compile.backend import module_path


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


class Branchy(nn.Module):
    """No capture path handles it whole: Python control flow on a tensor value. Dynamo breaks the graph."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.act1(self.conv1(x))
        if y.mean() > 0:
            y = y * 2
        y = F.gelu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def test_module_paths_from_dynamo_sources():
    assert module_path("L['self'].layer1[0].relu") == "layer1.0.relu"
    assert module_path("L['self']._modules['features']._modules['3']") == "features.3"
    assert module_path("getattr(L['self'].blocks, '0').mlp.act") == "blocks.0.mlp.act"
    assert module_path("L['self']") == ""


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_compile_modes_no_graph_breaks_and_equal_to_eager(mode):
    model = convnet().double()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    gm = fxsparse.sparsify(model, [x], alpha=0.3)
    torch._dynamo.reset()
    assert torch._dynamo.explain(gm)(x).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(gm, mode=mode)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-9, atol=1e-9)


class Counting:
    """An inner compiler that counts compilations and runs the graph eagerly."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return gm.forward


def _reference(model, stats, alpha, x):
    """Branchy with MeanSparse applied by hand, from the statistics."""
    def ms(t, site):
        m, s = stats[site]["mean"].double().view(1, -1, 1, 1), stats[site]["std"].double().view(1, -1, 1, 1)
        return torch.where((t - m).abs() < alpha * s, m, t)

    y = torch.relu(ms(model.conv1(x), "act1"))
    if y.mean() > 0:
        y = y * 2
    y = F.gelu(ms(model.conv2(y), "gelu"))
    return model.fc(y.mean((2, 3)))


def _calibrating_backend(model, data, **kwargs):
    """An fxsparse backend in calibration mode after `torch.compile(model)` ran `data` through it (no autograd,
    static shapes: each new shape compiles again); returns it and the outputs."""
    calib = fxsparse.backend(**kwargs)
    torch._dynamo.reset()
    seen = torch.compile(model, backend=calib, dynamic=False)
    with torch.no_grad():
        outs = [seen(x) for x in data]
    return calib, outs


def test_backend_calibrates_and_sparsifies_a_model_no_capture_path_handles():
    torch.manual_seed(0)
    model = Branchy().eval().double()
    data = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(fxsparse.CaptureError):
        fxsparse.prepare(model, data[0])
    calib, outs = _calibrating_backend(model, data)
    for x, out in zip(data, outs):  # calibration does not change outputs
        torch.testing.assert_close(out, model(x))
    stats = calib.statistics()
    assert set(stats) == {"act1", "gelu"}
    conv1 = torch.cat([model.conv1(x) for x in data]).detach()
    torch.testing.assert_close(stats["act1"]["mean"].double(), conv1.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)

    counter = Counting()
    be = fxsparse.backend(stats, alpha=0.3, compiler=counter)
    torch._dynamo.reset()
    fast = torch.compile(model, backend=be)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), _reference(model, stats, 0.3, x.clone()), rtol=1e-9, atol=1e-9)
        compiled_graphs = counter.calls
        be.set_alpha(0.0)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-12, atol=1e-12)
        be.set_alpha(0.6)
        torch.testing.assert_close(fast(x), _reference(model, stats, 0.6, x.clone()), rtol=1e-9, atol=1e-9)
    assert counter.calls == compiled_graphs >= 2  # graph breaks: several graphs, none recompiled for alpha


def test_fxsparse_set_alpha_takes_the_backend_validates_and_resolves_globs():
    """One set_alpha (fxsparse/operators.py) for prepared models and the backend: per-site globs, checked
    values and names, and the alpha kept for graphs compiled later."""
    torch.manual_seed(0)
    model = Branchy().eval().double()
    data = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    calib, _ = _calibrating_backend(model, data)
    stats = calib.statistics()
    with pytest.raises(fxsparse.CalibrationError, match="calibrating"):
        fxsparse.set_alpha(calib, 0.2)
    be = fxsparse.backend(stats, alpha=0.0)
    torch._dynamo.reset()
    fast = torch.compile(model, backend=be)
    x = data[0]
    with torch.no_grad():
        fast(x)
        fxsparse.set_alpha(be, {"act*": 0.6})  # a glob: the backend's own set_alpha matched exact names only
        untouched = {"mean": stats["gelu"]["mean"], "std": torch.zeros_like(stats["gelu"]["std"])}  # alpha 0
        expected = _reference(model, {"act1": stats["act1"], "gelu": untouched}, 0.6, x.clone())
        torch.testing.assert_close(fast(x), expected, rtol=1e-9, atol=1e-9)
        assert {site: float(op.alpha) for site, ops in be.operator_groups().items() for op in ops} == {
            "act1": 0.6, "gelu": 0.0}
    with pytest.raises(fxsparse.SelectionError, match=">= 0"):
        fxsparse.set_alpha(be, -1.0)
    assert be.alpha == {"act*": 0.6}  # what later graphs get


class TwiceAcrossABreak(nn.Module):
    """One activation module called twice, with a graph break between the calls and different inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.conv1(x))
        torch._dynamo.graph_break()
        return self.act(self.conv2(y) + 3.0)


def test_backend_names_calls_across_graph_breaks_like_one_graph():
    """Each Dynamo graph names its sites afresh; the backend keeps the second call apart ("act_1", as the
    whole-graph capture names it) instead of pooling both calls' statistics, and finds the names again when
    Dynamo recompiles."""
    torch.manual_seed(0)
    model = TwiceAcrossABreak().eval().double()
    # the last batch has another shape: Dynamo compiles both graphs again
    data = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(3)] + [torch.randn(2, 3, 6, 6).double()]
    stats = _calibrating_backend(model, data)[0].statistics()
    gm = fxsparse.sparsify(model, data, alpha=0.3)
    whole = fxsparse.statistics(gm)
    assert set(stats) == set(whole) == {"act", "act_1"}
    for site in whole:
        torch.testing.assert_close(stats[site]["mean"].double(), whole[site]["mean"].double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[site]["std"].double(), whole[site]["std"].double(), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    fast = torch.compile(model, backend=fxsparse.backend(whole, alpha=0.3, compiler=Counting()))
    with torch.no_grad():
        torch.testing.assert_close(fast(data[0]), gm(data[0]), rtol=1e-9, atol=1e-9)


class SkipsACall(TwiceAcrossABreak):
    """The first of two calls of one module depends on the batch size: Dynamo recompiles without it."""

    def forward(self, x):
        y = self.conv1(x)
        if x.shape[0] > 2:
            y = self.act(y)
        return self.act(self.conv2(y) + 3.0)


def test_backend_keeps_names_when_a_recompile_drops_a_call_and_selects_final_names():
    torch.manual_seed(0)
    model = SkipsACall().eval().double()
    data = [torch.randn(4, 3, 6, 6).double(), torch.randn(2, 3, 6, 6).double(), torch.randn(4, 3, 6, 6).double()]
    stats = _calibrating_backend(model, data)[0].statistics()
    assert set(stats) == {"act", "act_1"}  # the batch of 2 has one call, still named act_1
    with torch.no_grad():
        first = torch.cat([model.conv1(x) for x in data if x.shape[0] > 2])
        second = torch.cat([model.conv2(torch.relu(model.conv1(x)) if x.shape[0] > 2 else model.conv1(x)) + 3.0
                            for x in data])
    torch.testing.assert_close(stats["act"]["mean"].double(), first.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["act_1"]["mean"].double(), second.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    only, _ = _calibrating_backend(model, data[:1], select={"include": ["act_1"]})
    assert set(only.statistics()) == {"act_1"}


@pytest.mark.slow
def test_backend_with_statistics_of_a_sparsified_graphmodule_and_inductor():
    model = convnet().double()
    data = [torch.randn(4, 3, 12, 12, dtype=torch.float64) for _ in range(2)]
    gm = fxsparse.sparsify(model, data, alpha=0.25)
    be = fxsparse.backend(fxsparse.statistics(gm), alpha=0.25)
    torch._dynamo.reset()
    fast = torch.compile(model, backend=be)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), gm(x), rtol=1e-9, atol=1e-9)


def test_backend_refuses_missing_or_mismatched_statistics():
    model = convnet()
    x = torch.randn(2, 3, 12, 12)
    torch._dynamo.reset()
    with pytest.raises(fxsparse.SelectionError, match="no statistics for site"):
        torch.compile(model, backend=fxsparse.backend({}, alpha=0.2, compiler=Counting()))(x)
    bad = {"2": {"mean": torch.zeros(3), "std": torch.ones(3)}, "5": {"mean": torch.zeros(16), "std": torch.ones(16)}}
    torch._dynamo.reset()
    with pytest.raises(fxsparse.SelectionError, match="3 channels"):
        torch.compile(model, backend=fxsparse.backend(bad, alpha=0.2, compiler=Counting()))(x)


def test_export_and_reload_pt2(tmp_path):
    model = convnet()
    x = torch.randn(4, 3, 12, 12)
    gm = fxsparse.sparsify(model, [torch.randn(8, 3, 12, 12)], alpha=0.3)
    program = torch.export.export(gm, (x,), strict=False)  # the default from torch 2.7 on; strict fails on 2.5-2.6
    path = tmp_path / "sparsified.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
        assert not torch.equal(loaded(x), model(x))


@pytest.mark.slow
def test_inductor_fuses_the_operator_into_existing_kernels():
    from torch._inductor.utils import run_and_get_code

    model = convnet()
    x = torch.randn(4, 3, 12, 12)
    gm = fxsparse.sparsify(model, [x], alpha=0.2)

    def kernels(m):
        torch._dynamo.reset()
        with torch.no_grad():
            _, code = run_and_get_code(torch.compile(m), x)
        return re.findall(r"(cpp_fused_\w+|triton_\w+) = async_compile", "\n".join(code))

    plain, sparse = kernels(model), kernels(gm)
    assert len(sparse) == len(plain)  # no extra pass over memory
    assert sum("where" in k for k in sparse) == 2  # both operators fused, each into an existing kernel
