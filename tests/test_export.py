"""Deployment: a sparsified model exported to ONNX (run in ONNX Runtime) and to an AOTInductor package gives
the eager outputs (alpha > 0, so the operator is at work)."""
import pytest
import torch

import fxsparse
from fxsparse.testing.bad_inputs import Small


def _deployed():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    gm = fxsparse.sparsify(Small().eval(), [x], alpha=0.3, progress=False)
    assert any(r.replaced for r in fxsparse.audit(gm))  # the operator replaces something
    return gm, torch.rand(4, 3, 16, 16)


@pytest.mark.slow
def test_onnx_runtime_matches_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    gm, x = _deployed()
    torch.onnx.export(gm, (x,), str(tmp_path / "m.onnx"), dynamo=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(torch.from_numpy(out) - gm(x).detach()).max() < 1e-5


@pytest.mark.slow
def test_aotinductor_package_matches_eager(tmp_path):
    gm, x = _deployed()
    package = torch._inductor.aoti_compile_and_package(torch.export.export(gm, (x,)),
                                                       package_path=str(tmp_path / "m.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    assert (compiled(x) - gm(x)).abs().max() < 1e-5
