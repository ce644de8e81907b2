"""The pass on real timm / torchvision architectures (random init, 64 x 64 inputs)."""
import pytest
import torch

import fxsparse
from fxsparse.testing.models import MODELS, build, count_activation_module_calls


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_sites_exact_and_calibrated(name):
    model, size = build(name)
    x = torch.randn(2, 3, size, size)
    gm = fxsparse.prepare(model, x)
    records = fxsparse.audit(gm)
    # one operator per activation call, counted at run time on the original model
    assert len(records) == count_activation_module_calls(model, x) > 0
    assert {(r.kind, r.dim) for r in records} == MODELS[name][2]
    assert len({r.site for r in records}) == len(records)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # alpha = 0: bit for bit
    data = [torch.randn(4, 3, size, size) for _ in range(2)]
    fxsparse.calibrate(gm, data)
    fxsparse.set_alpha(gm, 0.25)
    records = fxsparse.audit(gm)
    assert all(r.calibrated and r.std_min >= 0 and 0.0 < r.replaced < 1.0 for r in records)
    with torch.no_grad():
        out = gm(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()
    assert not torch.equal(out, model(x))
    fxsparse.set_alpha(gm, 0.0)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_efficientnet_activations_inside_batchnormact_are_covered():
    model, _ = build("efficientnet_b0")
    gm = fxsparse.prepare(model, torch.randn(2, 3, 64, 64))
    sites = {r.site for r in fxsparse.audit(gm)}
    assert "bn1.act" in sites and "blocks.1.0.bn1.act" in sites
    assert gm.get_submodule("bn1.act_meansparse").channels == 32
    assert "bn1.act_meansparse.mean" in gm.state_dict()


def test_resnet_reused_relu_gets_one_operator_per_call():
    model, _ = build("tv_resnet18")
    gm = fxsparse.prepare(model, torch.randn(2, 3, 64, 64))
    sites = [r.site for r in fxsparse.audit(gm)]
    assert sites[:3] == ["relu", "layer1.0.relu", "layer1.0.relu_1"]


def test_opaque_leaf_gets_operators_inside_on_fx_and_export_by_default():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs").eval()
    x = torch.randn(2, 3, 64, 64)
    gm = fxsparse.prepare(model, x, capture="fx")
    report = fxsparse.audit(gm).capture
    assert report["path"] == "fx" and "stages.2.1" in report["opaque_leaves"]
    assert len(fxsparse.audit(gm)) == count_activation_module_calls(model, x)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    auto = fxsparse.prepare(model, x)
    report = fxsparse.audit(auto).capture
    assert report["path"] == "export" and "opaque" in report["reasons"]["fx"]
    assert [r.site for r in fxsparse.audit(auto)] == [r.site for r in fxsparse.audit(gm)]


def test_meta_device_structure_only():
    import timm

    with torch.device("meta"):
        model = timm.create_model("convnext_tiny")
    gm = fxsparse.prepare(model)
    records = fxsparse.audit(gm)
    assert len(records) == 18 and {r.dim for r in records} == {3}
