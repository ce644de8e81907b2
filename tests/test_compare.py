"""The exact McNemar p-value: the integer sum's value, in milliseconds at ImageNet's counts."""
import math
import time

from hypothesis import given, settings, strategies as st

from fxsparse.robust.compare import mcnemar_exact


def _integer_sum(gained, lost):
    n, k = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300))
def test_log_space_equals_the_integer_sum(gained, lost):
    expected = _integer_sum(gained, lost)
    assert math.isclose(mcnemar_exact(gained, lost), expected, rel_tol=1e-9, abs_tol=1e-300)


def test_fast_at_imagenet_counts():
    start = time.perf_counter()
    p = mcnemar_exact(3900, 4100)  # 50,000 pairs, 8,000 discordant
    assert time.perf_counter() - start < 0.5 and 0.02 < p < 0.03
    assert mcnemar_exact(0, 50_000) == 0.0 and mcnemar_exact(25_000, 25_000) == 1.0
