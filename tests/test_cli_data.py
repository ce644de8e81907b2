"""The command line's data sources: image folders read with the model's own preprocessing, unnormalised."""
import numpy as np
import pytest
import torch
from PIL import Image

from fxsparse.errors import FxsparseValueError
from fxsparse.tools import data
from fxsparse.tools.demo import load_digits_splits


def write_digits_folder(root, split):
    """sklearn's digits as 8-bit PNG files in class subfolders (the pixels 0..16 scaled to 0..255)."""
    x, y = split
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
    return root


def test_image_folder_of_digits_reads_back_the_digits(tmp_path):
    split = load_digits_splits(0)["test"]
    root = write_digits_folder(tmp_path / "test", split)
    loader = data.load_split(f"imagefolder:{root}", data.digits_transform(), batch_size=50)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == split[0].shape and x.min() >= 0 and x.max() <= 1
    # ImageFolder orders by class, then file name: the same examples, regrouped by class
    for c in range(10):
        ours = x[y == c]
        theirs = split[0][split[1] == c]
        assert torch.allclose(ours, theirs, atol=1 / 255)


def test_timm_preprocessing_without_normalisation():
    import timm
    import timm.data

    model = timm.create_model("test_resnet", pretrained=False)
    image = Image.fromarray((np.random.default_rng(0).random((200, 180, 3)) * 255).astype(np.uint8))
    ours = data.unnormalized_transform(model, "timm", "test_resnet")(image)
    config = timm.data.resolve_data_config({}, model=model)
    normalised = timm.data.create_transform(**config, is_training=False)(image)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    assert ours.shape == normalised.shape and 0 <= ours.min() and ours.max() <= 1
    torch.testing.assert_close(ours, normalised * std + mean, atol=1e-5, rtol=0)


def test_torchvision_preprocessing_without_normalisation():
    import torchvision

    image = Image.fromarray((np.random.default_rng(1).random((300, 260, 3)) * 255).astype(np.uint8))
    ours = data.unnormalized_transform(None, "torchvision", "resnet18")(image)
    preset = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    mean, std = torch.tensor(preset.mean).view(3, 1, 1), torch.tensor(preset.std).view(3, 1, 1)
    torch.testing.assert_close(ours, preset(image) * std + mean, atol=1e-5, rtol=0)
    assert ours.shape == (3, 224, 224) and 0 <= ours.min() and ours.max() <= 1


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FxsparseValueError, match="no such folder"):
        data.load_split(f"imagefolder:{tmp_path / 'missing'}", data.digits_transform())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FxsparseValueError, match="class subfolders"):
        data.load_split(f"imagefolder:{tmp_path / 'empty'}", data.digits_transform())
    bad = tmp_path / "bad.pt"
    torch.save({"images": torch.rand(2, 3, 8, 8)}, bad)
    with pytest.raises(FxsparseValueError, match=r"must hold \(x, y\) tensors"):
        data.load_split(str(bad))
    with pytest.raises(FxsparseValueError, match="not an image classifier|no published preprocessing"):
        data.unnormalized_transform(None, "torchvision", "fasterrcnn_resnet50_fpn")


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    splits = load_digits_splits(0)
    for name in ("train", "val", "test"):
        write_digits_folder(root / name, splits[name])
    return root


@pytest.mark.slow
def test_cli_evaluates_an_image_folder_end_to_end(digits_folders, tmp_path, monkeypatch, capsys):
    """Real images (sklearn's digits written as PNG files) through `fxsparse evaluate`: calibrate, search and
    evaluate read image folders; the search plot is written."""
    from PIL import Image as PILImage

    from fxsparse.tools.cli import main

    monkeypatch.setenv("FXSPARSE_CACHE", str(tmp_path))
    plot = tmp_path / "alpha.png"
    root = digits_folders
    rc = main(["evaluate", "digits", "--epochs", "2", "--width", "8", "--calibration", f"imagefolder:{root / 'train'}",
               "--validation", f"imagefolder:{root / 'val'}", "--data", f"imagefolder:{root / 'test'}",
               "--search", "--search-attack", "pgd:steps=2", "--alphas", "0", "0.3", "--attacks", "clean",
               "pgd:steps=2", "--plot", str(plot), "--format", "json"])
    assert rc == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["sparsified"]["n"] == doc["original"]["n"] == 359 and len(doc["search"]) == 2
    assert PILImage.open(plot).size == (700, 450)


def test_weights_files_load_with_or_without_wrappers(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    data.load_weights(model, str(tmp_path / "ckpt.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    data.load_weights(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), str(tmp_path / "w.safetensors"))
    with pytest.raises(FxsparseValueError, match="does not fit the model"):
        data.load_weights(nn.Sequential(nn.Linear(3, 5)), str(tmp_path / "w.safetensors"))
    with pytest.raises(FxsparseValueError, match="no such file"):
        data.load_weights(model, str(tmp_path / "missing.pth"))
    ema = {k: v + 1 for k, v in state.items()}  # timm's training checkpoint: EMA weights, torch.compile prefixes
    torch.save({"model": state, "model_ema": {f"_orig_mod.{k}": v for k, v in ema.items()}}, tmp_path / "timm.pth")
    data.load_weights(model, str(tmp_path / "timm.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())


def test_shards_are_contiguous_and_cover_every_example_once():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    parts = [data.shard((x, y), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[1] for p in parts]), y) and [len(p[1]) for p in parts] == [3, 3, 4]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    got = torch.cat([torch.cat([b[1] for b in data.shard(loader, r, 3)]) for r in range(3)])
    assert torch.equal(got, y)
