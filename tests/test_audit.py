"""fxsparse.audit (fxsparse/audit.py): one record per site, as Markdown, JSON and networkx; state_dict names."""
import json


import fxsparse


def test_audit_views(resnet):
    _, gm = resnet
    fxsparse.set_alpha(gm, 0.2)
    audit = fxsparse.audit(gm)
    assert len(audit) == 17
    r = audit[0]
    assert (r.site, r.module_path, r.kind, r.node, r.dim, r.channels) == ("relu", "relu", "relu", "relu", 1, 64)
    assert r.axis_rule == "BatchNorm2d bn1" and not r.axis_default and 0 < r.replaced < 1
    doc = json.loads(audit.to_json())
    assert doc["capture"]["path"] == "fx" and len(doc["sites"]) == 17
    assert doc["sites"][0]["site"] == "relu"
    md = audit.to_markdown()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 18 and "17 sites" in md
    g = audit.to_networkx()
    marked = [n for n, d in g.nodes(data=True) if d.get("meansparse")]
    assert len(marked) == 17
    import networkx as nx
    assert nx.is_directed_acyclic_graph(g)
    for n in marked:  # each operator feeds an activation node
        assert any(g.nodes[s].get("activation") == "relu" for s in g.successors(n))


def test_state_dict_keys_read_like_the_model(resnet):
    _, gm = resnet
    keys = gm.state_dict().keys()
    assert "layer1.0.relu_meansparse.mean" in keys and "layer1.0.relu_1_meansparse.std" in keys
    assert "layer1.0.conv1.weight" in keys
