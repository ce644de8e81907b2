"""On a CUDA device (skipped elsewhere): no host sync in the forward, at most one per calibration batch,
calibration equal to the CPU's, compiled (reduce-overhead: CUDA graphs) equal to eager, bfloat16 end to end.
benchmarks/gpu.sh runs these with the GPU benchmarks."""
import warnings

import pytest
import torch

import fxsparse
from fxsparse.testing.models import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _sparsified(dtype=torch.float32, device="cuda"):
    torch.manual_seed(0)
    model, size = build("tv_resnet18")
    model = model.to(device, dtype)
    data = [torch.randn(8, 3, size, size, device=device, dtype=dtype) for _ in range(3)]
    return model, fxsparse.sparsify(model, data, alpha=0.2, progress=False), data


@pytest.mark.parametrize("kernel", ["plain", "fused"])
def test_forward_never_synchronises(kernel):
    _, gm, data = _sparsified()
    fxsparse.set_eager_kernel(kernel, gm, data[0])  # the warm-up compiles the fused kernels first
    try:
        with torch.no_grad():
            torch.cuda.set_sync_debug_mode("error")
            try:
                for x in data:
                    gm(x)
                fxsparse.set_alpha(gm, 0.3)
                gm(data[0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        fxsparse.set_eager_kernel("plain")


def _syncs_during_calibration(gm, data) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fxsparse.calibrate(gm, data, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_calibration_syncs_at_most_once_per_batch_and_equals_the_cpu():
    model, gm, data = _sparsified()
    few = _syncs_during_calibration(gm, data[:1])
    many = _syncs_during_calibration(gm, data[:1] * 5)
    assert many - few <= 4  # the finiteness check, once per batch: nothing per site
    cpu = fxsparse.calibrate(fxsparse.prepare(model.cpu(), data[0].cpu()), [x.cpu() for x in data],
                             progress=False)
    fxsparse.calibrate(gm, data, progress=False)
    for name, op in fxsparse.meansparse_ops(gm).items():
        ref = fxsparse.meansparse_ops(cpu)[name]
        torch.testing.assert_close(op.mean.cpu(), ref.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(op.std.cpu(), ref.std, rtol=1e-4, atol=1e-5)


def test_reduce_overhead_compile_matches_eager():
    _, gm, data = _sparsified(torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(gm, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(data[0])
        torch.testing.assert_close(out, gm(data[0]), rtol=1e-9, atol=1e-9)
        fxsparse.set_alpha(gm, 0.5)
        torch.testing.assert_close(compiled(data[0]).clone(), gm(data[0]), rtol=1e-9, atol=1e-9)


def test_bfloat16_end_to_end():
    model, gm, data = _sparsified(torch.bfloat16)
    with torch.no_grad():
        y = gm(data[0])
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    for op in fxsparse.meansparse_ops(gm).values():
        assert op.mean.dtype == torch.bfloat16 and op.calibrated
    fxsparse.set_alpha(gm, 0.0)
    with torch.no_grad():
        assert torch.equal(gm(data[1]), model(data[1]))  # alpha = 0: the original's bits


def test_compiled_calibration_on_the_device():
    model, gm, data = _sparsified()
    torch._dynamo.reset()
    compiled = fxsparse.calibrate(fxsparse.prepare(model, data[0]), data, compile=True, progress=False)
    for name, op in fxsparse.meansparse_ops(compiled).items():
        ref = fxsparse.meansparse_ops(gm)[name]
        torch.testing.assert_close(op.mean, ref.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(op.std, ref.std, rtol=1e-4, atol=1e-5)
