"""Every recipe of the README's "Any model" section runs as written (slow: real architectures)."""
import pathlib
import re

import pytest
import torch

import fxsparse

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _recipes():
    text = README.read_text()
    start = text.index("## Any model")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_shows_each_recipe():
    blocks = _recipes()
    assert len(blocks) == 5
    joined = "\n".join(blocks)
    for needle in ("forward_loop=loop", "example_inputs=pairs[0]", 'submodule="backbone"', "fxsparse.backend(",
                   '"pixel_values"', '{"x":'):
        assert needle in joined


@pytest.mark.slow
@pytest.mark.parametrize("index", range(5))
def test_recipe_runs(index, tmp_path, monkeypatch):
    block = _recipes()[index]
    if "transformers" in block:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {}
    exec(compile(block, f"README recipe {index}", "exec"), namespace)
    models = [v for v in namespace.values() if isinstance(v, torch.nn.Module)]
    if "submodule=" in block:
        det, robust = namespace["det"], namespace["robust_det"]
        assert isinstance(robust, type(det)) and len(fxsparse.audit(namespace["again"])) > 20
    elif "backend(" not in block:
        sparsified = [m for m in models if fxsparse.meansparse_ops(m)]
        assert sparsified and all(all(r.calibrated for r in fxsparse.audit(m)) for m in sparsified)
