"""fxsparse.save / fxsparse.load: exact round trips, refusal of files that do not fit, and no pickle anywhere."""
import copy
import json
import pickle
import struct

import pytest
import timm
import torch
import torchvision
from torch import nn

import fxsparse
from fxsparse.testing.bad_inputs import Small


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def _vit_tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()


def _small():
    torch.manual_seed(0)
    return Small().eval()


@pytest.mark.parametrize("factory, options", [
    (_small, {}), (_resnet18, {"placement": ["activations", "residual"]}), (_vit_tiny, {})],
    ids=["small", "resnet18-with-residual-placement", "vit_tiny"])
def test_round_trip_restores_outputs_bit_for_bit(factory, options, tmp_path):
    model = factory()
    size = 6 if factory is _small else 32
    data = [torch.randn(4, 3, size, size) for _ in range(2)]
    gm = fxsparse.sparsify(model, data, alpha=0.3, **options)
    sites = list(fxsparse.meansparse_ops(gm))
    fxsparse.set_alpha(gm, {sites[0]: 0.7, sites[-1]: 0.0})  # per-site alphas survive too
    path = tmp_path / "robust.safetensors"
    fxsparse.save(gm, path)

    loaded = fxsparse.load(factory(), path)  # a fresh instance with the same weights
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = gm(x)
        assert torch.equal(loaded(x), expected)
        assert not torch.equal(expected, model(x))
    assert fxsparse.audit(loaded).to_dict()["sites"] == fxsparse.audit(gm).to_dict()["sites"]
    theirs, ours = gm.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_header_records_how_the_model_was_prepared(tmp_path):
    model = _small()
    gm = fxsparse.prepare(model, torch.randn(2, 3, 6, 6), select={"kinds": ["gelu"]})
    fxsparse.calibrate(gm, [torch.randn(4, 3, 6, 6)])
    path = tmp_path / "gelu_only.safetensors"
    fxsparse.save(torch.compile(gm), path)  # the compile wrapper saves the module it wraps
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(json.loads(f.read(length))["__metadata__"]["fxsparse"])
    assert header["prepare"]["select"] == {"kinds": ["gelu"], "include": ["*"], "exclude": []}
    assert header["prepare"]["input_shapes"] == [[2, 3, 6, 6]] and header["prepare"]["input_dtypes"] == ["torch.float32"]
    assert header["fxsparse_version"] == fxsparse.__version__ and header["torch_version"] == torch.__version__
    assert header["capture_path"] in ("fx", "export")
    assert [(s["site"], s["kind"], s["dim"], s["channels"]) for s in header["sites"]] == [("act2", "gelu", 1, 5)]
    loaded = fxsparse.load(model, path)
    assert list(fxsparse.meansparse_ops(loaded)) == ["act2"]  # the recorded selection is applied again


def test_no_pickle_is_involved(tmp_path, monkeypatch):
    gm = fxsparse.sparsify(_small(), [torch.randn(4, 3, 6, 6)], alpha=0.2)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "dump", "dumps"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    path = tmp_path / "m.safetensors"
    fxsparse.save(gm, path)
    fxsparse.load(_small(), path)
    assert b"pickle" not in path.read_bytes() and path.read_bytes()[8:9] == b"{"


def test_mismatches_are_spelled_out(tmp_path):
    path = tmp_path / "m.safetensors"
    fxsparse.save(fxsparse.sparsify(_small(), [torch.randn(4, 3, 6, 6)]), path)
    with pytest.raises(fxsparse.PersistenceError, match="site 'act' has channels 4 in the file but 8 in the model"):
        fxsparse.load(Small(width=8), path)

    class Deeper(Small):
        def forward(self, x):
            return torch.relu(super().forward(x))

    with pytest.raises(fxsparse.PersistenceError, match=r"1 site\(s\) of the model are not in the file: \['relu'\]"):
        fxsparse.load(Deeper(), path)
    with pytest.raises(fxsparse.PersistenceError, match=r"2 site\(s\) of the file are not in the model"):
        fxsparse.load(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh()), path)


def test_load_leaves_the_users_model_alone(tmp_path):
    model = _small().train()
    path = tmp_path / "m.safetensors"
    fxsparse.save(fxsparse.sparsify(model, [torch.randn(4, 3, 6, 6)]), path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxsparse.load(model, path)
    assert model.training and not any(isinstance(m, fxsparse.MeanSparse) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_decisions_survive_a_save_and_newer_formats_are_refused(tmp_path):
    """channel_dims, placement and selection are recorded and re-applied; a file from a newer format is refused."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(7, 7)

        def forward(self, x):  # (B, 5, 7): nothing proves the axis of the first relu's input
            return self.fc(torch.relu(x)).relu()

    x, model = torch.randn(4, 5, 7), Tokens().eval()
    gm = fxsparse.prepare(model, x, select={"exclude": ["relu_1"]}, placement="activations",
                          channel_dims={"relu": 1})
    fxsparse.calibrate(gm, [x])
    fxsparse.set_alpha(gm, 0.5)
    path = tmp_path / "tokens.safetensors"
    fxsparse.save(gm, path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(json.loads(f.read(length))["__metadata__"]["fxsparse"])
    assert header["format_version"] == fxsparse.files.persist.FORMAT_VERSION == 3
    assert header["prepare"]["channel_dims"] == {"relu": 1}
    assert header["prepare"]["placement"] == ["activations"]
    assert header["prepare"]["select"]["exclude"] == ["relu_1"]
    assert [(s["site"], s["dim"], s["channels"]) for s in header["sites"]] == [("relu", 1, 5)]
    loaded = fxsparse.load(model, path)
    assert [(r.site, r.dim, r.axis_rule) for r in fxsparse.audit(loaded)] == [
        (r.site, r.dim, r.axis_rule) for r in fxsparse.audit(gm)]
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))

    from fxsparse.files.safefile import read, write
    tensors, header = read(path, "fxsparse file")
    header.pop("sha256", None)
    write(path, tensors, dict(header, format_version=fxsparse.files.persist.FORMAT_VERSION + 1))
    with pytest.raises(fxsparse.PersistenceError, match="newer format"):
        fxsparse.load(Tokens(), path)


def test_a_file_in_another_format_version_is_refused_clearly(tmp_path):
    """One file format (the project was never released): any other version is refused, saying which."""
    from fxsparse.files import persist, safefile

    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()

    path = tmp_path / "m.fxsparse"
    fxsparse.save(fxsparse.prepare(model(), torch.randn(1, 3, 8, 8)), path)
    tensors, header = safefile.read(path, "fxsparse file")
    header.pop("sha256", None)
    for version, hint in ((1, "format 1; .* save the model again"),
                          (persist.FORMAT_VERSION + 1, f"newer format .{persist.FORMAT_VERSION + 1}.; upgrade")):
        bad = tmp_path / f"v{version}.fxsparse"
        safefile.write(bad, tensors, dict(header, format_version=version))
        with pytest.raises(fxsparse.PersistenceError, match=hint):
            fxsparse.load(model(), bad)


def test_load_into_other_weights_refuses_unless_told(tmp_path):
    x = torch.rand(8, 3, 8, 8)
    torch.manual_seed(0)
    base = Small()
    path = tmp_path / "small.fxsparse"
    fxsparse.save(fxsparse.sparsify(base, [x], alpha=0.2), path)
    assert fxsparse.load(base, path) is not None  # the same weights load
    assert fxsparse.load(copy.deepcopy(base), path) is not None  # a copy of them too
    torch.manual_seed(1)
    other = Small()  # same architecture, other weights
    with pytest.raises(fxsparse.PersistenceError, match="other weights"):
        fxsparse.load(other, path)
    gm = fxsparse.load(other, path, weights_may_differ=True)
    assert len(fxsparse.audit(gm)) == 2
