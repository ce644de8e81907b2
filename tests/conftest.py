import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True)
settings.register_profile("long", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))
# every eager MeanSparse call checks that its bounds match mean / std / alpha: a writer that forgets
# refresh_bounds() fails its tests (subprocesses inherit the variable); a test may turn it off in code
os.environ.setdefault("FXSPARSE_CHECK_BOUNDS", "1")


@pytest.fixture(scope="module")
def resnet():
    """(torchvision resnet18 at random init, its sparsified GraphModule at alpha 0.2): one per test module."""
    import fxsparse
    from fxsparse.testing.models import build

    model, _ = build("tv_resnet18")
    gm = fxsparse.sparsify(model, [torch.randn(4, 3, 32, 32) for _ in range(2)], alpha=0.2)
    return model, gm
