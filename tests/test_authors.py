"""The MeanSparse authors' published models (RobustBench Meansparse_*.py, sparsified_model.py), reproduced.

Each test describes an architecture the way the authors' code builds it (small widths; the Swin test keeps a
stage of 18 blocks), with their operator (`AuthorsMeanSparse`, the "### original" forward) at their places.
fxsparse prepares the plain base model with one preset, takes their statistics with `from_meansparse`, and
must give the same operators (count, order, channels, axis) and, at threshold 0.25, the same outputs.
"""
import collections
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

import fxsparse

import timm  # noqa: E402


class AuthorsMeanSparse(nn.Module):
    """Their operator: where(|x - running_mean| < threshold * sqrt(running_var), running_mean, x), per channel.
    layout: "nchw" (WRN, RaWRN), "tokens" (Swin: (B, L, C)), "imagenet" (ConvNeXt: NCHW if x.shape[1] == C,
    else NHWC)."""

    def __init__(self, in_planes, layout="nchw", imagenet=False):
        super().__init__()
        self.layout = layout
        if imagenet:
            self.register_buffer("momentum", torch.tensor(0.1))
            self.register_buffer("epsilon", torch.tensor(1e-10))
        self.register_buffer("running_mean", torch.zeros(in_planes))
        self.register_buffer("running_var", torch.zeros(in_planes))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("flag_update_statistics", torch.tensor(0))
        self.register_buffer("batch_num", torch.tensor(0.0))

    def channel_dim(self, x):
        if self.layout == "tokens":
            return 2
        if self.layout == "imagenet" and x.shape[1] != self.running_mean.shape[0]:
            return 3
        return 1

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.channel_dim(x)] = -1
        bias = self.running_mean.view(shape)
        crop = self.threshold * torch.sqrt(self.running_var).view(shape)
        if self.threshold == 0:
            return x
        return torch.where(torch.abs(x - bias) < crop, bias * torch.ones_like(x), x)


# ---- WRN-94-16 / WRN-70-16 (DMWideResNet) and RaWRN-70-16 (with squeeze-excitation) ------------------------
class Block(nn.Module):
    """Their _Block: pre-activation, "SAME"-style padding, SiLU; with `se`, RaWRN's SE after conv_1."""

    def __init__(self, cin, cout, stride, ms, se, inplace):
        super().__init__()
        self.stride, self.has_shortcut, self.ms = stride, cin != cout, ms
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        if ms:
            self.meansparse_0 = AuthorsMeanSparse(cin)
        self.relu_0 = nn.SiLU(inplace=inplace)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        if ms:
            self.meansparse_1 = AuthorsMeanSparse(cout)
        self.relu_1 = nn.SiLU(inplace=inplace)
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.se = SqueezeExcitation(cout, round(0.25 * cout), activation=nn.ReLU) if se else None
        if ms:
            self.meansparse_2 = AuthorsMeanSparse(cout)

    def _ms(self, i, x):
        return getattr(self, f"meansparse_{i}")(x) if self.ms else x

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self._ms(0, self.batchnorm_0(x)))
        else:
            out = self.relu_0(self._ms(0, self.batchnorm_0(x)))
        v = x if self.has_shortcut else out
        v = F.pad(v, (1, 1, 1, 1)) if self.stride == 1 else F.pad(v, (0, 1, 0, 1))
        out = self.conv_0(v)
        out = self.relu_1(self._ms(1, self.batchnorm_1(out)))
        out = self.conv_1(out)
        if self.se is not None:
            out = self.se(out)
        out = torch.add(self.shortcut(x) if self.has_shortcut else x, out)
        return self._ms(2, out)


class Group(nn.Module):
    def __init__(self, n, cin, cout, stride, **kw):
        super().__init__()
        self.block = nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1, **kw)
                                     for i in range(n)])

    def forward(self, x):
        return self.block(x)


class WRN(nn.Module):
    """DMWideResNet (se=False) or RaWRN's NormalizedWideResNet (se=True), small: stem 8, groups (2, 3) blocks of
    widths (16, 24); with `ms`, the authors' MeanSparse version (same keys plus meansparse_*)."""

    def __init__(self, ms, se=False, depths=(2, 3), widths=(16, 24), stem=8):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(3, 1, 1), persistent=False)
        self.init_conv = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        kw = dict(ms=ms, se=se, inplace=se)  # RaWRN builds SiLU(inplace=True)
        ins = (stem,) + tuple(widths[:-1])
        self.layer = nn.Sequential(*[Group(n, cin, cout, 1 if g == 0 else 2, **kw)
                                     for g, (n, cin, cout) in enumerate(zip(depths, ins, widths))])
        self.batchnorm = nn.BatchNorm2d(widths[-1])
        if ms:
            self.meansparse_end = AuthorsMeanSparse(widths[-1])
        self.relu = nn.SiLU(inplace=se)
        self.logits = nn.Linear(widths[-1], 10)
        self.ms, self.width = ms, widths[-1]

    def forward(self, x):
        out = self.init_conv((x - self.mean) / self.std)
        out = self.batchnorm(self.layer(out))
        out = self.relu(self.meansparse_end(out) if self.ms else out)
        out = F.avg_pool2d(out, 4).view(-1, self.width)
        return self.logits(out)


# ---- helpers ---------------------------------------------------------------------------------------------
def _randomise(model, seed=0):
    """Trained-looking BN statistics and the authors' operator state: statistics, threshold 0.25."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        if isinstance(m, AuthorsMeanSparse):
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.05)
            m.threshold.fill_(0.25)
            m.batch_num.fill_(98)


def _authors_calls(sparse, x):
    """(operator name, channels, channel dim counted from the end) in the order the authors' model runs them."""
    calls, hooks = [], []
    for name, m in sparse.named_modules():
        if isinstance(m, AuthorsMeanSparse):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: calls.append(
                    (name, mod.running_mean.numel(), mod.channel_dim(args[0]) - args[0].dim()))))
    with torch.no_grad():
        sparse(x)
    for h in hooks:
        h.remove()
    return calls


def _check_reproduced(base, sparse, x, placement, expected_sites):
    """from_meansparse on the base model gives the authors' operators in their order, and their outputs."""
    sparse.eval()
    calls = _authors_calls(sparse, x)
    gm = fxsparse.from_meansparse(base, sparse.state_dict(), placement=placement, example_inputs=x)
    audit = fxsparse.audit(gm)
    assert [r.site for r in audit] == [expected_sites(name) for name, _, _ in calls]
    ranks = {n.meta["fxsparse_site"]: len(n.meta["fxsparse_shape"]) for n in gm.graph.nodes
             if "fxsparse_site" in n.meta}
    assert [(r.channels, r.dim - ranks[r.site]) for r in audit] == [(c, d) for _, c, d in calls]
    assert all(not r.axis_default and r.alpha == 0.25 for r in audit)
    with torch.no_grad():
        ours, theirs, plain = gm(x), sparse(x), base(x)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)  # the operators do replace values
    return gm, calls


def _wrn_site(name):
    for i, site in ((0, "relu_0"), (1, "relu_1"), (2, "add")):
        if name.endswith(f"meansparse_{i}"):
            return name.replace(f"meansparse_{i}", site)
    assert name == "meansparse_end"
    return "relu"


@pytest.mark.parametrize("se", [False, True], ids=["wrn", "rawrn"])
def test_wrn_preset_reproduces_the_authors_wrn_and_rawrn(se):
    torch.manual_seed(0)
    base, sparse = WRN(False, se).eval(), WRN(True, se).eval()
    _randomise(base)
    missing = sparse.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert all(".meansparse_" in k or k.startswith("meansparse_end") for k in missing)
    _randomise(sparse, seed=1)
    sparse.load_state_dict(base.state_dict(), strict=False)
    x = torch.rand(2, 3, 8, 8)
    gm, calls = _check_reproduced(base, sparse, x, "wrn", _wrn_site)
    assert len(calls) == 3 * 5 + 1
    policies = collections.Counter(op.policy for op in fxsparse.meansparse_ops(gm).values())
    assert policies == {"norm_activations": 11, "residual": 5}
    if se:  # the squeeze-excitation ReLU is left alone, as the authors do; plain `activations` would take it
        plain = fxsparse.prepare(base, x, placement=["activations", "residual"])
        assert len(fxsparse.meansparse_ops(plain)) == len(calls) + 5
        assert not any(".se." in s for s in fxsparse.meansparse_ops(gm))


def test_from_meansparse_finds_the_placement_and_refuses_what_differs():
    torch.manual_seed(0)
    base, sparse = WRN(False).eval(), WRN(True).eval()
    _randomise(sparse)
    sparse.load_state_dict(base.state_dict(), strict=False)
    x = torch.rand(2, 3, 8, 8)
    state = sparse.state_dict()
    gm = fxsparse.from_meansparse(base, {f"module.{k}": v for k, v in state.items()}, example_inputs=x)
    with torch.no_grad():
        assert torch.equal(gm(x), sparse(x))  # placement None: the wrn preset is found; `module.` stripped
    fewer = {k: v for k, v in state.items() if not k.startswith("layer.1.block.2.meansparse_2.")}
    with pytest.raises(fxsparse.PersistenceError, match="15 MeanSparse operators"):
        fxsparse.from_meansparse(base, fewer, placement="wrn", example_inputs=x)
    wider = dict(state, **{"layer.0.block.1.meansparse_1.running_mean": torch.zeros(17)})
    with pytest.raises(fxsparse.PersistenceError, match="layer.0.block.1.meansparse_1 has 17 channels"):
        fxsparse.from_meansparse(base, wider, placement="wrn", example_inputs=x)
    other = dict(state, **{"logits.weight": torch.zeros(3, 24)})
    with pytest.raises(fxsparse.PersistenceError, match="logits.weight"):
        fxsparse.from_meansparse(base, other, placement="wrn", example_inputs=x)
    stats_only = {k: v for k, v in state.items() if "meansparse" in k}
    gm = fxsparse.from_meansparse(sparse_base := WRN(False).eval(), stats_only, placement="wrn", example_inputs=x)
    assert len(fxsparse.meansparse_ops(gm)) == 16 and sparse_base is not None


# ---- ConvNeXt-L: timm convnext, channels-last Linear MLP, add_custom_layer_imagenet -----------------------
def _add_custom_layer_imagenet(model, prefix="", last_linear=None):
    """Their sparsified_model.add_custom_layer_imagenet: drop_path -> Sequential(drop_path, MS(C_stage)),
    GELU -> Sequential(MS(out_features of the last Linear of the parent), GELU), inside `stages.k` only."""
    for name, child in list(model.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Linear):
            last_linear = child.out_features
        if "stages" in path and name == "drop_path":
            stage = int(path.split("stages.")[1].split(".")[0])
            setattr(model, name, nn.Sequential(child, AuthorsMeanSparse(model_dims[stage], "imagenet", True)))
        elif "stages" in path and type(child).__name__ == "GELU":
            setattr(model, name, nn.Sequential(AuthorsMeanSparse(last_linear, "imagenet", True), child))
        else:
            last_linear = _add_custom_layer_imagenet(child, path, last_linear) or last_linear
    return last_linear


model_dims = (8, 16, 24, 32)


def test_convnext_preset_reproduces_the_authors_convnext_l():
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    base = ConvNeXt(depths=(1, 1, 2, 1), dims=model_dims, conv_mlp=False, ls_init_value=0.5, num_classes=5).eval()
    sparse = ConvNeXt(depths=(1, 1, 2, 1), dims=model_dims, conv_mlp=False, ls_init_value=0.5, num_classes=5).eval()
    _add_custom_layer_imagenet(sparse)
    _randomise(sparse)
    sparse.load_state_dict(base.state_dict(), strict=False)
    x = torch.rand(2, 3, 32, 32)

    def site(name):
        return name.replace(".mlp.act.0", ".mlp.act").replace(".drop_path.1", ".branch")

    gm, calls = _check_reproduced(base, sparse, x, "convnext", site)
    assert len(calls) == 2 * 5 and {d for _, _, d in calls} == {-3, -1}  # NCHW branch, NHWC (B, H, W, 4C) GELU input
    assert [c for n, c, _ in calls if n.endswith("act.0")] == [32, 64, 96, 96, 128]


# ---- Swin-L: timm swin (NHWC), 4 operators per block on (B, L, C) tokens -------------------------------------
def _authors_block_forward(self, x):
    B, H, W, C = x.shape
    x = x + self.drop_path1(self._attn(self.norm1(x)))
    x = x.reshape(B, H * W, C)
    x = self.meansparse1(x)
    x = x + self.drop_path2(self.mlp(self.norm2(x)))
    x = self.meansparse2(x)
    return x.reshape(B, H, W, C)


def _authors_mlp_forward(self, x):
    x = self.meansparse1(self.fc1(x))
    x = self.drop1(self.act(x))
    x = self.meansparse2(self.fc2(self.norm(x)))
    return self.drop2(x)


def _swin_with_meansparse(model):
    """Meansparse_swin_L.py's block and Mlp, modules registered in their order (state_dict order)."""
    for block in model.modules():
        if type(block).__name__ != "SwinTransformerBlock":
            continue
        c = block.norm1.normalized_shape[0]
        mods = collections.OrderedDict()
        for name, m in block._modules.items():
            mods[name] = m
            if name == "norm1":
                mods["meansparse1"] = AuthorsMeanSparse(c, "tokens")
            if name == "norm2":
                mods["meansparse2"] = AuthorsMeanSparse(c, "tokens")
        block._modules = mods
        block.mlp.meansparse1 = AuthorsMeanSparse(block.mlp.fc1.out_features, "tokens")
        block.mlp.meansparse2 = AuthorsMeanSparse(c, "tokens")
        block.forward = types.MethodType(_authors_block_forward, block)
        block.mlp.forward = types.MethodType(_authors_mlp_forward, block.mlp)


@pytest.mark.slow
def test_swin_preset_reproduces_the_authors_swin_l_with_an_18_block_stage():
    from timm.models.swin_transformer import SwinTransformer

    kw = dict(img_size=56, patch_size=4, window_size=7, embed_dim=8, depths=(2, 18), num_heads=(1, 2),
              num_classes=5)
    torch.manual_seed(0)
    base, sparse = SwinTransformer(**kw).eval(), SwinTransformer(**kw).eval()
    _swin_with_meansparse(sparse)
    _randomise(sparse)
    sparse.load_state_dict(base.state_dict(), strict=False)
    assert [k for k in sparse.state_dict() if "layers.0.blocks.0.m" in k and k.endswith("running_mean")] == [
        "layers.0.blocks.0.meansparse1.running_mean", "layers.0.blocks.0.meansparse2.running_mean",
        "layers.0.blocks.0.mlp.meansparse1.running_mean", "layers.0.blocks.0.mlp.meansparse2.running_mean"]
    x = torch.rand(2, 3, 56, 56)

    def site(name):
        for theirs, ours in ((".mlp.meansparse1", ".mlp.act"), (".mlp.meansparse2", ".mlp.fc2"),
                             (".meansparse1", ".add"), (".meansparse2", ".add_1")):
            if name.endswith(theirs):
                return name[: -len(theirs)] + ours
        raise AssertionError(name)

    gm, calls = _check_reproduced(base, sparse, x, "swin", site)
    assert len(calls) == 4 * 20
    assert [c for n, c, _ in calls if n.startswith("layers.1.") and n.endswith(".mlp.meansparse1")] == [64] * 18
