"""The adaptive columns on the demo's trained digits CNN (issue 20): every column at several alphas, the
portfolio's cost against one APGD-CE run, and what search_alpha picks by the adaptive worst case vs BPDA.

    OMP_NUM_THREADS=1 python benchmarks/adaptive.py [--attack apgd-ce] [--alphas 0,0.1,0.25,0.5] [--search]

Prints Markdown (the tables in benchmarks/RESULTS.md and the README's "Honest robustness")."""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import fxsparse
from fxsparse.robust.evaluation import MODE_TITLES
from fxsparse.tools import demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="apgd-ce")
    parser.add_argument("--alphas", default="0,0.1,0.25,0.5")
    parser.add_argument("--eps", type=float, default=demo.CONFIG["eps"])
    parser.add_argument("--search", action="store_true", help="also compare search_alpha's scores")
    parser.add_argument("--no-table", action="store_true", help="skip the table (with --search)")
    parser.add_argument("--search-attack", default=None, help="the search's attack (default: --attack)")
    parser.add_argument("--compare-anneal", default=None, metavar="TAUS",
                        help="only compare the anneal column's default schedule with TAUS (e.g. 0.3/0.03) at "
                             "--alphas: robust accuracy and seconds of each, standalone")
    args = parser.parse_args()
    splits = demo.load_digits_splits()
    model = demo.trained_model(splits, log=lambda *_: None)
    gm = fxsparse.sparsify(model, demo.batches(splits["train"], 256), alpha=0.0, progress=False)
    test = splits["test"]
    if args.compare_anneal:
        return compare_anneal(gm, test, args)
    modes = list(MODE_TITLES)
    print(f"digits CNN (PGD-AT), {len(test[1])} test images, L-inf eps={args.eps:g}, attack {args.attack}; "
          "standalone columns (every example attacked), then the survivors-only portfolio\n")
    print("| alpha | clean | " + " | ".join(MODE_TITLES[m] for m in modes) + " | worst (found by) | "
          "one run | portfolio | sum of standalone |")
    print("|" + "---|" * (len(modes) + 6))
    for alpha in (float(a) for a in args.alphas.split(",")) if not args.no_table else ():
        fxsparse.set_alpha(gm, alpha)
        alone = fxsparse.evaluate(gm, test, eps=args.eps, attacks=["clean", args.attack], progress=False,
                                  survivors_only=False)
        one = alone.results[1]
        t = time.perf_counter()
        portfolio = fxsparse.evaluate(gm, test, eps=args.eps, attacks=[args.attack], progress=False)
        cost = time.perf_counter() - t
        t = time.perf_counter()
        fxsparse.evaluate(gm, test, eps=args.eps, attacks=[args.attack], modes=("plain",), progress=False)
        single = time.perf_counter() - t
        found = ", ".join(f"{m} {k}" for m, k in portfolio.found().items() if k)
        print(f"| {alpha:g} | {100 * alone['clean'].plain:.1f} | "
              + " | ".join(f"{100 * one.column(m):.1f}" for m in modes)
              + f" | {100 * portfolio.worst():.1f} ({found}) | {single:.1f} s | {cost:.1f} s | {one.seconds:.1f} s |",
              flush=True)
    if args.search:
        print("\n| score | chosen alpha | verdict | validation robust | test worst case at the pick |\n"
              "|---|---|---|---|---|")
        for score in ("bpda", "adaptive"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fxsparse.SearchWarning)
                s = fxsparse.search_alpha(gm, splits["val"], eps=args.eps, score=score, progress=False,
                                          attack=args.search_attack or args.attack)
            ev = fxsparse.evaluate(gm, test, eps=args.eps, attacks=[args.search_attack or args.attack],
                                   progress=False)
            print(f"| {score} | {s.alpha} | {s.verdict} | {100 * s.robust:.1f} | {100 * ev.worst():.1f} |",
                  flush=True)


def compare_anneal(gm, test, args) -> None:
    """The anneal column alone under its default schedule and under `--compare-anneal` (issue 23: the
    column's passes dominate the portfolio's cost), every example attacked."""
    from fxsparse.robust import evaluation

    default = evaluation.SURROGATES["anneal"]
    print("| alpha | schedule | anneal column robust | seconds |\n|---|---|---|---|")
    for alpha in (float(a) for a in args.alphas.split(",")):
        fxsparse.set_alpha(gm, alpha)
        for spec in (default, "anneal:taus=" + args.compare_anneal):
            evaluation.SURROGATES["anneal"] = spec
            try:
                t = time.perf_counter()
                ev = fxsparse.evaluate(gm, test, eps=args.eps, attacks=[args.attack], modes=("anneal",),
                                       progress=False, survivors_only=False)
                seconds = time.perf_counter() - t
            finally:
                evaluation.SURROGATES["anneal"] = default
            print(f"| {alpha:g} | {spec} | {100 * ev.results[0].column('anneal'):.1f} | {seconds:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
