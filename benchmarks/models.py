"""Per-model costs of the pass: sites found, capture+locate+splice time, calibration time against a plain
eval forward over the same batches, and torch.compile (Inductor) time of the sparsified model.

    python benchmarks/models.py [--size 64] [--batches 8] [--batch 16] [--no-compile]

Random-init models (no weights needed). Ratios come from one process; times are medians of `--repeats`.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import fxsparse
from fxsparse.testing.models import MODELS, build
from perf import forward_and_calibration


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"# inputs {args.batches} batches x {args.batch} x 3 x {args.size} x {args.size}, float32, CPU\n")
    print("| model | sites | graph nodes | capture+splice | calibration | plain forward | calib / forward "
          "| compile (first call) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, size = build(name)
        size = size if name in ("vit_tiny", "mixer_s16") else args.size
        data = [torch.randn(args.batch, 3, size, size) for _ in range(args.batches)]
        example = data[0][:2]
        t_prep = median_time(lambda: fxsparse.prepare(model, example), args.repeats)
        gm = fxsparse.prepare(model, example)
        plain, calib = forward_and_calibration(model, gm, data)
        plain()
        t_fwd, t_cal = [], []
        for _ in range(args.repeats):  # interleaved
            t_fwd.append(median_time(plain, 1))
            t_cal.append(median_time(calib, 1))
        t_fwd, t_cal = statistics.median(t_fwd), statistics.median(t_cal)
        compile_s = "-"
        if not args.no_compile:
            fxsparse.set_alpha(gm, 0.2)
            torch._dynamo.reset()
            compiled = torch.compile(gm)
            t = time.perf_counter()
            with torch.no_grad():
                compiled(data[0])
            compile_s = f"{time.perf_counter() - t:.1f} s"
        print(f"| {name} | {len(fxsparse.audit(gm))} | {len(gm.graph.nodes)} | {t_prep:.2f} s | {t_cal:.2f} s "
              f"| {t_fwd:.2f} s | {t_cal / t_fwd:.2f} | {compile_s} |", flush=True)


if __name__ == "__main__":
    main()
