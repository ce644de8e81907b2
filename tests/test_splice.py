"""locate and splice (passes/locate.py, passes/splice.py) on hand-made and random small models: every spelling found
once, alpha = 0 exact."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import fx, nn

import fxsparse
from fxsparse.testing.spellings import GATES, SPELLINGS, instantiate

C, H, W = 6, 5, 4  # distinct sizes, so a wrong channel axis shows up as a wrong channel count


class Steps(nn.Module):
    """Runs a list of steps; activations are called with the spelling each step names."""

    def __init__(self, steps):
        super().__init__()
        self.steps = [s[0] if s[0] != "act" else "act" for s in steps]
        self.layers = nn.ModuleList()
        self.fns = []
        for i, step in enumerate(steps):
            kind = step[0]
            if kind == "conv":
                self.layers.append(nn.Conv2d(C, C, 3, padding=1))
            elif kind == "bn":
                bn = nn.BatchNorm2d(C)
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                self.layers.append(bn)
            elif kind == "linear":
                self.layers.append(nn.Linear(C, C))
            elif kind == "act":
                act = instantiate(step[1])
                if isinstance(act, nn.Module):
                    self.layers.append(act)
                else:
                    self.layers.append(nn.Identity())
                    self.fns.append((i, act))
            else:
                self.layers.append(nn.Identity())
        for i, fn in self.fns:  # plain attributes, the way timm keeps `self.act_fn`
            setattr(self, f"fn{i}", fn)

    def forward(self, x):
        saved, saved_nhwc = x, False
        nhwc = False
        for i, step in enumerate(self.steps):
            layer = self.layers[i]
            if step in ("conv", "bn"):
                x = layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) if nhwc else layer(x)
            elif step == "linear":
                x = layer(x) if nhwc else layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            elif step == "act":
                x = getattr(self, f"fn{i}")(x) if hasattr(self, f"fn{i}") else layer(x)
            elif step == "save":
                saved, saved_nhwc = x, nhwc
            elif step == "add" and saved_nhwc == nhwc:
                x = x + saved
            elif step == "nhwc" and not nhwc:
                x, nhwc = x.permute(0, 2, 3, 1), True
            elif step == "nchw" and nhwc:
                x, nhwc = x.permute(0, 3, 1, 2), False
        return x.permute(0, 3, 1, 2) if nhwc else x


def _act_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                              fxsparse.MeanSparse)]


def _input():
    return torch.randn(3, C, H, W)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_every_spelling_is_one_site_of_its_kind(spelling):
    name, kind, inplace, _ = spelling
    model = Steps([("conv",), ("act", spelling), ("conv",)]).eval()
    select = [kind] if kind in GATES else None
    gm = fxsparse.prepare(model, _input(), select=select)
    records = fxsparse.audit(gm)
    assert len(records) == 1, records
    r = records[0]
    assert (r.kind, r.inplace, r.channels, r.dim) == (kind, inplace, C, 1)
    x = _input()
    with torch.no_grad():
        assert torch.equal(gm(x.clone()), model(x.clone()))
    if kind in GATES:
        assert len(fxsparse.audit(fxsparse.prepare(model, _input()))) == 0


def test_inplace_activation_keeps_aliasing_semantics():
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, C, 1)

        def forward(self, x):
            y = self.conv(x)
            z = F.relu(y, inplace=True)  # mutates y: the add below sees relu(y) twice
            return z + y

    model = Alias().eval()
    torch.manual_seed(0)
    x = _input()
    gm = fxsparse.sparsify(model, [_input() for _ in range(2)], alpha=0.0)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        fxsparse.set_alpha(gm, 0.5)
        out = gm(x)
        y = model.conv(x)
        op = fxsparse.meansparse_ops(gm)["relu"]
        s = torch.relu(op.__class__.forward(op, y.clone()))
        assert torch.equal(out, s + s)


def test_activation_on_a_split_view_stays_bit_exact():
    class Gated(nn.Module):  # MambaOut-style gating: GELU on one slice of a split
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(W, 3 * 40)

        def forward(self, x):
            g, i = torch.split(self.fc(x), [40, 80], dim=-1)
            return F.gelu(g) * i[..., :40]

    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(3, C, H, W)
    gm = fxsparse.prepare(model, x)
    assert [(r.kind, r.dim, r.channels) for r in fxsparse.audit(gm)] == [("gelu", 3, 40)]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_residual_skip_reads_the_original_tensor():
    model = Steps([("conv",), ("save",), ("act", SPELLINGS[0]), ("conv",), ("add",)]).eval()
    gm = fxsparse.sparsify(model, [_input() for _ in range(2)], alpha=10.0)  # replaces nearly everything
    with torch.no_grad():
        x = _input()
        skip = model.layers[0](x)
        out = gm(x)
        op = fxsparse.meansparse_ops(gm)["layers.2"]
        expected = model.layers[3](torch.relu(op(skip))) + skip
        torch.testing.assert_close(out, expected)


def test_channel_axis_for_each_layout():
    class Layouts(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(C, 7, 1)
            self.fc = nn.Linear(W, 9)
            self.norm = nn.LayerNorm(9)
            self.head = nn.Linear(C * H * 9, 11)

        def forward(self, x):                       # (B, C, H, W)
            a = F.gelu(self.conv1d(x.flatten(2)))    # (B, 7, H*W): dim 1
            tokens = F.relu(self.norm(self.fc(x)))  # (B, C, H, 9) channel-last after Linear: dim 3
            nhwc = x.permute(0, 2, 3, 1).relu()     # permuted conv features: channels at dim 3
            vec = F.silu(self.head(tokens.flatten(1)))  # (B, 11): dim 1
            return a.sum() + tokens.sum() + nhwc.sum() + vec.sum()

    gm = fxsparse.prepare(Layouts(), _input())
    got = {r.site: (r.dim, r.channels) for r in fxsparse.audit(gm)}
    assert got == {"gelu": (1, 7), "relu": (3, 9), "relu_1": (3, C), "silu": (1, 11)}


def test_selection_by_kind_and_path():
    spell = {s[0]: s for s in SPELLINGS}
    model = Steps([("conv",), ("act", spell["nn.ReLU"]), ("conv",), ("act", spell["nn.GELU"]),
                   ("act", spell["nn.Sigmoid"])])
    x = _input()
    assert [r.kind for r in fxsparse.audit(fxsparse.prepare(model, x))] == ["relu", "gelu"]
    assert [r.kind for r in fxsparse.audit(fxsparse.prepare(model, x, select=["gelu", "sigmoid"]))] == [
        "gelu", "sigmoid"]
    sel = fxsparse.Selection(exclude=("layers.1",))
    assert [r.site for r in fxsparse.audit(fxsparse.prepare(model, x, select=sel))] == ["layers.3"]
    assert len(fxsparse.audit(fxsparse.prepare(model, x, select={"include": ["layers.[12]"]}))) == 1
    with pytest.raises(fxsparse.SelectionError, match="unknown activation kind"):
        fxsparse.prepare(model, x, select=["nope"])


def test_users_model_is_not_modified():
    model = Steps([("conv",), ("act", SPELLINGS[1]), ("conv",)])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    gm = fxsparse.sparsify(model, [_input()], alpha=0.3)
    gm.half()
    assert model.training
    assert [type(m) for m in model.modules()] == modules_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_not_a_module_is_a_clear_error():
    with pytest.raises(fxsparse.FxsparseError, match="nn.Module"):
        fxsparse.prepare(lambda x: x)


# ---- random models ---------------------------------------------------------------------------------------
DEFAULT_SPELLINGS = [s for s in SPELLINGS if s[1] not in GATES]
step = st.one_of(
    st.sampled_from([("conv",), ("bn",), ("linear",), ("save",), ("add",), ("nhwc",), ("nchw",)]),
    st.tuples(st.just("act"), st.sampled_from(DEFAULT_SPELLINGS)),
)


@given(st.lists(step, min_size=1, max_size=10), st.integers(0, 2**31 - 1))
def test_random_models_alpha_zero_exact_and_one_operator_per_activation_call(steps, seed):
    torch.manual_seed(seed)
    model = Steps([("conv",)] + steps).eval()
    x = _input()
    gm = fxsparse.prepare(model, x)
    n_acts = sum(1 for s in steps if s[0] == "act")
    ops = _act_nodes(gm)
    assert len(ops) == n_acts
    for op_node in ops:  # each operator feeds exactly its activation
        users = list(op_node.users)
        assert len(users) == 1
    assert all(r.channels == C for r in fxsparse.audit(gm))
    with torch.no_grad():
        assert torch.equal(gm(x.clone()), model(x.clone()))
    if not n_acts:
        return
    data = [_input(), _input()]
    fxsparse.calibrate(gm, data)
    seen = {op: [] for op in fxsparse.meansparse_ops(gm).values()}  # each operator's inputs and outputs
    handles = [op.register_forward_pre_hook(lambda m, a: seen[m].append([a[0].clone()])) for op in seen]
    handles += [op.register_forward_hook(lambda m, a, out: seen[m][-1].append(out.clone())) for op in seen]
    with torch.no_grad():
        for batch in data:  # alpha = 0: the inputs calibration saw
            gm(batch.clone())
        for op, calls in seen.items():  # the statistics are the pooled per-channel mean and std of those inputs
            inputs = torch.cat([c[0].movedim(op.dim, 0).reshape(op.channels, -1) for c in calls], 1).double()
            torch.testing.assert_close(op.mean.double(), inputs.mean(1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(op.std.double(), inputs.std(1, correction=0), rtol=1e-4, atol=1e-5)
            calls.clear()
        fxsparse.set_alpha(gm, 0.3)
        gm(x.clone())
    for h in handles:
        h.remove()
    replaced = 0
    for op, [(i, out)] in seen.items():  # every operator applied the formula to what reached it
        shape = [1] * i.dim()
        shape[op.dim] = -1
        mean, std = op.mean.view(shape), op.std.view(shape)
        assert torch.equal(out, torch.where((i - mean).abs() < 0.3 * std, mean.expand_as(i), i))
        replaced += int((out != i).sum())
    assert replaced > 0


def test_fake_shape_propagation_shortcut_for_linear_layers_gives_the_real_shapes():
    """passes/shapes.py skips F.linear's slow fake-tensor decomposition for plain nn.Linear layers; the
    shapes it records equal real propagation's, on a permuted input and next to a hooked layer."""
    from torch.fx.passes.shape_prop import ShapeProp

    from fxsparse.passes.shapes import SHAPE_META, propagate_shapes

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(6, 5), nn.Linear(5, 7), nn.GELU()

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1))))

    gm = fx.symbolic_trace(Tokens())
    gm.fc2.register_forward_hook(lambda mod, args, out: None)  # hooked: takes the normal path
    x = torch.randn(2, 6, 3, 4)
    assert propagate_shapes(gm, [x]) == "fake"
    fake = {n.name: n.meta[SHAPE_META] for n in gm.graph.nodes if n.op != "output"}
    ShapeProp(gm).propagate(x)
    real = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"}
    assert fake == real and fake["fc1"] == (2, 3, 4, 5) and fake["fc2"] == (2, 3, 4, 7)
