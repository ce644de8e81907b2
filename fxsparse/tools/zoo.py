"""Model names for the command line: timm or torchvision, pretrained only when weights are already cached."""
from __future__ import annotations

import os
from typing import Tuple

import torch
from torch import nn

from fxsparse.errors import FxsparseError


def _timm_cached_file(name: str):
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo, _, revision = hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str) and os.path.exists(path):
                return path
    url = getattr(cfg, "url", None)
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if os.path.exists(path):
            return path
    return None


def _torchvision_cached_weights(name: str):
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:
        return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return weights if os.path.exists(path) else None


FAMILIES = ("detection", "segmentation", "video", "optical_flow")


def torchvision_family(name: str):
    """"detection", "segmentation", "video", "optical_flow", or None for classifiers (and unknown names)."""
    import torchvision

    for family in FAMILIES:
        if name in torchvision.models.list_models(module=getattr(torchvision.models, family)):
            return family
    return None


def _close_names(name: str, library: str):
    import difflib

    import timm
    import torchvision

    known = (list(timm.list_models()) if "timm" in library else []) + (
        list(torchvision.models.list_models()) if "torchvision" in library else [])
    return difflib.get_close_matches(name, list(dict.fromkeys(known)), n=5, cutoff=0.6)


def _unknown(name: str, library: str = "timm or torchvision") -> FxsparseError:
    close = _close_names(name, library)
    return FxsparseError(f"unknown model {name!r} (not a {library} name)"
                         + (f"; closest known names: {', '.join(close)}" if close else ""))


def resolve(name: str) -> Tuple[str, str]:
    """("timm" | "torchvision", model name). A prefix `timm:` or `torchvision:` picks the library; a bare name
    is looked up in timm first. An unknown name raises one line with the closest known names."""
    import timm
    import torchvision

    lib, sep, bare = name.partition(":")
    if sep and lib in ("timm", "torchvision", "tv"):
        lib = "torchvision" if lib == "tv" else lib
        known = timm.is_model(bare) if lib == "timm" else bare in torchvision.models.list_models()
        if not known:
            raise _unknown(bare, lib)
        return lib, bare
    if timm.is_model(name):
        return "timm", name
    if name in torchvision.models.list_models():
        return "torchvision", name
    raise _unknown(name)


def _no_download_kwargs(name: str) -> dict:
    """weights_backbone=None where the builder takes it: torchvision's detection and segmentation builders
    default to downloading ImageNet backbone weights even when `weights=None`."""
    import inspect

    import torchvision

    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    return {"weights_backbone": None} if "weights_backbone" in params else {}


def load_model(name: str, *, pretrained: str = "auto", device: str = "cpu") -> Tuple[nn.Module, str]:
    """(model in eval mode, a note on its weights). pretrained: 'auto' (cached weights if any), 'never'.
    Nothing is ever downloaded. Without weights the model is built on the meta device when device='meta'
    (structure only, instant)."""
    import timm
    import torchvision

    lib, bare = resolve(name)
    if lib == "timm":
        path = _timm_cached_file(bare) if pretrained == "auto" else None
        if path is not None:
            return timm.create_model(bare, pretrained=True, pretrained_cfg_overlay={"file": path}).eval(), \
                f"timm {bare}, pretrained weights from {path}"
        with torch.device(device):
            return timm.create_model(bare, pretrained=False).eval(), f"timm {bare}, random init (no cached weights)"
    weights = _torchvision_cached_weights(bare) if pretrained == "auto" else None
    if weights is not None:
        return torchvision.models.get_model(bare, weights=weights).eval(), f"torchvision {bare}, {weights} (cached)"
    with torch.device(device):
        return torchvision.models.get_model(bare, weights=None, **_no_download_kwargs(bare)).eval(), \
            f"torchvision {bare}, random init (no cached weights)"


def audit_inputs(name: str, model: nn.Module, shape=None, batch: int = 2):
    """(example_inputs, submodule) for `fxsparse audit`: detectors get their backbone sparsified on a list of
    images, optical-flow models two images, the rest a batch at `shape` (default: fxsparse's guess)."""
    from fxsparse.inputs import default_input_shape
    from fxsparse.util import model_device

    device = model_device(model)
    lib, bare = resolve(name)
    family = torchvision_family(bare) if lib == "torchvision" else None
    if family == "detection":
        shape = shape or (3, 320, 320)
        return ([torch.rand(*shape, device=device)],), "backbone"
    if family == "optical_flow":
        shape = shape or (3, 128, 128)
        return (torch.rand(batch, *shape, device=device), torch.rand(batch, *shape, device=device)), None
    shape = shape or default_input_shape(model)
    return (torch.randn(batch, *shape, device=device),), None
