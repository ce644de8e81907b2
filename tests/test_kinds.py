"""The activation registry (passes/kinds.py): a user module and function registered as a kind become sites."""
import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.passes.kinds import unregister_activation

C, H, W = 6, 5, 4


def _input():
    return torch.randn(3, C, H, W)


class Squareplus(nn.Module):
    def forward(self, x):
        return 0.5 * (x + torch.sqrt(x * x + 4))


def squareplus(x):
    return 0.5 * (x + torch.sqrt(x * x + 4))


def test_register_activation_user_module_and_function():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, C, 1)
            self.act = Squareplus()

        def forward(self, x):
            return squareplus(self.act(self.conv(x)))

    fxsparse.register_activation("squareplus", modules=[Squareplus], functions=[squareplus])
    try:
        with pytest.raises(fxsparse.FxsparseError, match="already exists"):
            fxsparse.register_activation("squareplus")
        gm = fxsparse.prepare(Net(), _input())
        assert [(r.site, r.kind) for r in fxsparse.audit(gm)] == [("act", "squareplus"), ("squareplus", "squareplus")]
    finally:
        unregister_activation("squareplus")
