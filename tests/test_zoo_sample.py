"""A fixed sample of the model zoo, one model per timm family with a distinct structure, each checked with the
run-time coverage oracle: every activation the model executes is fed by a MeanSparse, alpha = 0 is exact,
and a calibrated alpha = 0.2 stays finite. The full zoo is benchmarks/census.py; its results are in
benchmarks/RESULTS.md.

Included on purpose: timm's leaf modules that hide activations (BatchNormAct2d: efficientnet; NormFreeBlock:
nfnet; MobileVitBlock; TinyVitBlock; LiteMLA: efficientvit_b0; vgg's ConvMlp) and models FX cannot trace
(gemma4_vit, maxvit, mvitv2, hiera, mobilenetv5, naflexvit, nfnet, vgg).
"""
import pytest
import timm
import torch

from fxsparse.tools.coverage import verify

# (timm name, input side, extra create_model kwargs); sides below the configured one where the model allows it
SAMPLE = [
    ("test_resnet", 160, {}), ("test_efficientnet", 160, {}), ("test_convnext", 160, {}), ("test_vit", 160, {}),
    ("test_nfnet", 160, {}), ("test_byobnet", 160, {}), ("test_mambaout", 160, {}), ("test_coatnet", 160, {}),
    ("test_vit_relpos", 160, {}), ("starnet_s050", 96, {}), ("dla46x_c", 96, {}), ("mobilevit_xxs", 96, {}),
    ("edgenext_xx_small", 96, {}), ("mobilenetv3_small_050", 96, {}), ("ese_vovnet19b_slim_dw", 96, {}),
    ("repghostnet_050", 96, {}), ("efficientvit_m0", 224, {}), ("ghostnet_050", 96, {}), ("regnetx_002", 96, {}),
    ("cspnext_tiny", 96, {}), ("iformer_t", 224, {}), ("xcit_nano_12_p16_224", 96, {}),
    ("cs3darknet_focus_s", 96, {}), ("efficientvit_b0", 96, {}), ("swiftformer_xs", 224, {}),
    ("efficientformerv2_s0", 224, {}), ("pvt_v2_b0", 96, {}), ("fasternet_t0", 96, {}), ("fastvit_t8", 96, {}),
    ("lcnetv2_small", 96, {}), ("inception_next_atto", 96, {}), ("rexnet_100", 96, {}), ("pit_ti_224", 224, {}),
    ("hardcorenas_b", 96, {}), ("repvit_m1", 96, {}), ("coat_tiny", 224, {}), ("convit_tiny", 224, {}),
    ("gmlp_ti16_224", 224, {}), ("hgnetv2_b0", 96, {}), ("shvit_s1", 224, {}), ("vit_tiny_r_s16_p8_224", 224, {}),
    ("cpubone_nano", 96, {}), ("efficientvim_m1", 224, {}), ("crossvit_tiny_240", 240, {}), ("levit_128s", 224, {}),
    ("tiny_vit_5m_224", 224, {}), ("vgg11", 64, {}), ("maxvit_nano_rw_256", 256, {}), ("mvitv2_tiny", 224, {}),
    ("hiera_tiny_224", 224, {}), ("mobilenetv5_base", 256, {}), ("naflexvit_base_patch16_gap", 128, {}),
    ("gemma4_vit_167m", 128, {}), ("swin_tiny_patch4_window7_224", 224, {}), ("nest_tiny", 224, {}),
    ("davit_tiny", 224, {}), ("nfnet_l0", 96, {}), ("densenet121", 64, {}), ("inception_v3", 299, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,kwargs", SAMPLE, ids=[s[0] for s in SAMPLE])
def test_zoo_sample_full_coverage(name, size, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    result = verify(model, (torch.randn(2, 3, size, size),))
    assert result.report.complete, result.report.summary()
    assert result.exact, "alpha = 0 output differs from the original"
    assert result.finite_after_alpha and result.sites > 0


def test_inputs_the_model_refuses_are_named_as_such():
    import fxsparse

    model = timm.create_model("test_coatnet", pretrained=False).eval()  # fixed attention windows: 160 only
    with pytest.raises(fxsparse.CaptureError, match="itself fails on example inputs"):
        fxsparse.prepare(model, torch.randn(2, 3, 96, 96))


def test_sample_covers_the_families_it_promises():
    names = {s[0] for s in SAMPLE}
    assert len(SAMPLE) >= 40
    families = {timm.models.model_entrypoint(n).__module__.rsplit(".", 1)[-1] for n in names}
    assert len(families) >= 40
    for required in ("efficientnet", "nfnet", "mobilevit", "tiny_vit", "efficientvit_mit", "vgg", "gemma4_vit",
                     "maxxvit", "mvitv2", "hiera", "mobilenetv5", "naflexvit"):
        assert required in families, required
