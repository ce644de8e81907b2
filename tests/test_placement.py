"""Placement policies: residual joins, MLP outputs, and the authors' ConvNeXt and Swin presets."""
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn

import fxsparse
from fxsparse.passes.placement import mlp_outputs, resolve

import timm  # noqa: E402


def _graph_input(gm, site):
    """The node feeding the operator of `site`, and the nodes reading the operator's output."""
    node = next(n for n in gm.graph.nodes if n.meta.get("fxsparse_site") == site)
    return node.args[0], list(node.users)


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18().eval()


def test_residual_joins_of_resnet18(resnet):
    gm = fxsparse.capture(resnet, (torch.randn(2, 3, 32, 32),))
    joins = fxsparse.residual_joins(gm)
    assert len(joins) == 8  # two BasicBlocks in each of four stages
    downsample = [j for j in joins if j.skip.meta.get("fxsparse_path") == "layer2.0.downsample.1"]
    assert len(downsample) == 1 and downsample[0].branch.target == "layer2.0.bn2"  # projection shortcut
    plain = next(j for j in joins if j.node.meta.get("fxsparse_path") == "layer1.0")
    assert plain.branch.target == "layer1.0.bn2" and plain.skip.target == "maxpool"  # identity: the block input


@pytest.mark.parametrize("placement,count", [
    ("activations", 17), ("residual", 8), ("residual_branch", 8), ("mlp_out", 0), (["activations", "residual"], 17),
])
def test_policies_on_resnet18_keep_outputs_at_alpha_zero(resnet, placement, count):
    x = torch.randn(2, 3, 32, 32)
    if count:
        gm = fxsparse.prepare(resnet, x, placement=placement)
    else:
        with pytest.warns(fxsparse.NoActivationWarning, match="no site for placement"):
            gm = fxsparse.prepare(resnet, x, placement=placement)
    ops = fxsparse.meansparse_ops(gm)
    assert len(ops) == count
    with torch.no_grad():
        assert torch.equal(gm(x), resnet(x))
    if placement == "residual":
        assert all(op.policy == "residual" and op.kind == "add" and op.dim == 1 for op in ops.values())
        src, users = _graph_input(gm, "layer1.0.add")
        assert src.op == "call_function" and [u.target for u in users] == ["layer1.0.relu"]
    if placement == ["activations", "residual"]:  # the relu after each add already reads the sum: one operator
        policies = Counter(op.policy for op in ops.values())
        assert policies == {"activations": 9, "activations+residual": 8}


def test_sparsify_with_placement_calibrates_and_attacks_through(resnet):
    data = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    gm = fxsparse.sparsify(resnet, data, alpha=0.3, placement=["residual", "residual_branch"], progress=False)
    audit = fxsparse.audit(gm)
    assert Counter(r.policy for r in audit) == {"residual": 8, "residual_branch": 8}
    assert all(r.calibrated and 0 < r.replaced < 1 for r in audit)
    assert audit.to_markdown().splitlines()[0].endswith("| policy |")
    assert all(s["policy"] in ("residual", "residual_branch") for s in audit.to_dict()["sites"])
    x = data[0].clone().requires_grad_(True)
    with fxsparse.straight_through(gm):
        gm(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _preset(name, placement, block_class):
    """(model, gm, audit, block paths) for a timm model built on the meta device (structure only)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    gm = fxsparse.prepare(model, torch.randn(2, 3, 224, 224, device="meta"), placement=placement)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == block_class]
    return model, gm, fxsparse.audit(gm), blocks


def test_convnext_preset_matches_the_authors_placement():
    """Their ConvNeXt-L: before each MLP GELU, and after each block's drop_path (the branch, before the add)."""
    _, gm, audit, blocks = _preset("convnext_atto", "convnext", "ConvNeXtBlock")
    assert len(blocks) == 12 and len(audit) == 24
    for block in blocks:
        act = next(r for r in audit if r.site == f"{block}.mlp.act")
        assert act.kind == "gelu" and act.policy == "activations"
        src, _ = _graph_input(gm, act.site)
        assert src.target == f"{block}.mlp.fc1"  # convnext_atto's MLP is 1x1 convs (conv_mlp)
        branch = next(r for r in audit if r.site == f"{block}.branch")
        assert branch.policy == "residual_branch" and branch.dim == 1
        src, users = _graph_input(gm, branch.site)
        assert src.target == f"{block}.drop_path" and len(users) == 1 and "add" in users[0].name


def test_swin_preset_matches_the_authors_placement():
    """Their Swin-L: after fc1 (the GELU's input), after fc2, after each of the block's two residual adds."""
    model, gm, audit, blocks = _preset("swin_tiny_patch4_window7_224", "swin", "SwinTransformerBlock")
    assert len(blocks) == 12 and len(audit) == 48
    assert Counter(r.policy for r in audit) == {"activations": 12, "mlp_out": 12, "residual": 24}
    for block in blocks:
        src, _ = _graph_input(gm, f"{block}.mlp.act")
        assert src.target == f"{block}.mlp.fc1"
        src, _ = _graph_input(gm, f"{block}.mlp.fc2")
        assert src.target == f"{block}.mlp.fc2"
        for add in (f"{block}.add", f"{block}.add_1"):
            record = next(r for r in audit if r.site == add)
            assert record.kind == "add" and record.channels == model.get_submodule(block).norm1.normalized_shape[0]
            assert record.dim in (2, 3) and not record.axis_rule.startswith("rank-")  # channels last, found


def test_vit_joins_skip_position_embeddings_and_find_mlps():
    model = timm.create_model("test_vit").eval()
    x = torch.randn(2, *model.default_cfg["input_size"])
    gm = fxsparse.prepare(model, x, placement=["residual", "mlp_out"])
    audit = fxsparse.audit(gm)
    depth = len(model.blocks)
    assert Counter(r.policy for r in audit) == {"residual": 2 * depth, "mlp_out": depth}
    assert all(r.dim == 2 for r in audit)
    assert len(mlp_outputs(fxsparse.capture(model, (x,)))) == depth
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_placement_names_and_errors():
    assert resolve(None) == ("activations",)
    assert resolve("swin") == ("activations", "mlp_out", "residual")
    assert resolve(["residual", "convnext"]) == ("residual", "activations", "residual_branch")
    with pytest.raises(fxsparse.SelectionError, match="unknown placement"):
        resolve("everywhere")
    with pytest.raises(fxsparse.SelectionError, match="empty"):
        resolve([])
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(fxsparse.NoActivationWarning):
        gm = fxsparse.prepare(model, torch.randn(2, 4), select={"exclude": ["*"]}, placement=["activations", "mlp_out"])
    assert not fxsparse.meansparse_ops(gm)


class TanhGelu(nn.Module):
    """A residual block whose activation is a hand-written tanh GELU: its x + c * x ** 3 is not a join."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        h = 0.5 * h * (1 + torch.tanh(0.7978845608 * (h + 0.044715 * h ** 3)))
        return x + h


def test_arithmetic_adds_are_not_residual_joins():
    model = TanhGelu().eval()
    gm = fxsparse.capture(model, (torch.randn(2, 8),))
    joins = fxsparse.residual_joins(gm)
    assert len(joins) == 1 and joins[0].skip.op == "placeholder"



class Rotary(nn.Module):
    """Rotary embeddings: q * cos + rotate(q) * sin with buffer tables is arithmetic, not a residual join."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 8)
        self.register_buffer("cos", torch.rand(5, 8))
        self.register_buffer("sin", torch.rand(5, 8))

    def forward(self, x):
        q = self.qkv(x)
        q = q * self.cos + torch.cat([-q[..., 4:], q[..., :4]], -1) * self.sin
        return x + q


def test_rotary_sums_of_buffers_are_not_residual_joins():
    gm = fxsparse.capture(nn.Sequential(Rotary()).eval(), (torch.randn(2, 5, 8),))
    joins = fxsparse.residual_joins(gm)
    assert len(joins) == 1 and joins[0].skip.op == "placeholder"


class RelPosAttention(nn.Module):
    """Attention whose logits get a relative-position term computed from q by a learned table (BoTNet)."""

    def __init__(self, dim=8, tokens=5):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(tokens, dim))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        attn = (q @ k.transpose(-1, -2)) * 0.3
        rel = (q @ self.rel.t()).unsqueeze(-1).expand(-1, -1, -1, q.shape[1])
        attn = attn + (rel[..., 0] + rel[..., 1])  # sums of scores: no channel axis
        return x + self.proj(attn.softmax(-1) @ v)


def test_attention_scores_are_not_residual_joins():
    gm = fxsparse.capture(nn.Sequential(RelPosAttention()).eval(), (torch.randn(2, 5, 8),))
    joins = fxsparse.residual_joins(gm)
    assert len(joins) == 1 and joins[0].skip.op == "placeholder"


class SharedInner(nn.Module):
    """Two results of one inner tensor summed (LambdaNet's content + position), inside a real residual block."""

    def __init__(self):
        super().__init__()
        self.qkv, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.qkv(x)
        return x + (self.a(h) + self.b(h))


def test_two_results_of_one_inner_tensor_are_not_a_residual_join():
    gm = fxsparse.capture(nn.Sequential(SharedInner()).eval(), (torch.randn(2, 5, 8),))
    joins = fxsparse.residual_joins(gm)
    assert len(joins) == 1 and joins[0].skip.op == "placeholder"
