"""Composite activations (passes/composites.py): a hand-written SiLU, GELU, Mish is one site, gates are not."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.tools.coverage import check_coverage, record_activations

C = 6


def hand_silu(x):
    return x * torch.sigmoid(x)


def hand_quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def hand_mish(x):
    return x * torch.tanh(F.softplus(x))


def hand_gelu_half_last(x):
    return x * (1.0 + torch.erf(x / math.sqrt(2.0))) * 0.5


def hand_gelu_half_first(x):
    return 0.5 * x * (1 + torch.erf(x * 0.7071067811865476))


def hand_silu_inplace(x):
    return x.mul_(x.sigmoid())


COMPOSITES = [(hand_silu, "silu"), (hand_quick_gelu, "quick_gelu"), (hand_mish, "mish"),
              (hand_gelu_half_last, "gelu"), (hand_gelu_half_first, "gelu"), (hand_silu_inplace, "silu")]


class Composite(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 1)

    def forward(self, x):
        y = self.conv1(x)
        skip = y.clone()
        return self.conv2(self.fn(y)) + skip


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("fn,kind", COMPOSITES, ids=[f.__name__ for f, _ in COMPOSITES])
def test_composite_activation_is_one_site_before_its_input(fn, kind, capture):
    torch.manual_seed(0)
    model = Composite(fn).eval()
    x = torch.randn(2, C, 5, 4)
    gm = fxsparse.prepare(model, x, capture=capture)
    records = fxsparse.audit(gm)
    assert [(r.kind, r.channels, r.dim) for r in records] == [(kind, C, 1)]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    report = check_coverage(model, gm, (x,))
    assert report.complete and report.sparsified_events == 1, report.summary()
    fxsparse.calibrate(gm, [torch.randn(4, C, 5, 4)])
    fxsparse.set_alpha(gm, 0.5)
    with torch.no_grad():
        y = model.conv1(x)
        op = fxsparse.meansparse_ops(gm)[records[0].site]
        expected = model.conv2(fn(op(y.clone()))) + y
        torch.testing.assert_close(gm(x), expected)


def test_gates_are_not_composites():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, C, 1)
            self.fc = nn.Conv2d(C, C, 1)

        def forward(self, x):
            x = self.conv(x)
            return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))

    model = SqueezeExcite().eval()
    gm = fxsparse.prepare(model, torch.randn(2, C, 4, 4))
    assert len(fxsparse.audit(gm)) == 0
    assert record_activations(model, (torch.randn(2, C, 4, 4),)) == []
