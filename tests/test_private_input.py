"""Private inputs (passes/fresh.py): the eager inference kernel overwrites a fresh tensor that only the
operator reads, and never one that something else can still see."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
import fxsparse.ops as ops


class OwnLinear(nn.Linear):
    def forward(self, x):  # as a leaf, an override might return anything: not a fresh producer
        return super().forward(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.gelu = nn.GELU()
        self.conv = nn.Conv1d(16, 16, 1)
        self.relu = nn.ReLU()
        self.own = OwnLinear(16, 16)
        self.silu = nn.SiLU()

    def forward(self, x):
        h = self.gelu(self.fc1(x))                         # fc1 output: read by the operator only
        c = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.relu(c)                               # transposed view of the conv output: not fresh
        h = self.silu(h * 2)                               # an out-of-place product: fresh
        return F.gelu(self.own(h)) + F.gelu(x[..., :1])  # traced through to F.linear / the model's input


def _prepared(alpha=0.5):
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.randn(4, 50, 12) for _ in range(3)]
    return model, fxsparse.sparsify(model, data, alpha=alpha, progress=False), data


def test_private_inputs_are_fresh_single_reader_values():
    _, gm, _ = _prepared()
    private = {r.site: r.private_input for r in fxsparse.audit(gm)}
    assert private == {"gelu": True, "relu": False, "silu": True, "gelu_1": True, "gelu_2": False}


def test_library_modules_are_fresh_only_with_their_own_forward():
    from fxsparse.passes.fresh import producer_hooks

    root = nn.Module()
    root.fc, root.own = nn.Linear(3, 3), OwnLinear(3, 3)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a, b = graph.call_module("fc", (x,)), graph.call_module("own", (x,))
    ra, rb = graph.call_function(torch.relu, (a,)), graph.call_function(torch.relu, (b,))
    out = graph.call_function(torch.add, (ra, rb), {"out": x})
    graph.output(graph.call_function(torch.relu, (out,)))
    gm = torch.fx.GraphModule(root, graph)
    assert producer_hooks(gm, a, ra) == (gm.fc._forward_hooks,)
    assert producer_hooks(gm, b, rb) is None and producer_hooks(gm, x, a) is None
    assert producer_hooks(gm, out, next(iter(out.users))) is None  # out= writes into an existing tensor


def _overwrote(gm, x, monkeypatch, grad=False):
    """gm(x) (without autograd unless `grad`), and per operator call whether it returned its input (wrapped
    around the op's function: a hook on the operator itself would turn overwriting off)."""
    seen, plain = [], ops.mean_sparse

    def recording(t, *args, **kwargs):
        out = plain(t, *args, **kwargs)
        seen.append(out is t)
        return out

    monkeypatch.setattr(ops, "mean_sparse", recording)
    with torch.set_grad_enabled(grad):
        y = gm(x)
    monkeypatch.setattr(ops, "mean_sparse", plain)
    return y, seen


def test_eager_inference_overwrites_private_inputs_with_the_same_result(monkeypatch):
    monkeypatch.setattr(ops, "FUSED_MIN_ELEMENTS", 0)
    _, gm, data = _prepared()
    y, seen = _overwrote(gm, data[0], monkeypatch)
    assert seen == [True, False, True, True, False]
    for op in fxsparse.ops.meansparse_ops(gm).values():
        op.private_input = False
    y_plain, seen = _overwrote(gm, data[0], monkeypatch)
    assert not any(seen) and torch.equal(y, y_plain)


def test_a_forward_hook_on_the_producer_keeps_its_output_untouched(monkeypatch):
    monkeypatch.setattr(ops, "FUSED_MIN_ELEMENTS", 0)
    model, gm, data = _prepared()
    kept = []
    handle = gm.fc1.register_forward_hook(lambda mod, args, out: kept.append(out))
    op = fxsparse.ops.meansparse_ops(gm)["gelu"]
    assert not op.may_overwrite()
    _, seen = _overwrote(gm, data[0], monkeypatch)
    assert not seen[0] and torch.equal(kept[0], model.fc1(data[0]))
    handle.remove()
    assert op.may_overwrite()
    with torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None):
        assert not op.may_overwrite()
    assert op.may_overwrite()
    # a deep copy keeps the link between the copied layer's hooks and the copied operator
    twin = copy.deepcopy(gm)
    twin.fc1.register_forward_hook(lambda mod, args, out: None)
    assert not fxsparse.ops.meansparse_ops(twin)["gelu"].may_overwrite() and op.may_overwrite()


def test_autograd_views_and_compile_never_overwrite(monkeypatch):
    monkeypatch.setattr(ops, "FUSED_MIN_ELEMENTS", 0)
    model, gm, data = _prepared()
    kept = []

    def grab_once(mod, args, out):  # keeps a detached view and removes itself before the operator runs
        kept.append(out.detach())
        handle.remove()

    handle = gm.fc1.register_forward_hook(grab_once)
    _, seen = _overwrote(gm, data[0], monkeypatch)
    assert not seen[0] and torch.equal(kept[0], model.fc1(data[0]))  # the shared storage forbade it
    op = fxsparse.ops.meansparse_ops(gm)["gelu"]
    with torch.no_grad():
        fresh = gm.fc1(data[0])
        alias = fresh.detach()
        assert not ops._sole_owner(fresh) and op(fresh) is not fresh and torch.equal(alias, fresh)
        del alias
        pre = op.register_forward_pre_hook(lambda mod, args: None)  # a hook on the operator itself
        assert not op.may_overwrite() and op(fresh) is not fresh
        pre.remove()
        assert op.may_overwrite() and op(fresh) is fresh

    xg = data[0].clone().requires_grad_(True)
    y, seen = _overwrote(gm, xg, monkeypatch, grad=True)
    y.sum().backward()
    assert seen and not any(seen) and torch.isfinite(xg.grad).all()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(data[0])
    assert explained.graph_break_count == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gm)(data[1]), gm(data[1]))
