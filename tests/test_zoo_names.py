"""Model names on the command line: never a download, one line for an unknown name."""
import pytest
import torch

from fxsparse.errors import FxsparseError
from fxsparse.tools import cli, zoo


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fxsparse tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    try:
        import torchvision.models._api as api

        monkeypatch.setattr(api.WeightsEnum, "get_state_dict", refuse)
    except (ImportError, AttributeError):
        pass


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
                                  "lraspp_mobilenet_v3_large"])
def test_torchvision_families_build_without_backbone_weights(name, no_network):
    model, note = zoo.load_model(name, pretrained="never", device="meta")
    assert "random init" in note
    assert zoo.torchvision_family(name) in ("segmentation", "detection")


def test_unknown_names_give_one_line_with_the_closest_names():
    with pytest.raises(FxsparseError) as info:
        zoo.resolve("torchvision:resnet19")
    assert "closest known names: resnet18" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FxsparseError, match="resnet50"):
        zoo.resolve("resnet5O")


@pytest.mark.slow
def test_audit_of_a_segmenter_never_touches_the_network(no_network, capsys):
    assert cli.main(["audit", "deeplabv3_mobilenet_v3_large", "--pretrained", "never"]) == 0
    out = capsys.readouterr().out
    assert "random init" in out and "| backbone." in out


@pytest.mark.slow
def test_audit_of_a_detector_sparsifies_its_backbone(no_network, capsys):
    assert cli.main(["audit", "fasterrcnn_mobilenet_v3_large_320_fpn", "--pretrained", "never",
                     "--calibrate", "1", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "submodule 'backbone'" in out and "| backbone.body." in out
