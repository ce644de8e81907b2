"""Composite activations, the capture fallback chain, and the run-time coverage oracle."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.tools.coverage import check_coverage, record_activations, verify

C = 6


def hand_silu(x):
    return x * torch.sigmoid(x)


def hand_quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def hand_mish(x):
    return x * torch.tanh(F.softplus(x))


def hand_gelu_half_last(x):
    return x * (1.0 + torch.erf(x / math.sqrt(2.0))) * 0.5


def hand_gelu_half_first(x):
    return 0.5 * x * (1 + torch.erf(x * 0.7071067811865476))


def hand_silu_inplace(x):
    return x.mul_(x.sigmoid())


COMPOSITES = [(hand_silu, "silu"), (hand_quick_gelu, "quick_gelu"), (hand_mish, "mish"),
              (hand_gelu_half_last, "gelu"), (hand_gelu_half_first, "gelu"), (hand_silu_inplace, "silu")]


class Composite(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 1)

    def forward(self, x):
        y = self.conv1(x)
        skip = y.clone()
        return self.conv2(self.fn(y)) + skip


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("fn,kind", COMPOSITES, ids=[f.__name__ for f, _ in COMPOSITES])
def test_composite_activation_is_one_site_before_its_input(fn, kind, capture):
    torch.manual_seed(0)
    model = Composite(fn).eval()
    x = torch.randn(2, C, 5, 4)
    gm = fxsparse.prepare(model, x, capture=capture)
    records = fxsparse.audit(gm)
    assert [(r.kind, r.channels, r.dim) for r in records] == [(kind, C, 1)]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    report = check_coverage(model, gm, (x,))
    assert report.complete and report.sparsified_events == 1, report.summary()
    fxsparse.calibrate(gm, [torch.randn(4, C, 5, 4)])
    fxsparse.set_alpha(gm, 0.5)
    with torch.no_grad():
        y = model.conv1(x)
        op = fxsparse.meansparse_ops(gm)[records[0].site]
        expected = model.conv2(fn(op(y.clone()))) + y
        torch.testing.assert_close(gm(x), expected)


def test_gates_are_not_composites():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, C, 1)
            self.fc = nn.Conv2d(C, C, 1)

        def forward(self, x):
            x = self.conv(x)
            return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))

    model = SqueezeExcite().eval()
    gm = fxsparse.prepare(model, torch.randn(2, C, 4, 4))
    assert len(fxsparse.audit(gm)) == 0
    assert record_activations(model, (torch.randn(2, C, 4, 4),)) == []


class DataDependent(nn.Module):
    """FX cannot trace Python control flow on tensor shapes; torch.export (strict=False) can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] > 2:
            y = y * 2.0
        return self.act(y)


def test_fallback_to_export_is_automatic_and_reported():
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxsparse.prepare(model, x)
    audit = fxsparse.audit(gm)
    assert audit.capture["path"] == "export" and "fx" in audit.capture["reasons"]
    assert [(r.site, r.kind, r.channels) for r in audit] == [("act", "gelu", C)]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        assert gm(torch.randn(5, 3, 8, 8)).shape[0] == 5  # dynamic batch
    fxsparse.calibrate(gm, [torch.randn(3, 3, 8, 8), torch.randn(7, 3, 8, 8)])
    with pytest.raises(fxsparse.CaptureError, match="FX capture"):
        fxsparse.prepare(model, x, capture="fx")


def test_export_and_fx_agree_on_sites():
    from fxsparse.testing.models import build

    model, size = build("convnext_atto_nhwc")
    x = torch.randn(2, 3, size, size)
    a = [(r.site, r.kind, r.dim, r.channels) for r in fxsparse.audit(fxsparse.prepare(model, x, capture="fx"))]
    b = [(r.site, r.kind, r.dim, r.channels) for r in fxsparse.audit(fxsparse.prepare(model, x, capture="export"))]
    assert a == b and len(a) == 12


def test_no_capture_path_names_every_reason():
    class Hopeless(nn.Module):
        def forward(self, x):
            return torch.relu(torch.from_numpy(x.numpy().copy()))

    with pytest.raises(fxsparse.CaptureError) as info:
        fxsparse.prepare(Hopeless(), torch.randn(2, 3))
    assert "fx:" in str(info.value) and "export:" in str(info.value)
    with pytest.raises(fxsparse.CaptureError, match="capture method"):
        fxsparse.prepare(Hopeless(), torch.randn(2, 3), capture="magic")


def test_oracle_names_uncovered_activations():
    from fxsparse.testing.models import build

    model, size = build("tv_resnet18")
    x = torch.randn(2, 3, size, size)
    gm = fxsparse.prepare(model, x, select={"exclude": ["layer4.*"]})
    report = check_coverage(model, gm, (x,))
    assert report.original_events == report.sparsified_events == 17
    assert report.covered == 13 and not report.complete
    assert {e.module_path for e in report.uncovered} == {"layer4.0.relu", "layer4.1.relu"}
    assert "layer4" in report.summary()


def test_verify_reports_everything():
    from fxsparse.testing.models import build

    model, size = build("mixer_s16")
    result = verify(model, (torch.randn(2, 3, size, size),))
    assert result.ok and result.sites == 16 and result.capture == "fx"
