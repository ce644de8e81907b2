"""`fxsparse demo`: what the library is for, on real data, with no download.

1. Adversarially train (PGD-AT) a small CNN on scikit-learn's bundled digits (1797 8 x 8 images): cached.
2. Sparsify it with one call, calibrating on the training split.
3. Choose alpha on the validation split with `fxsparse.search_alpha` (its default score: the adaptive worst
   case of APGD-CE as is, through identity BPDA, smooth-band surrogates and by transfer; at most 1 point of
   clean accuracy lost), and print its table, intervals and verdict.
4. Report clean, PGD, BPDA-APGD-CE and adaptive worst-case accuracy on the test split, before and after, the
   paired comparison (exact McNemar test) and the audit of where the operators went.

The adaptive worst case is the honest column: MeanSparse's zero gradient inside the band hinders a plain
gradient attack, and even identity BPDA overstates the gain that surrogate gradients remove.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.config import cache_dir as _cache_dir
from fxsparse.robust.attacks import pgd
from fxsparse.robust.compare import label
from fxsparse.robust.search import DEFAULT_ALPHAS, default_attack

# eps = 0.1 on [0, 1] pixels (1.6 of the 16 grey levels of the digits)
CONFIG = dict(seed=0, epochs=30, batch=64, lr=0.05, eps=0.1, train_steps=5, eval_steps=20, width=32)
ALPHAS = DEFAULT_ALPHAS
FORCED_ALPHA = 0.5  # a row at this alpha beside the chosen one, so the operator is seen at work


class DigitsCNN(nn.Sequential):
    """conv-BN-ReLU x3 with a pooling step, global average pooling, linear head (about 60k parameters)."""

    def __init__(self, width: int = 32, classes: int = 10):
        w = width
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(1, w, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(w)),
            ("relu1", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)), ("bn2", nn.BatchNorm2d(2 * w)),
            ("relu2", nn.ReLU(inplace=True)),
            ("pool", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)), ("bn3", nn.BatchNorm2d(2 * w)),
            ("relu3", nn.ReLU(inplace=True)),
            ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(2 * w, classes)),
        ]))


def load_digits_splits(seed: int = 0) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Stratified 70 / 10 / 20 train / validation / test split of sklearn's digits, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise fxsparse.errors.MissingDependencyError("the demo needs scikit-learn: pip install 'fxsparse[demo]'") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    parts: Dict[str, List[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test, n_val = round(0.2 * len(idx)), round(0.1 * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    out = {}
    for k, v in parts.items():
        idx = torch.cat(v)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        out[k] = (x[idx], y[idx])
    return out


def batches(split: Tuple[torch.Tensor, torch.Tensor], size: int):
    x, y = split
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def train_pgd_at(splits, config=CONFIG, log=print, model: Optional[nn.Module] = None) -> nn.Module:
    """Madry-style adversarial training: every step trains on PGD examples of the current model (a DigitsCNN
    unless `model` is given, e.g. with other activations, by benchmarks/reproduce.py)."""
    torch.manual_seed(config["seed"])
    model = DigitsCNN(config["width"]) if model is None else model
    x, y = splits["train"]
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(x) + config["batch"] - 1) // config["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], epochs=config["epochs"],
                                                steps_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(config["seed"])
    for epoch in range(config["epochs"]):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), config["batch"]):
            xb, yb = x[order[i:i + config["batch"]]], y[order[i:i + config["batch"]]]
            model.eval()  # attack with eval BN statistics, train on the result
            adv = pgd(model, xb, yb, config["eps"], steps=config["train_steps"], seed=epoch * 1000 + i)
            model.train()
            loss = F.cross_entropy(model(adv), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch + 1) % 10 == 0:
            log(f"  epoch {epoch + 1}/{config['epochs']}: adversarial loss {loss.item():.3f}")
    return model.eval()


def cache_dir() -> str:
    return _cache_dir()


def trained_model(splits, config=CONFIG, retrain: bool = False, log=print) -> nn.Module:
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"demo-digits-cnn-{key}.pt")
    model = DigitsCNN(config["width"])
    if os.path.exists(path) and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"loaded the adversarially trained CNN from {path}")
        return model.eval()
    log(f"adversarially training a small CNN on sklearn digits (PGD-AT, eps={config['eps']}, "
        f"{config['epochs']} epochs; cached afterwards) ...")
    t = time.time()
    model = train_pgd_at(splits, config, log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # atomic: a concurrent reader sees the old file or the new one
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    log(f"  trained in {time.time() - t:.0f} s, saved to {path}")
    return model


def run(retrain: bool = False, config=CONFIG, alphas=ALPHAS, log=print, attack: Optional[str] = None) -> Dict[str, object]:
    """The demo. `attack` scores alpha and is the strong test attack, run in every column (as is, BPDA,
    surrogates, transfer); default: the search's default, APGD-CE (or a scheduled PGD with restarts without
    pyautoattack)."""
    t0 = time.time()
    attack = attack or default_attack()
    splits = load_digits_splits(config["seed"])
    log(f"data: sklearn digits, train {len(splits['train'][0])} / val {len(splits['val'][0])} / "
        f"test {len(splits['test'][0])} images")
    model = trained_model(splits, config, retrain, log)

    gm = fxsparse.sparsify(model, batches(splits["train"], 256), alpha=0.0, progress=None)
    log(f"sparsified: {len(fxsparse.audit(gm))} MeanSparse sites; choosing alpha on the validation split "
        f"({attack}, the adaptive worst case over every gradient column, at most 1 point of clean accuracy lost)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxsparse.SearchWarning)  # its notes are printed with the table
        search = fxsparse.search_alpha(gm, splits["val"], eps=config["eps"], attack=attack,
                                       alphas=alphas, max_clean_drop=0.01, progress=None)
    log(search.to_markdown())
    alpha = search.alpha

    attacks = ["clean", f"pgd:steps={config['eval_steps']}", attack]
    common = dict(eps=config["eps"], attacks=attacks, progress=None)  # bars when stderr is a terminal
    before = fxsparse.evaluate(model, splits["test"], **common)
    after = fxsparse.evaluate(gm, splits["test"], baseline=before, **common)
    rows = [("original", 0.0, before), ("sparsified (chosen)", alpha, after)]
    if isinstance(alpha, float) and alpha != FORCED_ALPHA:  # the operator at work, whatever the search chose
        fxsparse.set_alpha(gm, FORCED_ALPHA)
        replaced = [r.replaced for r in fxsparse.audit(gm) if r.replaced is not None]
        rows.append((f"sparsified (alpha forced, {100 * sum(replaced) / max(len(replaced), 1):.0f}% of "
                     "activations replaced)", FORCED_ALPHA, fxsparse.evaluate(gm, splits["test"], **common)))
        fxsparse.set_alpha(gm, alpha)
    strong = label(after.results[2])
    test = {name: {"clean": ev["clean"].plain, "pgd": ev.results[1].plain,
                   "bpda": ev.results[2].bpda if ev.results[2].bpda is not None else ev.results[2].plain,
                   "worst": ev.worst()}
            for name, ev in (("original", before), ("sparsified", after))}
    log(f"\ntest split ({after.n} images), L-inf eps={config['eps']}; PGD-{config['eval_steps']} on the model as "
        f"is, {strong} through straight-through gradients (BPDA), and the adaptive worst case (every attack in "
        "every column: as is, BPDA, smooth-band surrogates, transfer from alpha 0):")
    log(f"| model | alpha | clean | PGD | BPDA-{strong} | adaptive worst case |\n|---|---|---|---|---|---|")
    for name, a, ev in rows:
        bpda = ev.results[2].bpda if ev.results[2].bpda is not None else ev.results[2].plain
        log(f"| {name} | {a:.2f} | {100 * ev['clean'].plain:.1f}% | {100 * ev.results[1].plain:.1f}% | "
            f"{100 * bpda:.1f}% | {100 * ev.worst():.1f}% |")
    if len(rows) > 2:
        log("(the forced row shows what the operator does: a plain attack (PGD) is blinded by its zero gradient; "
            "BPDA passes it, and surrogate gradients go further; only a gain under the adaptive worst case, "
            "beyond noise, is a real one)")
    row = after.comparison.row("worst case, every attack", "both")
    log(f"\nsearch verdict: {search.verdict_line()}")
    log(f"test verdict (adaptive worst case): {100 * row.difference:+.1f} points ({row.gained} gained, "
        f"{row.lost} lost, "
        f"McNemar p = {row.p_value:.2g}): {row.verdict}")
    log("\npaired comparison on the test split:\n" + after.comparison.to_markdown())
    log("audit:\n" + fxsparse.audit(gm).to_markdown())
    log(f"done in {time.time() - t0:.0f} s")
    return {"alpha": alpha, "search": search, "test": test, "comparison": after.comparison}
