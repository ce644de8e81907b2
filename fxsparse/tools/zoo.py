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


def resolve(name: str) -> Tuple[str, str]:
    """("timm" | "torchvision", model name). A prefix `timm:` or `torchvision:` picks the library; a bare name
    is looked up in timm first."""
    import timm
    import torchvision

    lib, sep, bare = name.partition(":")
    if sep and lib in ("timm", "torchvision", "tv"):
        return ("torchvision" if lib == "tv" else lib), bare
    if timm.is_model(name):
        return "timm", name
    if name in torchvision.models.list_models():
        return "torchvision", name
    close = timm.list_models(f"*{name}*")[:8]
    raise FxsparseError(f"unknown model {name!r}" + (f"; similar timm names: {close}" if close else ""))


def load_model(name: str, *, pretrained: str = "auto", device: str = "cpu") -> Tuple[nn.Module, str]:
    """(model in eval mode, a note on its weights). pretrained: 'auto' (cached weights if any), 'never'.
    Without weights the model is built on the meta device when device='meta' (structure only, instant)."""
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
        return torchvision.models.get_model(bare, weights=None).eval(), \
            f"torchvision {bare}, random init (no cached weights)"
