"""The run-time coverage oracle (fxsparse/tools/coverage.py): every activation call the model makes is covered."""
import torch

import fxsparse
from fxsparse.tools.coverage import check_coverage, verify


def test_oracle_names_uncovered_activations():
    from fxsparse.testing.models import build

    model, size = build("tv_resnet18")
    x = torch.randn(2, 3, size, size)
    gm = fxsparse.prepare(model, x, select={"exclude": ["layer4.*"]})
    report = check_coverage(model, gm, (x,))
    assert report.original_events == report.sparsified_events == 17
    assert report.covered == 13 and not report.complete
    assert {e.module_path for e in report.uncovered} == {"layer4.0.relu", "layer4.1.relu"}
    assert "layer4" in report.summary()


def test_verify_reports_everything():
    from fxsparse.testing.models import build

    model, size = build("mixer_s16")
    result = verify(model, (torch.randn(2, 3, size, size),))
    assert result.ok and result.sites == 16 and result.capture == "fx"
