"""The capture fallback chain (fxsparse/capture/): FX first, torch.export when FX cannot, every reason named."""
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse._meta import CAPTURE_META

C = 6


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


def test_capture_keyword_and_the_check_each_candidate_passes():
    """`capture=` names the path in fxsparse.capture as in prepare; `check` (prepare's propagate-shapes step)
    runs on every candidate graph, and one it refuses sends capture to the next path, with the reason kept."""
    model, x = nn.Sequential(nn.Conv2d(3, C, 3), nn.ReLU()).eval(), torch.randn(2, 3, 8, 8)
    assert fxsparse.capture(model, x, capture="fx").meta[CAPTURE_META].path == "fx"
    seen = []

    def refuse_fx(gm):
        seen.append(gm.meta[CAPTURE_META].path)
        if gm.meta[CAPTURE_META].path == "fx":
            raise RuntimeError("shapes do not propagate")

    gm = fxsparse.capture(model, x, capture="auto", check=refuse_fx)
    assert seen == ["fx", "export"] and gm.meta[CAPTURE_META].path == "export"
    assert "shapes do not propagate" in gm.meta[CAPTURE_META].reasons["fx"]
    with pytest.raises(fxsparse.CaptureError, match="capture method"):
        fxsparse.capture(model, x, capture="magic")
