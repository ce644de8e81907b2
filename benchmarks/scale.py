"""Speed-up of `fxsparse evaluate` under torchrun: the same digits evaluation on 1 and on N CPU processes.

    python benchmarks/scale.py                 # 1 and 2 processes, threads split between them
    python benchmarks/scale.py --procs 1 2 4 --threads 8

Each run is `torchrun --nproc-per-node=P -m fxsparse evaluate digits ...` with OMP_NUM_THREADS = threads / P,
so every run uses the same cores. The runs alternate (1, P, 1, P, ...) and the median wall time of each is
reported with the speed-up, and the JSON reports of the runs are checked to give the same accuracies.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

COMMAND = ["evaluate", "digits", "--epochs", "30", "--attacks", "clean", "pgd:steps=200", "--alpha", "0.2",
           "--format", "json", "--no-baseline", "--batch-size", "64"]


def run(procs: int, threads: int, cache: str) -> tuple:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // procs)), FXSPARSE_CACHE=cache)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={procs}", "-m", "fxsparse", *COMMAND],
                         env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    report = json.loads(out.stdout[out.stdout.index("{"):])
    return seconds, [(a["attack"], a["plain"], a["bpda"]) for a in report["sparsified"]["attacks"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = tempfile.mkdtemp()
    run(1, args.threads, cache)  # trains and caches the digits model, warms the disk cache
    times = {p: [] for p in args.procs}
    results = {}
    for _ in range(args.repeats):
        for p in args.procs:
            seconds, accuracies = run(p, args.threads, cache)
            times[p].append(seconds)
            results.setdefault(p, accuracies)
    base = statistics.median(times[args.procs[0]])
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; `python benchmarks/scale.py` ({args.repeats} alternating runs)\n")
    print("| processes | threads each | median wall time | speed-up | same accuracies as 1 process |")
    print("|---|---|---|---|---|")
    for p in args.procs:
        median = statistics.median(times[p])
        print(f"| {p} | {max(1, args.threads // p)} | {median:.1f} s | {base / median:.2f}x | "
              f"{results[p] == results[args.procs[0]]} |")


if __name__ == "__main__":
    main()
