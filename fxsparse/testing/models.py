"""The real architectures the suite checks, random init, small inputs."""
import timm
import torch
import torchvision

from fxsparse.passes.kinds import kind_of_module


def _tv(name):
    return lambda: torchvision.models.get_model(name, weights=None)


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


# name: (factory, input size, expected (kind, dim) pairs)
MODELS = {
    "tv_resnet18": (_tv("resnet18"), 64, {("relu", 1)}),
    "tv_mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64, {("relu", 1), ("hardswish", 1)}),
    "efficientnet_b0": (_timm("efficientnet_b0"), 64, {("silu", 1)}),
    "convnext_atto": (_timm("convnext_atto"), 64, {("gelu", 1)}),              # timm default: conv MLP, NCHW
    "convnext_atto_nhwc": (_timm("convnext_atto", conv_mlp=False), 64, {("gelu", 3)}),  # Linear MLP on NHWC
    "vit_tiny": (_timm("vit_tiny_patch16_224", img_size=64), 64, {("gelu", 2)}),   # (B, N, C) tokens
    "mixer_s16": (_timm("mixer_s16_224", img_size=64), 64, {("gelu", 2)}),          # token- and channel-mixing
}


def build(name):
    factory, size, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    # some heads start at zero (timm's Mixer); randomise them so outputs depend on the features
    for p in model.parameters():
        if p.dim() >= 1 and torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.02)
    return model, size


def count_activation_module_calls(model, x):
    """Run-time count of calls to activation modules of default kinds (independent of the pass)."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
               for m in model.modules() if kind_of_module(m) is not None and kind_of_module(m).default]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return len(calls)
