"""MeanSparse's robust-accuracy-vs-alpha curve on real data, with the adaptive (BPDA) attack beside the plain one.

For every seed and every activation the MeanSparse paper studies (ReLU, GELU, SiLU, ELU, PSSiLU):

1. split scikit-learn's digits (1797 8 x 8 images) 70 / 10 / 20 into train / validation / test, stratified,
   shuffled by the seed (`fxsparse.tools.demo.load_digits_splits`);
2. adversarially train the demo's CNN with that activation (PGD-AT, L-inf eps = 0.1 on [0, 1] pixels);
3. sparsify it, calibrating on the training split only;
4. the alpha curve on the test split: clean, PGD, BPDA-PGD (straight-through gradients) and Square (scores
   only) for every alpha of the grid, and the adaptive worst case ("worst of all": every column of
   `fxsparse.evaluate`, smooth-band surrogates and transfer from alpha 0 included);
5. alpha chosen on the validation split by `fxsparse.search_alpha` (its default score, the adaptive worst case
   of PGD: as is, BPDA, smooth-band surrogates, transfer; at most 1 point of clean accuracy lost), then measured on the test split; alongside, what picking alpha on the test split would have claimed;
6. APGD-CE and APGD-T (reference implementation) at alpha = 0 and at the chosen alpha, on a test subset;
   the standard AutoAttack there too with `--autoattack N` (slow on CPU).

    python benchmarks/reproduce.py                 # the default configuration, results in benchmarks/out/
    python benchmarks/reproduce.py --report        # tables (Markdown) and benchmarks/reproduce_alpha.png

Runs are resumable (one JSON per seed and activation) and deterministic given the seed; `--config large` is
the configuration meant for a GPU session.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn


import fxsparse
from fxsparse.tools import demo
from fxsparse.robust.evaluation import evaluate
from fxsparse.robust.search import DEFAULT_ALPHAS, search_alpha

HERE = os.path.dirname(os.path.abspath(__file__))
ALPHAS = DEFAULT_ALPHAS
CONFIGS = {
    # about 30 minutes on two busy CPU cores
    "small": dict(seeds=(0, 1, 2), epochs=30, width=32, eps=0.1, train_steps=5, pgd_steps=20, square_queries=300,
                  subset=100, apgd_steps=100, apgd_targets=3, max_clean_drop=0.01),
    # for a GPU session: wider net, longer training, full budgets on the whole test split
    # seconds, to check the script end to end
    "smoke": dict(seeds=(0,), epochs=1, width=8, eps=0.1, train_steps=1, pgd_steps=2, square_queries=10,
                  subset=20, apgd_steps=5, apgd_targets=2, max_clean_drop=0.01),
    "large": dict(seeds=(0, 1, 2, 3, 4), epochs=60, width=64, eps=0.1, train_steps=10, pgd_steps=50,
                  square_queries=5000, subset=None, apgd_steps=100, apgd_targets=9, max_clean_drop=0.01),
}


class PSSiLU(nn.Module):
    """Parametric shifted SiLU, PSSiLU(x) = x * (sigmoid(alpha * x) - beta) / (1 - beta), with learnable
    alpha > 0 and beta in [0, 1): Peng et al., "Robust Principles: Architectural Design Principles for
    Adversarially Robust CNNs" (BMVC 2023), one of the activations the MeanSparse paper evaluates (its RaWRN
    models). As in the authors' code, the constraints are kept by using |alpha| and |beta| (beta capped
    below 1 here so the division stays finite)."""

    def __init__(self, alpha: float = 1.0, beta: float = 1e-8):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta.abs().clamp(max=0.99)
        return x * (torch.sigmoid(self.alpha.abs() * x) - beta) / (1 - beta)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU, "pssilu": PSSiLU}
if "pssilu" not in {k.name for k in fxsparse.activation_kinds()}:
    fxsparse.register_activation("pssilu", modules=[PSSiLU])


def build(activation: str, width: int, seed: int) -> nn.Module:
    """The demo's CNN (conv-BN-act x 3) with its three activations replaced (their names stay relu1..3)."""
    torch.manual_seed(seed)
    model = demo.DigitsCNN(width)
    for name in ("relu1", "relu2", "relu3"):
        setattr(model, name, ACTIVATIONS[activation]())
    return model


def _row(report) -> Dict[str, float]:
    """clean, each attack's columns (as is, BPDA, and the survivors-only smooth / annealed / transfer ones),
    the adaptive worst case over every column of every attack, and the old plain + BPDA worst case."""
    out = {"clean": report["clean"].plain}
    for r in report.results[1:]:
        key = r.attack.replace("-", "_")
        out[key] = r.plain
        if r.attack != "square":
            out[f"{key}_bpda"] = r.bpda
            out.update({f"{key}_{m}": r.column(m) for m in ("smooth", "anneal", "transfer") if m in r.correct})
    out["worst"] = report.worst()  # the adaptive worst case (evaluate's default modes)
    out["worst_bpda"] = report.worst(("plain", "bpda"))
    return out


def run_one(activation: str, seed: int, cfg: dict, out_dir: str, autoattack: int, log=print,
            device: str = "cpu") -> dict:
    path = os.path.join(out_dir, f"{activation}-s{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        if not autoattack or "autoattack" in done:
            return done
    else:
        done = None
    splits = {k: (x.to(device), y.to(device)) for k, (x, y) in demo.load_digits_splits(seed).items()}
    train_cfg = dict(demo.CONFIG, seed=seed, epochs=cfg["epochs"], width=cfg["width"], eps=cfg["eps"],
                     train_steps=cfg["train_steps"])
    weights = os.path.join(out_dir, f"{activation}-s{seed}.pt")
    model = build(activation, cfg["width"], seed).to(device)
    t0 = time.time()
    if os.path.exists(weights):
        model.load_state_dict(torch.load(weights, weights_only=True, map_location=device))
    else:
        demo.train_pgd_at(splits, train_cfg, log=None, model=model)
        torch.save(model.state_dict(), weights)
    model.eval()
    train_s = time.time() - t0
    gm = fxsparse.sparsify(model, demo.batches(splits["train"], 256), alpha=0.0, progress=False)
    eps = cfg["eps"]
    if done is None:
        done = _measure(model, gm, splits, cfg, log)
        done.update(activation=activation, seed=seed, train_seconds=round(train_s, 1),
                    sizes={k: len(v[1]) for k, v in splits.items()}, sites=len(fxsparse.audit(gm)),
                    device=str(torch.cuda.get_device_name() if device.startswith("cuda") else device))
    if autoattack:
        done["autoattack"] = _autoattack(model, gm, splits, done["chosen"]["alpha"], eps, autoattack)
    with open(path + ".tmp", "w") as f:
        json.dump(done, f, indent=1)
    os.replace(path + ".tmp", path)
    log(f"{activation} seed {seed}: chosen alpha {done['chosen']['alpha']}, test BPDA-PGD "
        f"{100 * done['chosen']['pgd_bpda']:.1f}% vs {100 * done['curve'][0]['pgd']:.1f}% at alpha 0")
    return done


def _measure(model, gm, splits, cfg, log) -> dict:
    eps, test = cfg["eps"], splits["test"]
    attacks = ["clean", f"pgd:steps={cfg['pgd_steps']}", f"square:queries={cfg['square_queries']}"]
    curve = []
    for a in ALPHAS:
        fxsparse.set_alpha(gm, a)
        report = evaluate(model if a == 0 else gm, test, eps=eps, attacks=attacks, seed=1)
        curve.append({"alpha": a, **_row(report)})
    fxsparse.set_alpha(gm, 0.0)
    search = search_alpha(gm, splits["val"], eps=eps, attack=f"pgd:steps={cfg['pgd_steps']}",  # adaptive score
                          alphas=ALPHAS, max_clean_drop=cfg["max_clean_drop"], seed=2)
    chosen = next(dict(r) for r in curve if r["alpha"] == search.alpha)
    # what choosing on the test split by plain PGD (the paper's protocol, with a plain attack) would claim
    base_clean = curve[0]["clean"]
    admissible = [r for r in curve if r["clean"] >= base_clean - cfg["max_clean_drop"]]
    on_test = max(admissible, key=lambda r: (r["pgd"], -r["alpha"]))
    subset = {}
    apgd = [f"apgd-ce:steps={cfg['apgd_steps']}", f"apgd-t:steps={cfg['apgd_steps']},targets={cfg['apgd_targets']}"]
    for label, a in (("alpha0", 0.0), ("chosen", search.alpha)):
        fxsparse.set_alpha(gm, a)
        report = evaluate(model if a == 0 else gm, test, eps=eps, attacks=["clean"] + apgd, seed=3,
                          max_examples=cfg["subset"])
        subset[label] = {"alpha": a, "n": report.n, **_row(report)}
    fxsparse.set_alpha(gm, 0.0)
    return {"curve": curve, "chosen": chosen, "on_test_by_pgd": on_test, "subset": subset,
            "search": [t.to_dict() for t in search.table], "config": cfg}


def _autoattack(model, gm, splits, alpha, eps, n) -> dict:
    """Standard AutoAttack on the first n test images, at alpha = 0 and at the chosen alpha (both columns)."""
    out = {}
    for label, a in (("alpha0", 0.0), ("chosen", alpha)):
        fxsparse.set_alpha(gm, a)
        report = evaluate(model if a == 0 else gm, splits["test"], eps=eps, attacks=["clean", "autoattack"],
                          seed=4, max_examples=n)
        out[label] = {"alpha": a, "n": report.n, "clean": report["clean"].plain,
                      "autoattack": report["autoattack"].plain, "autoattack_bpda": report["autoattack"].bpda,
                      "seconds": round(report["autoattack"].seconds, 1)}
    fxsparse.set_alpha(gm, 0.0)
    return out


# ------------------------------------------------------------------------------------------------------------
# Report

def _load(out_dir: str) -> List[dict]:
    rows = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                rows.append(json.load(f))
    return rows


def _ms(values) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _t95(n: int) -> float:
    return {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
            14: 2.14, 19: 2.09, 24: 2.06, 29: 2.05}.get(n, 1.96 if n > 29 else 2.1)


def report(out_dir: str, png: str) -> str:
    runs = _load(out_dir)
    if not runs:
        raise SystemExit(f"no results in {out_dir}; run the reproduction first")
    acts = [a for a in ACTIVATIONS if any(r["activation"] == a for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    cfg = runs[0]["config"]
    lines = [f"{len(runs)} runs: activations {', '.join(acts)}; seeds {seeds}; test split {runs[0]['sizes']['test']} "
             f"images, validation {runs[0]['sizes']['val']}; L-inf eps = {cfg['eps']}; PGD-{cfg['pgd_steps']} "
             f"(one random start); Square {cfg['square_queries']} queries. Mean ± std over seeds, in %.", ""]
    lines += ["### Alpha curve on the test split", "",
              "| activation | alpha | clean | PGD | BPDA-PGD | Square | worst of all |", "|---|---|---|---|---|---|---|"]
    for act in acts:
        rs = [r for r in runs if r["activation"] == act]
        for i, a in enumerate(ALPHAS):
            pts = [r["curve"][i] for r in rs]
            lines.append(f"| {act} | {a:g} | {_ms(p['clean'] for p in pts)} | {_ms(p['pgd'] for p in pts)} | "
                         f"{_ms(p['pgd_bpda'] for p in pts)} | {_ms(p['square'] for p in pts)} | "
                         f"{_ms(p['worst'] for p in pts)} |")
    lines += ["", "### Alpha chosen on the validation split (adaptive worst-case PGD score, clean drop <= "
              f"{100 * cfg['max_clean_drop']:g} point), measured on the test split", "",
              "| activation | chosen alphas | clean (alpha 0 -> chosen) | PGD | BPDA-PGD | Square | worst of all | "
              "BPDA-PGD gain | plain-PGD gain if alpha were picked on test by plain PGD |",
              "|---|---|---|---|---|---|---|---|---|"]
    gains = []
    for act in acts:
        rs = [r for r in runs if r["activation"] == act]
        base = [r["curve"][0] for r in rs]
        ch = [r["chosen"] for r in rs]
        gain = [c["pgd_bpda"] - b["pgd"] for c, b in zip(ch, base)]
        gains += gain
        claim = [r["on_test_by_pgd"]["pgd"] - r["curve"][0]["pgd"] for r in rs]
        chosen = ", ".join(f"{c['alpha']:g}" for c in ch)
        lines.append(
            f"| {act} | {chosen} | {_ms(b['clean'] for b in base)} -> "
            f"{_ms(c['clean'] for c in ch)} | {_ms(b['pgd'] for b in base)} -> {_ms(c['pgd'] for c in ch)} | "
            f"{_ms(b['pgd'] for b in base)} -> {_ms(c['pgd_bpda'] for c in ch)} | "
            f"{_ms(b['square'] for b in base)} -> {_ms(c['square'] for c in ch)} | "
            f"{_ms(b['worst'] for b in base)} -> {_ms(c['worst'] for c in ch)} | {_signed(gain)} | "
            f"{_signed(claim)} |")
    lines += ["", f"Subset ({runs[0]['subset']['alpha0']['n']} test images): reference APGD-CE and APGD-T "
              f"({cfg['apgd_steps']} steps, {cfg['apgd_targets']} target classes)", "",
              "| activation | APGD-CE alpha 0 | APGD-CE chosen | BPDA-APGD-CE chosen | APGD-T alpha 0 | APGD-T chosen | "
              "BPDA-APGD-T chosen |", "|---|---|---|---|---|---|---|"]
    for act in acts:
        rs = [r["subset"] for r in runs if r["activation"] == act]
        lines.append(f"| {act} | {_ms(s['alpha0']['apgd_ce'] for s in rs)} | {_ms(s['chosen']['apgd_ce'] for s in rs)} | "
                     f"{_ms(s['chosen']['apgd_ce_bpda'] for s in rs)} | {_ms(s['alpha0']['apgd_t'] for s in rs)} | "
                     f"{_ms(s['chosen']['apgd_t'] for s in rs)} | {_ms(s['chosen']['apgd_t_bpda'] for s in rs)} |")
    aa = sorted((r for r in runs if "autoattack" in r), key=lambda r: (acts.index(r["activation"]), r["seed"]))
    if aa:
        lines += ["", "Standard AutoAttack (reference, APGD-CE + APGD-T + FAB-T + Square)", "",
                  "| activation | seed | n | alpha 0 | chosen alpha | AutoAttack chosen | BPDA-AutoAttack chosen |",
                  "|---|---|---|---|---|---|---|"]
        for r in aa:
            a0, c = r["autoattack"]["alpha0"], r["autoattack"]["chosen"]
            lines.append(f"| {r['activation']} | {r['seed']} | {a0['n']} | {100 * a0['autoattack']:.1f} | "
                         f"{c['alpha']:g} | {100 * c['autoattack']:.1f} | {100 * c['autoattack_bpda']:.1f} |")
        for key, label in (("autoattack", "AutoAttack"), ("autoattack_bpda", "BPDA-AutoAttack")):
            values = [r["autoattack"]["chosen"][key] - r["autoattack"]["alpha0"]["autoattack"] for r in aa]
            lines.append(f"\n{label}, chosen alpha minus alpha 0: {_interval(values)}")
    def change(part, key, base_key=None):
        if part == "test":
            return [r["chosen"][key] - r["curve"][0][base_key or key] for r in runs]
        return [r["subset"]["chosen"][key] - r["subset"]["alpha0"][base_key or key] for r in runs]

    lines += ["", "Paired changes, chosen alpha minus alpha 0, over all runs (mean, std, 95% t-interval of the mean). "
              "Each attack below is one run with the same seed on both models, so the comparisons are matched; at "
              "alpha 0 the BPDA run equals the plain one.", ""]
    for label, values in (
            ("PGD (as is), test split", change("test", "pgd")),
            ("BPDA-PGD, test split", change("test", "pgd_bpda", "pgd")),
            ("Square, test split", change("test", "square")),
            ("APGD-CE (as is), test subset", change("subset", "apgd_ce")),
            ("BPDA-APGD-CE, test subset", change("subset", "apgd_ce_bpda", "apgd_ce")),
            ("APGD-T (as is), test subset", change("subset", "apgd_t")),
            ("BPDA-APGD-T, test subset", change("subset", "apgd_t_bpda", "apgd_t")),
            ("worst case of PGD, BPDA-PGD and Square, test split (pools one more attack run at the chosen alpha)",
             change("test", "worst"))):
        lines.append(f"- {label}: {_interval(values)}")
    _plot(runs, acts, png)
    return "\n".join(lines) + "\n"


def _interval(values) -> str:
    n, mean = len(values), statistics.mean(values)
    sd = statistics.stdev(values) if n > 1 else float("nan")
    half = _t95(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return (f"{100 * mean:+.2f} points (std {100 * sd:.2f}, n = {n}; {100 * (mean - half):+.2f} to "
            f"{100 * (mean + half):+.2f})")


def _signed(values) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:+.1f}"
    return f"{statistics.mean(values):+.1f} ± {statistics.stdev(values):.1f}"


def _plot(runs, acts, png: str) -> None:
    """Top: accuracy vs alpha (mean ± std over seeds). Bottom: the paired change from alpha 0 (mean ± std), where
    the differences between seeds' splits and models cancel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(acts), figsize=(3.0 * len(acts), 5.2), sharey="row", squeeze=False)
    series = (("clean", "clean", "tab:gray"), ("pgd", "PGD", "tab:blue"), ("pgd_bpda", "BPDA-PGD", "tab:red"),
              ("square", "Square", "tab:green"), ("worst", "worst of all", "black"))
    for col, act in enumerate(acts):
        rs = [r for r in runs if r["activation"] == act]
        for row, paired in ((0, False), (1, True)):
            ax = axes[row][col]
            for key, label, color in series:
                if paired and key == "clean":
                    continue
                values = [[100 * (r["curve"][i][key] - (r["curve"][0][key] if paired else 0)) for r in rs]
                          for i in range(len(ALPHAS))]
                m = [statistics.mean(v) for v in values]
                s = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                ax.plot(ALPHAS, m, marker="o", ms=3, color=color, label=label, lw=1.2)
                ax.fill_between(ALPHAS, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color,
                                alpha=0.12, linewidth=0)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(act)
            else:
                ax.axhline(0, color="gray", lw=0.8)
                ax.set_xlabel("alpha")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[1][0].set_ylabel("change from alpha 0 (points)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"MeanSparse on sklearn digits, PGD-AT CNNs, L-inf eps 0.1; mean ± std over "
                 f"{len({r['seed'] for r in runs})} seeds", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    plt.close(fig)
    from PIL import Image  # a matplotlib dependency; a 64-colour palette keeps the committed PNG small

    Image.open(buffer).convert("RGB").quantize(colors=64).save(png, optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--activations", nargs="+", choices=sorted(ACTIVATIONS), default=list(ACTIVATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, help="override the configuration's seeds")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/out/reproduce-CONFIG)")
    parser.add_argument("--autoattack", type=int, default=0, metavar="N",
                        help="also run standard AutoAttack on the first N test images (seed 0 only unless --seeds)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (training, attacks and evaluation)")
    parser.add_argument("--report", action="store_true", help="summarise the results folder and draw the plot")
    parser.add_argument("--png", default=os.path.join(HERE, "reproduce_alpha.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS[args.config])
    out_dir = args.out or os.path.join(HERE, "out", f"reproduce-{args.config}")
    os.makedirs(out_dir, exist_ok=True)
    if args.report:
        print(report(out_dir, args.png))
        return 0
    seeds = tuple(args.seeds) if args.seeds else cfg["seeds"]
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"config {args.config}, seeds {seeds}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    start = time.time()
    for seed in seeds:
        for act in args.activations:
            aa = args.autoattack if (args.autoattack and (args.seeds or seed == seeds[0])) else 0
            run_one(act, seed, cfg, out_dir, aa, log=lambda m: print(f"[{time.time() - start:6.0f} s] {m}",
                                                                         flush=True), device=args.device)
    print(f"done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
