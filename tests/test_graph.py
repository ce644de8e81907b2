"""passes/graph.py: the one walk and the node predicates."""
import torch
from torch import fx, nn

from fxsparse.passes.graph import int_list, is_norm, is_pass, producer, walk


def test_walk_visits_each_node_once_starts_included():
    g = fx.Graph()
    x = g.placeholder("x")
    a, b = g.call_function(torch.relu, (x,)), g.call_function(torch.sigmoid, (x,))
    c = g.call_function(torch.add, (a, b))
    assert list(walk([c], lambda n: n.all_input_nodes)).count(x) == 1
    assert set(walk([c], lambda n: n.all_input_nodes)) == {c, a, b, x}
    assert list(walk([x], lambda n: ())) == [x]


def test_predicates():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(), nn.Linear(4, 2)))
    nodes = {str(n.target): n for n in gm.graph.nodes}
    assert producer(gm, nodes["0"]) == "first" and producer(gm, nodes["3"]) == "last"
    assert is_norm(gm, nodes["1"]) and not is_norm(gm, nodes["0"])
    assert is_pass(gm, nodes["2"]) and not is_pass(gm, nodes["0"])
    assert int_list(3) == [3] and int_list((1, 2)) == [1, 2] and int_list(True) is None and int_list("a") is None
