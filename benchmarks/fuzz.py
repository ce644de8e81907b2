"""The fuzzer's long run: many random models through the whole pipeline (fxsparse/testing/fuzz_models.py).

    python benchmarks/fuzz.py --examples 2000 [--compile-examples 20] [--seed 0]

Checks on every model: alpha = 0 bit-exact, one MeanSparse call per selected activation call (counted at run
time), every operator on the channel axis, save/load bit-exact; on `--compile-examples` of them, Inductor
equal to eager in float64. Prints what was tried and, for a failure, Hypothesis's minimal failing example.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
import traceback

import torch
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st

from fxsparse.testing.fuzz_models import SPECS, check_compiled_matches_eager, check_pipeline

ALPHAS = st.floats(0.05, 1.5)


class Tally:
    """What the run tried: examples, steps by type, activation kinds."""

    def __init__(self):
        self.examples = 0
        self.steps = collections.Counter()
        self.kinds = collections.Counter()

    def add(self, spec) -> None:
        self.examples += 1
        self.steps.update(step[0] for step in spec.steps)
        self.kinds.update(spec.kinds_used())


def run(check, examples: int, seed: int, tally: Tally) -> "str | None":
    """Run `check` on `examples` random models; the failure report, or None."""
    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(SPECS, ALPHAS)
    def fuzz(spec, alpha):
        tally.add(spec)
        check(spec, alpha)

    try:
        fuzz()
    except BaseException:  # Hypothesis re-raises the minimal failing example with its reproduction blob
        return traceback.format_exc(limit=-8)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--compile-examples", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"# {platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    for name, check, n in (("pipeline", check_pipeline, args.examples),
                           ("compiled vs eager (float64)", check_compiled_matches_eager, args.compile_examples)):
        if n == 0:
            continue
        tally = Tally()
        start = time.perf_counter()
        failure = run(check, n, args.seed, tally)
        elapsed = time.perf_counter() - start
        print(f"\n## {name}: {tally.examples} examples tried in {elapsed:.0f} s; "
              f"{'FAILED' if failure else 'no failure'}")
        print("steps tried: " + ", ".join(f"{k} {v}" for k, v in tally.steps.most_common()))
        print("activation kinds in models: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items())))
        if failure:
            print(failure)


if __name__ == "__main__":
    main()
