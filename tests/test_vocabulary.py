"""passes/vocabulary.py: one op-name normaliser for FX functions, tensor methods and ATen ops."""
import operator

import torch
from torch import fx

from fxsparse.passes import vocabulary
from fxsparse.passes.vocabulary import bare, op_name, target_name


def test_every_spelling_of_an_op_has_one_name():
    aten = torch.ops.aten
    assert {target_name(t) for t in (torch.sigmoid, "sigmoid", aten.sigmoid.default, aten.sigmoid)} == {"sigmoid"}
    assert target_name(operator.mul) == "mul" and target_name(operator.imul) == "mul_"
    assert target_name(aten.add_.Tensor, strip=True) == "add" and target_name("relu_", strip=True) == "relu"
    assert bare("_") == "_"


def test_op_name_reads_calls_only():
    g = fx.Graph()
    x = g.placeholder("x")
    f, m = g.call_function(torch.relu, (x,)), g.call_method("relu_", (x,))
    assert op_name(x) is None and op_name(f) == "relu" and op_name(m) == "relu_" and op_name(m, strip=True) == "relu"


def test_tables_are_sets_of_names():
    for name in dir(vocabulary):
        if name.endswith("_OPS") or name == "FRESH_METHODS":
            table = getattr(vocabulary, name)
            assert isinstance(table, set) and all(isinstance(n, str) for n in table), name
