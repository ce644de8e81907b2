"""Fuzzing: random small models through the whole pipeline (bounded here; benchmarks/fuzz.py runs it long).

The tests at the end are the minimal failing examples of two bugs the fuzzer found (now fixed): torch.fx
tracing `x += y` out of place, and the channel axis lost through a reshape followed by a permute.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fxsparse

from fxsparse.testing.fuzz_models import SPECS, check_compiled_matches_eager, check_pipeline

ALPHAS = st.floats(0.05, 1.5)


@given(SPECS, ALPHAS)
def test_fuzzed_models_exact_at_alpha_zero_one_operator_per_call_and_save_load_exact(spec, alpha):
    check_pipeline(spec, alpha)


@pytest.mark.slow
@settings(max_examples=3)
@given(SPECS, ALPHAS)
def test_fuzzed_models_compiled_equal_eager_in_float64(spec, alpha):
    check_compiled_matches_eager(spec, alpha)


def test_augmented_assignment_keeps_aliases():
    class Alias(nn.Module):
        def forward(self, x):
            saved = x
            x += 1          # in place: `saved` sees it too
            return torch.relu(x + saved)

    x = torch.randn(2, 3)
    gm = fxsparse.prepare(Alias(), x)
    assert torch.equal(gm(x.clone()), Alias()(x.clone()))


def test_channel_axis_followed_through_reshape_then_permute():
    class ReshapePermute(nn.Module):
        def forward(self, x):  # (B, 6, 5, 4) -> NHWC (B, 5, 4, 6): 6 channels on the last axis
            return F.celu(x.reshape(-1, 6, 5, 4).permute(0, 2, 3, 1))

    gm = fxsparse.prepare(ReshapePermute(), torch.randn(3, 6, 5, 4))
    assert [(r.dim, r.channels) for r in fxsparse.audit(gm)] == [(3, 6)]
