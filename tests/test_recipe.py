"""fxsparse.Recipe (fxsparse/api.py): the intent of `prepare` as one frozen, validated object, recorded under one
meta key and written by `save`, so that `load` redoes the same prepare."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxsparse
from fxsparse._meta import PREPARE_META
from fxsparse.api import Recipe


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(self.act(self.conv(x))))


def test_recipe_normalises_and_is_frozen():
    recipe = Recipe(selection=["relu"], placement="activations", channel_dims={"act": 1}, capture="fx")
    assert recipe.selection == fxsparse.Selection(kinds=("relu",))
    assert recipe.placement == ("activations",) and recipe.channel_dims == (("act", 1),)
    assert Recipe().placement == ("activations",) and Recipe().capture == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.capture = "export"
    assert fxsparse.Recipe is Recipe


@pytest.mark.parametrize("fields, error, match", [
    ({"capture": "magic"}, fxsparse.CaptureError, "capture method"),
    ({"placement": "nowhere"}, fxsparse.SelectionError, "unknown placement"),
    ({"selection": ["no_such_kind"]}, fxsparse.SelectionError, "no_such_kind"),
    ({"channel_dims": {"act": "1"}}, fxsparse.SelectionError, "int axes"),
])
def test_a_bad_recipe_is_refused_when_built(fields, error, match):
    with pytest.raises(error, match=match):
        Recipe(**fields)


def test_prepare_with_a_recipe_equals_prepare_with_its_keywords():
    x, model = torch.randn(2, 3, 8, 8), Net().eval()
    by_keywords = fxsparse.prepare(model, x, ["relu"], placement="activations", channel_dims={"act": 1})
    by_recipe = fxsparse.prepare(model, x, recipe=Recipe(["relu"], "activations", {"act": 1}))
    assert by_recipe.meta[PREPARE_META] == by_keywords.meta[PREPARE_META]
    assert [(r.site, r.dim, r.axis_rule) for r in fxsparse.audit(by_recipe)] == [
        (r.site, r.dim, r.axis_rule) for r in fxsparse.audit(by_keywords)]


def test_keywords_and_a_recipe_together_are_refused():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(fxsparse.FxsparseValueError, match="not both"):
        fxsparse.prepare(Net(), x, ["relu"], recipe=Recipe())
    with pytest.raises(fxsparse.FxsparseValueError, match="not both"):
        fxsparse.sparsify(Net(), [x], capture="fx", recipe=Recipe())
    with pytest.raises(fxsparse.FxsparseTypeError, match="fxsparse.Recipe"):
        fxsparse.prepare(Net(), x, recipe={"capture": "fx"})


def test_the_record_is_written_once_and_round_trips():
    x, model = torch.randn(2, 3, 8, 8), Net().eval()
    recipe = Recipe({"kinds": ["relu"], "exclude": ["relu"]}, "activations", {"act": 1}, "fx")
    gm = fxsparse.prepare(model, x, recipe=recipe)
    record = gm.meta[PREPARE_META]
    assert Recipe.from_record(record) == recipe
    assert record["input_shapes"] == [[2, 3, 8, 8]]


def test_sparsify_and_submodule_use_the_recipe(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(Net(), nn.Flatten()).eval()
    recipe = Recipe(["relu"], channel_dims={"act": 1})  # names inside the part
    gm = fxsparse.sparsify(model, [x], alpha=0.3, submodule="0", recipe=recipe)
    part = gm.get_submodule("0")
    assert Recipe.from_record(part.meta[PREPARE_META]) == recipe
    assert part.meta[PREPARE_META]["submodule"] == "0"
    path = tmp_path / "part.fxsparse"
    fxsparse.save(gm, path)
    loaded = fxsparse.load(model, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


@settings(max_examples=20, deadline=None)
@given(kinds=st.one_of(st.none(), st.lists(st.sampled_from(["relu", "gelu", "silu"]), unique=True, min_size=1)),
       exclude=st.lists(st.sampled_from(["act", "layer*", "relu_1"]), unique=True),
       placement=st.sampled_from(["activations", "residual", ["activations", "mlp_out"], "swin"]),
       dims=st.dictionaries(st.sampled_from(["act", "blocks.*"]), st.integers(-3, 3), max_size=2),
       capture=st.sampled_from(["auto", "fx", "export"]))
def test_every_recipe_survives_its_record(kinds, exclude, placement, dims, capture):
    recipe = Recipe({"kinds": kinds, "exclude": exclude}, placement, dims, capture)
    assert Recipe.from_record(recipe.to_record()) == recipe
