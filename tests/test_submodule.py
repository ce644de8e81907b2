"""Real architectures that no graph holds whole, or that take several inputs: torchvision detectors,
segmenters and RAFT, and a Hugging Face classifier (random init, small inputs)."""
import pytest
import torch

import fxsparse
from fxsparse.errors import FxsparseError

pytestmark = pytest.mark.slow


def _equal(a, b):
    """Outputs equal bit for bit, through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def test_fasterrcnn_backbone_sparsified_inside_the_detector(tmp_path):
    from torchvision.models import detection

    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                           box_score_thresh=0.0).eval()
    imgs = [torch.rand(3, 160, 160) for _ in range(3)]
    data = [([img], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]) for img in imgs]
    det = fxsparse.sparsify(model, data, alpha=0.0, submodule="backbone")
    assert type(det) is type(model) and isinstance(det.backbone, torch.fx.GraphModule)
    with torch.no_grad():
        want, got = model(imgs[:2]), det(imgs[:2])
    assert len(want[0]["boxes"]) > 0 and _equal(want, got)  # alpha 0: the detector's own detections
    records = fxsparse.audit(det)
    assert len(records) > 20 and all(r.site.startswith("backbone.body.") for r in records)
    fxsparse.set_alpha(det, 0.3)
    fxsparse.save(det, tmp_path / "det.fxs")
    loaded = fxsparse.load(model, tmp_path / "det.fxs")
    with torch.no_grad():
        assert _equal(det(imgs[:1]), loaded(imgs[:1]))


def test_deeplabv3_whole_and_backbone():
    from torchvision.models import segmentation

    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    whole = fxsparse.sparsify(model, [x], alpha=0.0)
    part = fxsparse.sparsify(model, None, example_inputs=x, forward_loop=lambda m: m(x), alpha=0.0,
                             submodule="backbone")
    with torch.no_grad():
        want = model(x)
        assert _equal(want, whole(x)) and _equal(want, part(x))
        other = torch.rand(1, 3, 80, 96)  # another size: the FX graph takes any
        assert _equal(model(other), whole(other)) and _equal(model(other), part(other))
    assert len(fxsparse.audit(part)) < len(fxsparse.audit(whole))


def test_raft_small_two_images_through_forward_loop():
    from torchvision.models.optical_flow import raft_small

    model = raft_small(weights=None).eval()
    pairs = [(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)) for _ in range(2)]

    def loop(m):
        for a, b in pairs:
            m(a, b, num_flow_updates=2)

    flow = fxsparse.sparsify(model, None, forward_loop=loop, alpha=0.0, submodule="feature_encoder")
    with torch.no_grad():
        assert _equal(model(*pairs[0], num_flow_updates=2), flow(*pairs[0], num_flow_updates=2))
    assert all(r.calibrated for r in fxsparse.audit(flow))


def test_hugging_face_resnet_sizes_and_keywords():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = transformers.ResNetForImageClassification(config).eval()
    x = torch.rand(2, 3, 64, 64)
    gm = fxsparse.sparsify(model, [{"pixel_values": x, "labels": torch.tensor([0, 1])}], alpha=0.0)
    bigger = torch.rand(2, 3, 96, 80)
    with torch.no_grad():
        assert torch.equal(gm(bigger).logits, model(bigger).logits)  # height and width are dynamic
    with pytest.raises(FxsparseError, match="labels"):
        gm(x, labels=torch.tensor([0, 1]))
    with_labels = fxsparse.prepare(model, {"pixel_values": x, "labels": torch.tensor([0, 1])})
    with pytest.raises(FxsparseError, match="labels"):
        with_labels(x)
    out = with_labels(pixel_values=x, labels=torch.tensor([0, 2]))
    assert torch.equal(out.loss, model(x, labels=torch.tensor([0, 2])).loss)
