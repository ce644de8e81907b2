"""Conventions other tools use, accepted as they spell them."""
import pytest
import torch

import fxsparse
from fxsparse.robust.attacks import pgd
from fxsparse.testing.bad_inputs import IMAGES, Y, small_model


@pytest.mark.parametrize("spelling, norm", [("Linf", "linf"), ("L2", "l2"), ("LINF", "linf")])
def test_norm_as_autoattack_spells_it(spelling, norm):
    model = small_model().eval()
    report = fxsparse.evaluate(model, (IMAGES, Y), eps=0.1, norm=spelling, attacks=["clean", "pgd:steps=1"])
    assert report.norm == norm
    same = fxsparse.evaluate(model, (IMAGES, Y), eps=0.1, norm=norm, attacks=["clean", "pgd:steps=1"])
    assert report["pgd"].plain == same["pgd"].plain
    assert torch.equal(pgd(model, IMAGES, Y, 0.1, norm=spelling, steps=1), pgd(model, IMAGES, Y, 0.1, norm=norm, steps=1))
