"""Where the command line's images come from: `--data`, `--calibration` and `--validation` take

    digits            scikit-learn's bundled digits (the demo's data, split 70 / 10 / 20 by `split_seed`)
    PATH.pt           a torch.save'd (images, labels) pair or {"x": images, "y": labels}, images in [0, 1]
    imagefolder:DIR   class subfolders of image files (torchvision's ImageFolder), read with the model's own
                      preprocessing (resize, crop) and *no normalisation*: pixels stay in [0, 1], the box the
                      attacks work in, and the normalisation goes inside the model

A model's preprocessing comes from where the model came from: timm's data config, the transforms of
torchvision's weights for that architecture, or the digits' 8 x 8 greyscale for the demo's CNN.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import torch

from fxsparse.errors import FxsparseValueError

IMAGEFOLDER = "imagefolder:"


def digits_transform() -> Callable:
    """8 x 8 greyscale in [0, 1], as the demo's CNN was trained (sklearn's digits are 0..16 per pixel)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Grayscale(1), transforms.Resize((8, 8)), transforms.ToTensor()])


def unnormalized_transform(model: torch.nn.Module, library: str, name: str) -> Callable:
    """The evaluation preprocessing of a timm or torchvision model, with the normalisation left out."""
    if library == "digits":
        return digits_transform()
    if library == "timm":
        import timm.data

        config = timm.data.resolve_data_config({}, model=model)
        config.update(mean=(0.0,) * len(config["mean"]), std=(1.0,) * len(config["std"]))
        return timm.data.create_transform(**config, is_training=False)
    if library == "torchvision":
        import torchvision
        from torchvision.transforms._presets import ImageClassification

        try:
            preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, AttributeError) as exc:
            raise FxsparseValueError(f"torchvision has no published preprocessing for {name!r}; give .pt files of "
                                "images in [0, 1] instead of an image folder") from exc
        if not isinstance(preset, ImageClassification):
            raise FxsparseValueError(f"{name!r} is not an image classifier in torchvision; give .pt files instead")
        return ImageClassification(crop_size=preset.crop_size[0], resize_size=preset.resize_size[0],
                                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation=preset.interpolation,
                                   antialias=preset.antialias)
    raise FxsparseValueError(f"no preprocessing known for a {library} model")


def load_tensors(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """An (x, y) pair from a file written with torch.save: a tuple/list (x, y) or a dict with x/y keys."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as exc:
        raise FxsparseValueError(f"cannot read data file {path}: {exc}") from exc
    if isinstance(obj, dict):
        obj = (obj.get("x", obj.get("images")), obj.get("y", obj.get("labels")))
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise FxsparseValueError(f"{path} must hold (x, y) tensors: torch.save((images, labels), path), or a dict "
                            "with keys x and y")
    return tuple(obj)


def image_folder(directory: str, transform: Callable, batch_size: int = 64, workers: int = 0):
    """A DataLoader of (images, labels) over class subfolders, in a fixed order (no shuffling: resumable runs
    and several processes need the same order every time)."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(directory):
        raise FxsparseValueError(f"{IMAGEFOLDER}{directory}: no such folder")
    try:
        dataset = ImageFolder(directory, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise FxsparseValueError(f"{IMAGEFOLDER}{directory} is not a folder of class subfolders of images: {exc}") from exc
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def load_split(spec: str, transform: Optional[Callable] = None, batch_size: int = 64) -> Any:
    """The data named by `spec` (see the module docstring): an (x, y) pair of tensors or a DataLoader."""
    if spec.startswith(IMAGEFOLDER):
        if transform is None:
            raise FxsparseValueError(f"{spec}: the model's preprocessing is unknown; give .pt files of images in [0, 1]")
        return image_folder(spec[len(IMAGEFOLDER):], transform, batch_size)
    return load_tensors(spec)


def shard(split: Any, rank: int, world: int, batch_size: int = 64) -> Any:
    """This rank's contiguous share of a split (ranks in order give the whole split back, each example
    once: no padding repeats as DistributedSampler adds without drop_last)."""
    if world == 1:
        return split
    if isinstance(split, tuple):
        x, y = split
        bounds = [len(x) * r // world for r in range(world + 1)]
        return x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]]
    dataset = split.dataset
    bounds = [len(dataset) * r // world for r in range(world + 1)]
    part = torch.utils.data.Subset(dataset, range(bounds[rank], bounds[rank + 1]))
    return torch.utils.data.DataLoader(part, batch_size=split.batch_size, shuffle=False,
                                       num_workers=split.num_workers)


def load_weights(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load a state_dict or a timm / torchvision training checkpoint into `model`, read by timm's own loader
    (`timm.models.load_state_dict`, weights_only: no arbitrary unpickling): a .safetensors file or a
    torch.save'd dict, the weights at the top or under 'state_dict_ema' / 'model_ema' / 'state_dict' /
    'model', 'module.' (DataParallel / DDP) and '_orig_mod.' (torch.compile) prefixes removed."""
    from timm.models import load_state_dict

    if not os.path.isfile(path):
        raise FxsparseValueError(f"--weights {path}: no such file")
    try:
        state = load_state_dict(path, use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:
        raise FxsparseValueError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}"[:400]) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FxsparseValueError(f"{path} holds no state_dict (a dict of tensors, possibly under 'state_dict', "
                                 "'model' or 'model_ema'): give the model's weights")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise FxsparseValueError(f"{path} does not fit the model: {str(exc).splitlines()[-1].strip()}; check the "
                                 "architecture name") from exc
    if missing or unexpected:
        raise FxsparseValueError(f"{path} does not fit the model: missing keys {list(missing)[:5]}, unexpected keys "
                            f"{list(unexpected)[:5]}; check the architecture name")
    return model
