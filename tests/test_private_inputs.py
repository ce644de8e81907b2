"""Private inputs (passes/private_inputs.py): the graph analysis that marks a fresh tensor only the operator reads (the
audit's `private_input`), and the operator, which never overwrites an input unless the activation itself was
in place (overwriting a private input needed a private torch API to be safe, so it is gone)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
import fxsparse.compile.fused as fused
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
    from fxsparse.passes.private_inputs import producer_hooks

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
    """gm(x) (without autograd unless `grad`), and per operator call whether it returned its input."""
    seen, plain = [], ops.mean_sparse_bounds

    def recording(t, *args, **kwargs):
        out = plain(t, *args, **kwargs)
        seen.append(out is t)
        return out

    monkeypatch.setattr(ops, "mean_sparse_bounds", recording)
    with torch.set_grad_enabled(grad):
        y = gm(x)
    monkeypatch.setattr(ops, "mean_sparse_bounds", plain)
    return y, seen


@pytest.mark.parametrize("kernel", ["plain", pytest.param("fused", marks=pytest.mark.slow)])
def test_eager_inference_never_overwrites_an_input_that_was_not_in_place(monkeypatch, kernel):
    """A hook that kept the producer's output (or a detached view of it, then removed itself) sees the
    original values, whichever eager kernel runs."""
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused, "_eager_kernel", kernel)
    monkeypatch.setattr(ops, "_eager_kernel_hook", fused._run_fused if kernel == "fused" else None)
    model, gm, data = _prepared()
    kept = []

    def grab_once(mod, args, out):
        kept.extend([out, out.detach()])
        handle.remove()

    handle = gm.fc1.register_forward_hook(grab_once)
    y, seen = _overwrote(gm, data[0], monkeypatch)
    assert seen == [False] * 5
    assert all(torch.equal(k, model.fc1(data[0])) for k in kept)
    torch.testing.assert_close(y, gm(data[0]), rtol=0, atol=0)


def test_autograd_and_compile_never_overwrite(monkeypatch):
    model, gm, data = _prepared()
    xg = data[0].clone().requires_grad_(True)
    y, seen = _overwrote(gm, xg, monkeypatch, grad=True)
    y.sum().backward()
    assert seen and not any(seen) and torch.isfinite(xg.grad).all()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(data[0])
    assert explained.graph_break_count == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gm)(data[1]), gm(data[1]))
