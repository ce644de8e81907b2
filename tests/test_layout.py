"""The layout analysis (passes/layout.py): one forward pass, exact facts, no silent defaults; and selection."""
import copy
import warnings

import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st
from torch import nn

import fxsparse
from fxsparse._meta import LAYOUT_META, PREPARE_META
from fxsparse.passes.layout import analyze

import timm  # noqa: E402
from timm.layers import register_notrace_module  # noqa: E402

B, H, W, C, HID, WS = 2, 6, 10, 12, 20, 2  # distinct sizes: a wrong axis shows up as a wrong channel count


@register_notrace_module
class OpaqueMix(nn.Module):
    """An attention stand-in the tracer keeps as a leaf: the layout of its output is unknown."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        return self.proj(x).softmax(-1) * x


@register_notrace_module
class OpaqueMlp(nn.Module):
    """An MLP the tracer keeps as a leaf (its GELU gets an operator inside)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, HID), nn.GELU(), nn.Linear(HID, C)

    def forward(self, x):
        if x.dim() == 0:  # data-independent, but enough to keep FX from tracing through
            raise ValueError
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """A Swin-style block on a (B, H, W, C) stream: shifted windows, an opaque attention, tokens for the MLP."""

    def __init__(self, shift, opaque_mlp=False):
        super().__init__()
        self.shift = shift
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(C), OpaqueMix(), nn.LayerNorm(C)
        self.mlp = OpaqueMlp() if opaque_mlp else None
        self.fc1, self.act, self.fc2 = nn.Linear(C, HID), nn.GELU(), nn.Linear(HID, C)

    def forward(self, x):
        h = torch.roll(self.norm1(x), (-self.shift, -self.shift), (1, 2))
        win = h.view(B, H // WS, WS, W // WS, WS, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, WS * WS, C)
        win = self.attn(win)
        h = win.view(B, H // WS, W // WS, WS, WS, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        x = x + torch.roll(h, (self.shift, self.shift), (1, 2))
        x = x.reshape(B, H * W, C)
        mlp = self.mlp if self.mlp is not None else (lambda t: self.fc2(self.act(self.fc1(t))))
        x = x + mlp(self.norm2(x))
        return x.reshape(B, H, W, C)


class SwinStream(nn.Module):
    def __init__(self, depth, opaque_mlp=False):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.blocks = nn.Sequential(*[SwinBlock(WS // 2 if i % 2 else 0, opaque_mlp) for i in range(depth)])
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        return self.head(self.blocks(x).mean((1, 2)))


def _prepare_strict(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxsparse.LayoutWarning)
        return fxsparse.prepare(model, x, **kwargs)


@pytest.mark.parametrize("opaque_mlp", [False, True])
def test_swin_style_residual_stream_has_the_channel_axis_at_every_depth(opaque_mlp):
    """Regression: with branches it could not read, the old backward walk (budgets of 64 and 8 steps) gave the
    residual sites of this stream from block 18 on the rank default, dim 1: statistics per image row, silently."""
    model = SwinStream(24, opaque_mlp).eval()
    x = torch.randn(B, 3, 2 * H, 2 * W)
    gm = _prepare_strict(model, x, placement=["activations", "residual"], capture="fx")
    assert len(gm.meta["fxsparse_capture"].opaque_leaves) == (24 if opaque_mlp else 0)
    audit = fxsparse.audit(gm)
    residual = [r for r in audit if r.policy.endswith("residual")]
    assert len(residual) == 48 and len(audit) == 72
    assert all(r.channels == C and not r.axis_default for r in residual)
    assert [r.dim for r in residual] == [3, 2] * 24  # (B, H, W, C), then tokens (B, H*W, C)
    assert all(r.channels in (C, HID) and not r.axis_default for r in audit)
    assert any(w in residual[-1].axis_rule for w in ("LayerNorm", "Conv2d", "Linear"))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_facts_of_moves_splits_cats_and_reductions():
    class Moves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, C, 1)

        def forward(self, x):
            y = self.conv(x)                                   # (B, C, H, W): 1
            a, b = y.split([5, 7], dim=1)                      # pieces keep the axis
            z = torch.cat([b, a], 1)                           # 1
            t = z.flatten(2).transpose(1, 2)                   # (B, HW, C): 2
            s = torch.stack([t, t], 0)                         # 3
            m = z.mean((2, 3))                                 # (B, C): 1
            k = z.mean(1, keepdim=True)                        # the channels reduced: unknown
            u = z[:, :, 1:]                                    # slice: 1
            v = z[:, 0]                                        # index the channels away: unknown
            return t, s, m, k, u, v

    x = torch.randn(B, 3, H, W)
    gm = fxsparse.capture(Moves(), (x,))
    analyze(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    dims = [n.meta[LAYOUT_META].dim for n in out.args[0]]
    assert dims == [2, 3, 1, None, 1, None]
    assert "Conv2d conv" in out.args[0][0].meta[LAYOUT_META].rule


def test_facts_on_export_graphs():
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Flatten(2), nn.LayerNorm(H * W - 20),
                          nn.GELU()).eval()
    x = torch.randn(B, 3, H, W + 2)
    gm = _prepare_strict(model, x, capture="export")
    records = fxsparse.audit(gm)
    assert [(r.kind, r.dim, r.channels) for r in records] == [("relu", 1, C), ("gelu", 2, H * W - 20)]


def test_unknown_axis_is_decided_by_declared_counts_or_warned_and_overridable():
    class Tokens(nn.Module):
        def __init__(self, tail):
            super().__init__()
            self.fc = nn.Linear(7, 4) if tail else None

        def forward(self, x):  # (B, 5, 7) input: nothing fixes its layout
            y = torch.relu(x)
            return self.fc(y) if self.fc is not None else y

    x = torch.randn(B, 5, 7)
    gm = _prepare_strict(Tokens(True), x)  # the consumer's in_features=7 decides
    [r] = fxsparse.audit(gm)
    assert (r.dim, r.channels, r.axis_default) == (2, 7, False) and "in_features=7" in r.axis_rule
    with pytest.warns(fxsparse.LayoutWarning, match=r"relu.*channel_dims"):
        gm = fxsparse.prepare(Tokens(False), x)
    [r] = fxsparse.audit(gm)
    assert r.axis_default and r.dim == 2 and "DEFAULT" in fxsparse.audit(gm).to_markdown()
    gm = _prepare_strict(Tokens(False), x, channel_dims={"rel*": 1})
    [r] = fxsparse.audit(gm)
    assert (r.dim, r.channels, r.axis_default) == (1, 5, False) and "channel_dims" in r.axis_rule
    assert gm.meta[PREPARE_META]["channel_dims"] == {"rel*": 1}
    with pytest.raises(fxsparse.SelectionError, match="matches no site"):
        fxsparse.prepare(Tokens(False), x, channel_dims={"nothing": 1})


@register_notrace_module
class LeafLayerNorm2d(nn.LayerNorm):
    """A LayerNorm subclass over the channels of NCHW input, kept as a leaf: the table says "last dim"."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_an_axis_that_contradicts_the_declared_count_is_reported():
    model = nn.Sequential(nn.Conv2d(3, C, 1), LeafLayerNorm2d(C), nn.ReLU()).eval()
    with pytest.warns(fxsparse.LayoutWarning, match=r"contradicts LeafLayerNorm2d 1.normalized_shape=\(12,\)"):
        gm = fxsparse.prepare(model, torch.randn(B, 3, H, W), capture="fx")
    gm = _prepare_strict(model, torch.randn(B, 3, H, W), capture="fx", channel_dims={"2": 1})
    assert [(r.dim, r.channels) for r in fxsparse.audit(gm)] == [(1, C)]


def test_two_dim_features_need_no_rule():
    gm = _prepare_strict(nn.Sequential(nn.ReLU()), torch.randn(B, 9))
    assert [(r.dim, r.channels, r.axis_rule) for r in fxsparse.audit(gm)] == [(1, 9, "the only non-batch axis")]


# ---- selection: a glob matches a site's name or its module path ---------------------------------------------
@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18().eval()


@pytest.mark.parametrize("select,kept", [
    ({"exclude": ["layer1.0.relu_1"]}, ["layer1.0.relu"]),
    ({"exclude": ["layer1.0.relu"]}, []),
    ({"include": ["layer1.0.relu_1"]}, ["layer1.0.relu_1"]),
    ({"include": ["layer1.0.relu"]}, ["layer1.0.relu", "layer1.0.relu_1"]),
])
def test_selection_by_site_name_or_module_path(resnet, select, kept):
    """BasicBlock calls `self.relu` twice: sites layer1.0.relu and layer1.0.relu_1, both of module layer1.0.relu."""
    gm = fxsparse.capture(resnet, (torch.randn(2, 3, 32, 32),))
    names = [s.name for s in fxsparse.locate(gm, select)]
    assert [n for n in names if n.startswith("layer1.0.")] == kept
    if "exclude" in select:
        assert len(names) == 17 - (2 - len(kept))


def test_backend_selection_by_site_name_or_module_path():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu = nn.Conv2d(3, 4, 1), nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(self.relu(x)))

    model, x = Twice().eval(), torch.randn(2, 3, 5, 5)
    for exclude, left in ((["relu_1"], ["relu"]), (["relu"], [])):
        torch._dynamo.reset()
        backend = fxsparse.backend(select={"exclude": exclude})
        torch.compile(model, backend=backend)(x)
        assert sorted(backend.ops) == left


# ---- property: random residual streams with permutes, token reshapes, rolls and splits -------------------------
STEPS = st.lists(st.sampled_from(["roll", "tokens", "split", "window", "opaque", "mlp", "nchw_conv", "token_mix",
                                  "heads"]),
                 min_size=50, max_size=60)


class RandomStream(nn.Module):
    """Residual blocks on a (B, H, W, C) stream; each block's branch is one of the steps above."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.embed = nn.Conv2d(3, C, 1)
        self.blocks = nn.ModuleList()
        for s in steps:
            m = nn.Module()
            m.norm = nn.LayerNorm(C)
            if s == "opaque":
                m.mix = OpaqueMix()
            elif s == "mlp":
                m.fc1, m.act, m.fc2 = nn.Linear(C, HID), nn.GELU(), nn.Linear(HID, C)
            elif s == "nchw_conv":
                m.conv, m.act = nn.Conv2d(C, C, 3, padding=1), nn.SiLU()
            elif s == "token_mix":  # ResMLP / MLP-Mixer: a Linear over the tokens, between two transposes
                m.fc = nn.Linear(H * W, H * W)
            elif s == "heads":  # an activation on channels split into (heads, head_dim), heads moved first
                m.fc, m.act = nn.Linear(C, C), nn.ReLU()
            else:
                m.fc = nn.Linear(C, C)
            self.blocks.append(m)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        for s, m in zip(self.steps, self.blocks):
            h = m.norm(x)
            if s == "roll":
                h = m.fc(torch.roll(h, 1, 2))
            elif s == "tokens":
                h = m.fc(h.reshape(B, H * W, C)).reshape(B, H, W, C)
            elif s == "split":
                a, b = h.split([5, 7], -1)
                h = m.fc(torch.cat([b, a], -1))
            elif s == "window":
                w = h.view(B, H // WS, WS, W // WS, WS, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, WS * WS, C)
                h = m.fc(w).view(B, H // WS, W // WS, WS, WS, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
            elif s == "opaque":
                h = m.mix(h.reshape(B, H * W, C)).reshape(B, H, W, C)
            elif s == "mlp":
                h = m.fc2(m.act(m.fc1(h)))
            elif s == "nchw_conv":
                h = m.act(m.conv(h.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
            elif s == "token_mix":
                h = m.fc(h.reshape(B, H * W, C).transpose(1, 2)).transpose(1, 2).reshape(B, H, W, C)
            elif s == "heads":
                h = m.act(m.fc(h).reshape(B, H, W, 3, C // 3).permute(0, 3, 1, 2, 4))
                h = h.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
            x = x + h
        return x.mean((1, 2))


@settings(max_examples=4, deadline=None)
@given(STEPS)
def test_random_streams_every_site_has_its_declared_channel_count(steps):
    model = RandomStream(steps).eval()
    gm = _prepare_strict(model, torch.randn(B, 3, H, W), placement=["activations", "residual", "mlp_out"])
    audit = fxsparse.audit(gm)
    assert sum(r.policy.endswith("residual") for r in audit) == len(steps)
    for r in audit:
        expected = HID if r.kind == "gelu" else C
        assert r.channels == expected and not r.axis_default, (r.site, r.dim, r.axis_rule)


class TokenMixStream(nn.Module):
    """ResMLP: a (B, N, C) stream; blocks alternate a Linear over the tokens (between two transposes) and an
    MLP over the channels, each behind a per-channel scale."""

    def __init__(self, depth):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 1)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            m = nn.Module()
            m.scale1, m.scale2 = nn.Parameter(torch.rand(C)), nn.Parameter(torch.rand(C))
            m.tokens = nn.Linear(H * W, H * W)
            m.fc1, m.act, m.fc2 = nn.Linear(C, HID), nn.GELU(), nn.Linear(HID, C)
            self.blocks.append(m)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for m in self.blocks:
            x = x + m.scale1 * m.tokens(x.transpose(1, 2)).transpose(1, 2)
            x = x + m.scale2 * m.fc2(m.act(m.fc1(x)))
        return x.mean(1)


def test_token_mixing_residuals_keep_the_streams_channel_axis():
    """The token-mixing branch's last axis before the transpose back is the tokens, so the operands of its
    sum disagree (dim 1 vs dim 2); the sum takes the skip's axis and every one of 2 x 26 joins has C channels."""
    gm = _prepare_strict(TokenMixStream(26).eval(), torch.randn(B, 3, H, W), placement="residual")
    audit = fxsparse.audit(gm)
    assert len(audit) == 52
    assert all(r.channels == C and not r.axis_default for r in audit), [(r.site, r.axis_rule) for r in audit]
    assert "residual stream" in audit[0].axis_rule


@pytest.mark.parametrize("name,joins", [("resmlp_12_224", 24), ("botnet26t_256", 8), ("halonet_h1", 19),
                                        ("lambda_resnet26t", 8)])
def test_timm_models_whose_sums_once_needed_a_default(name, joins):
    """The census found default axes in these (meta device): ResMLP's token-mixing sums; the attention scores
    of BoTNet and HaloNet (relative-position logits added to q @ k^T) and LambdaNet's content + position
    outputs, which are not residual joins."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    x = torch.empty(2, 3, *model.pretrained_cfg["input_size"][1:], device="meta")
    captured = fxsparse.capture(model, (x,))
    for policy in ("residual", "residual_branch"):
        gm = copy.deepcopy(captured)
        sites = fxsparse.place(gm, None, policy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxsparse.LayoutWarning)
            fxsparse.splice(gm, sites)  # the axes splice itself decides
        ops = [m for m in gm.modules() if isinstance(m, fxsparse.MeanSparse)]
        assert len(sites) == joins == len(ops)
        assert not any(op.axis_default for op in ops), [(op.site, op.axis_rule) for op in ops]
        assert not any("self_attn" in s.name for s in sites)


class HeadSplit(nn.Module):
    """EfficientViT's linear attention: a conv's channels reshaped into (heads, head_dim), moved, chunked
    into q and k, and a ReLU kernel on each: the channels of q span axes 1 and 3."""

    def __init__(self, heads=3, dim=4):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qk = nn.Conv2d(3, heads * 2 * dim, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        b, _, h, w = x.shape
        y = self.qk(x).reshape(b, self.heads, 2 * self.dim, h * w).transpose(-1, -2)
        q, k = y.chunk(2, dim=-1)
        return self.act(q) @ self.act(k).transpose(-1, -2)


def test_channels_split_over_heads_get_one_operator_per_channel():
    """The split fact is exact: the operator on (heads, head_dim) equals a per-channel MeanSparse on the conv's
    output along dim 1, with the channels in the conv's order; and the spliced view keeps batch and spatial
    sizes free, through torch.compile and torch.export too."""
    torch.manual_seed(0)
    model, x = HeadSplit().eval(), torch.randn(B, 3, H, W)
    gm = _prepare_strict(model, x)
    audit = fxsparse.audit(gm)
    assert [(r.dim, r.channels, r.axis_default) for r in audit] == [(-1, 12, False)] * 2
    assert all("axes (1, 3)" in r.axis_rule for r in audit)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # alpha = 0: bit for bit
        sparse = fxsparse.sparsify(model, [torch.randn(B, 3, H, W) for _ in range(3)], alpha=0.4, progress=False)
        ops = list(fxsparse.meansparse_ops(sparse).values())
        conv = model.qk(x)
        # the conv channels of q are, per head g, g * 2 * dim + [0, dim); of k, g * 2 * dim + [dim, 2 * dim)
        q_idx = torch.tensor([g * 8 + i for g in range(3) for i in range(4)])
        expected = []
        for op, idx in zip(ops, (q_idx, q_idx + 4)):
            part = conv[:, idx]
            band = (part - op.mean.view(1, -1, 1, 1)).abs() < op.alpha * op.std.view(1, -1, 1, 1)
            expected.append(torch.where(band, op.mean.view(1, -1, 1, 1), part))
        y = torch.empty_like(conv)
        y[:, q_idx], y[:, q_idx + 4] = expected
        y = y.reshape(B, 3, 8, H * W).transpose(-1, -2)
        q, k = y.chunk(2, dim=-1)
        assert torch.allclose(sparse(x), q.relu() @ k.relu().transpose(-1, -2), atol=1e-5)
        other = torch.randn(3, 3, 4, 8)  # other batch and spatial sizes
        assert torch.allclose(torch.compile(sparse)(other), sparse(other), atol=1e-5)
        exported = torch.export.export(sparse, (other,), strict=False).module()
        assert torch.allclose(exported(other), sparse(other), atol=1e-5)


def test_split_channel_sites_survive_a_save_and_the_compile_backend(tmp_path):
    torch.manual_seed(0)
    model, x = HeadSplit().eval(), torch.randn(B, 3, H, W)
    sparse = fxsparse.sparsify(model, [torch.randn(B, 3, H, W) for _ in range(3)], alpha=0.4, progress=False)
    fxsparse.save(sparse, tmp_path / "m.fxs")
    with torch.no_grad():
        assert torch.equal(fxsparse.load(model, tmp_path / "m.fxs")(x), sparse(x))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fxsparse.backend(fxsparse.statistics(sparse), alpha=0.4,
                                                                  compiler="eager"))
        assert torch.allclose(compiled(x), sparse(x), atol=1e-6)


def test_a_channel_shuffle_keeps_the_channel_axis():
    """ShuffleNet: (B, C, H, W) viewed as (B, groups, C / groups, H, W), transposed, merged back: every index
    of the merged axis is one channel (in shuffled order)."""
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, C, 1), nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            y = y.view(B, 3, C // 3, H, W).transpose(1, 2).reshape(B, C, H, W)
            return self.act(y)

    gm = fxsparse.capture(Shuffle(), (torch.randn(B, 3, H, W),))
    analyze(gm)
    facts = {n.name: n.meta[LAYOUT_META] for n in gm.graph.nodes}
    assert (facts["view"].split, facts["transpose"].split) == ((1, 2), (2, 1))
    assert facts["reshape"].dim == 1 and "merges the channels" in facts["reshape"].rule
