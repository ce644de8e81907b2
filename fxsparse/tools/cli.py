"""The `fxsparse` command (also `python -m fxsparse`): `demo`, `audit MODEL` and `evaluate MODEL`."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch


def _cmd_demo(args) -> int:
    from fxsparse.tools import demo

    demo.run(retrain=args.retrain)
    return 0


def _cmd_audit(args) -> int:
    import fxsparse
    from fxsparse.tools.zoo import audit_inputs, load_model

    device = "cpu" if args.calibrate else "meta"
    model, note = load_model(args.model, pretrained=args.pretrained, device=device)
    example, submodule = audit_inputs(args.model, model, tuple(args.input_size) if args.input_size else None)
    submodule = args.submodule or submodule
    select = {}
    if args.kinds:
        select["kinds"] = args.kinds
    if args.include:
        select["include"] = args.include
    if args.exclude:
        select["exclude"] = args.exclude
    gm = fxsparse.prepare(model, example, select=select or None, submodule=submodule)
    if args.calibrate:
        gen = torch.Generator().manual_seed(0)

        def noise():  # the example inputs' structure, with fresh Gaussian noise in each tensor
            return torch.utils._pytree.tree_map(
                lambda t: torch.randn(args.batch, *t.shape[1:], generator=gen) if t.dim() >= 4
                else torch.randn(t.shape, generator=gen), example)

        batches = [noise() for _ in range(args.calibrate)]
        fxsparse.calibrate(gm, forward_loop=lambda m: [m(*b) for b in batches])
        fxsparse.set_alpha(gm, args.alpha)
        note += f"; calibrated on {args.calibrate} batches of Gaussian noise (illustration only), alpha={args.alpha}"
    elif device == "meta":
        note += "; built on the meta device (structure only: use --calibrate N for statistics)"
    if submodule:
        note += f"; submodule {submodule!r} sparsified inside the whole model"
    report = fxsparse.audit(gm)
    if args.format == "json":
        print(report.to_json())
    else:
        from fxsparse.diagnose import describe_tensors

        print(f"# fxsparse audit: {args.model}\n\n{note}; input [{describe_tensors(example)}]\n")
        print(report.to_markdown())
    return 0


def _load_split(path: str):
    """An (x, y) pair from a file written with torch.save: a tuple/list (x, y) or a dict with x/y keys."""
    from fxsparse.errors import FxsparseValueError

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError) as exc:
        raise FxsparseValueError(f"cannot read data file {path}: {exc}") from exc
    if isinstance(obj, dict):
        obj = (obj.get("x", obj.get("images")), obj.get("y", obj.get("labels")))
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise FxsparseValueError(f"{path} must hold (x, y) tensors: torch.save((images, labels), path), or a dict "
                            "with keys x and y")
    return tuple(obj)


def _with_model_normalization(name: str, model):
    """The model with its input normalisation inside (timm: pretrained_cfg; torchvision: the weights'
    transforms), so that data files hold [0, 1] images and the attacks' eps and bounds mean what they say."""
    import fxsparse
    from fxsparse.tools.zoo import resolve

    lib, bare = resolve(name)
    source = model
    if lib == "torchvision":
        import torchvision

        try:
            source = torchvision.models.get_model_weights(bare).DEFAULT
        except (ValueError, KeyError, AttributeError):
            source = None
    try:
        mean, std = fxsparse.normalization_of(source)
    except fxsparse.FxsparseError:
        print(f"fxsparse: no input normalisation known for {name}; the model gets the [0, 1] images as they are "
              "(--normalization none silences this)", file=sys.stderr)
        return model
    print(f"fxsparse: normalisation inside the model (mean {mean}, std {std}); data files hold [0, 1] images",
          file=sys.stderr)
    return fxsparse.with_normalization(model, mean, std)


def _evaluation_setup(args):
    """(model, {calibration, validation, test}) for `fxsparse evaluate`."""
    from fxsparse.tools import demo
    from fxsparse.tools.zoo import load_model

    splits = {}
    if args.data == "digits" or args.model == "digits":
        digits = demo.load_digits_splits(args.split_seed)
        splits = {"calibration": digits["train"], "validation": digits["val"], "test": digits["test"]}
    for key, path in (("calibration", args.calibration), ("validation", args.validation),
                      ("test", args.data if args.data not in (None, "digits") else None)):
        if path:
            splits[key] = _load_split(path)
    if args.model == "digits":
        config = dict(demo.CONFIG, epochs=args.epochs, width=args.width)
        model = demo.trained_model(digits, config, log=lambda m: print(m, file=sys.stderr))
    else:
        model, _ = load_model(args.model, pretrained=args.pretrained, device=args.device or "cpu")
        if args.weights:
            model.load_state_dict(torch.load(args.weights, weights_only=True, map_location="cpu"))
        if args.normalization == "auto":
            model = _with_model_normalization(args.model, model)
    missing = [k for k in ("calibration", "test") if k not in splits] + (
        ["validation"] if args.search and "validation" not in splits else [])
    if missing:
        from fxsparse.errors import FxsparseValueError

        raise FxsparseValueError(f"fxsparse evaluate needs {' and '.join(missing)} data: give --data digits, or files "
                            "with --calibration, --validation (for --search) and --data")
    return model.eval(), splits


def _cmd_evaluate(args) -> int:
    import fxsparse

    model, splits = _evaluation_setup(args)
    if args.device:
        model = model.to(args.device)
    select = {"kinds": args.kinds} if args.kinds else None
    from fxsparse.robust.evaluation import iter_batches

    calib = list(iter_batches(splits["calibration"], args.batch_size))
    gm = fxsparse.sparsify(model, [x.to(args.device or "cpu") for x, _ in calib], alpha=0.0, select=select,
                           placement=args.placement, progress=args.progress)
    common = dict(eps=args.eps, norm=args.norm, seed=args.seed, batch_size=args.batch_size, progress=args.progress)
    search = None
    if args.search:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxsparse.SearchWarning)  # its notes are printed with the table
            search = fxsparse.search_alpha(gm, splits["validation"], attack=args.search_attack, alphas=args.alphas,
                                           max_clean_drop=args.max_clean_drop, strategy=args.strategy,
                                           per_stage=args.per_stage, **common)
    else:
        fxsparse.set_alpha(gm, args.alpha)
    reports = {}
    if not args.no_baseline:
        reports["original"] = fxsparse.evaluate(model, splits["test"], attacks=args.attacks,
                                                max_examples=args.max_examples, **common)
    reports["sparsified"] = fxsparse.evaluate(gm, splits["test"], attacks=args.attacks, search=search,
                                              max_examples=args.max_examples, baseline=reports.get("original"),
                                              **common)
    if args.format == "json":
        import json

        doc = {name: r.to_dict() for name, r in reports.items()}
        doc["alpha"] = search.alpha if search else args.alpha
        doc["placement"] = args.placement
        if search:
            doc["search"] = [t.to_dict() for t in search.table]
            doc["search_verdict"] = {"verdict": search.verdict, "line": search.verdict_line(), "rule": search.rule,
                                     "best_alpha": search.best_alpha, "notes": search.notes}
        print(json.dumps(doc, indent=2))
        return 0
    if search:
        print(f"## alpha search on the validation split\n\n{search.to_markdown()}")
    alpha = search.alpha if search else args.alpha
    for name, r in reports.items():
        shown = "0 (no operators)" if name == "original" else alpha
        print(f"## {name} model, alpha = {shown}, test split\n\n{r.to_markdown()}")
    return 0


def _add_evaluate(sub) -> None:
    from fxsparse.robust.evaluation import ATTACKS
    from fxsparse.robust.search import DEFAULT_ALPHAS

    ev = sub.add_parser("evaluate", help="clean, PGD, APGD, Square, AutoAttack accuracy, as is and with BPDA",
                        description="Sparsify MODEL (calibrating on the calibration split), set or search alpha "
                        "(on the validation split), and report every attack on the test split, on the model as is "
                        "and through straight-through gradients (BPDA), beside the original model.")
    ev.add_argument("model", help="'digits' (the demo's CNN, trained and cached) or a timm / torchvision name")
    ev.add_argument("--data", help="'digits' or a torch.save'd (x, y) file of test images in [0, 1] (not normalised: "
                    "the model's normalisation goes inside it, see --normalization)")
    ev.add_argument("--calibration", help="(x, y) file to calibrate on (training images)")
    ev.add_argument("--validation", help="(x, y) file to search alpha on; disjoint from --data")
    ev.add_argument("--weights", help="state_dict file for the model")
    ev.add_argument("--attacks", nargs="+", default=["clean", "pgd", "square"], metavar="ATTACK",
                    help=f"attacks with options, e.g. pgd:steps=50 square:queries=500; known: {', '.join(ATTACKS)}")
    ev.add_argument("--eps", type=float, default=0.1, help="perturbation budget on [0, 1] inputs (default 0.1)")
    ev.add_argument("--norm", choices=("linf", "l2"), default="linf")
    ev.add_argument("--alpha", type=float, default=0.2, help="alpha when not searching (default 0.2)")
    ev.add_argument("--search", action="store_true", help="choose alpha on the validation split")
    ev.add_argument("--search-attack", default=None,
                    help="attack that scores alpha (BPDA mode); default apgd-ce (a scheduled PGD with restarts "
                         "without pyautoattack)")
    ev.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS))
    ev.add_argument("--max-clean-drop", type=float, default=0.01, help="clean accuracy the search may lose")
    ev.add_argument("--strategy", choices=("grid", "refine"), default="grid")
    ev.add_argument("--per-stage", action="store_true", help="also tune one alpha per stage")
    ev.add_argument("--placement", nargs="+", default=None, help="placement policies or a preset (swin, convnext)")
    ev.add_argument("--kinds", nargs="+", help="activation kinds to select")
    ev.add_argument("--max-examples", type=int, help="evaluate on the first N test images only")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--split-seed", type=int, default=0, help="seed of the digits split")
    ev.add_argument("--epochs", type=int, default=30, help="digits model: PGD-AT epochs")
    ev.add_argument("--width", type=int, default=32, help="digits model: width")
    ev.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    ev.add_argument("--pretrained", choices=("auto", "never"), default="auto")
    ev.add_argument("--normalization", choices=("auto", "none"), default="auto",
                    help="auto: put the model's input normalisation (timm pretrained_cfg, torchvision weights) "
                         "inside it, so data files hold [0, 1] images; none: the model takes them as they are")
    ev.add_argument("--no-baseline", action="store_true", help="skip the original model's row")
    ev.add_argument("--format", choices=("markdown", "json"), default="markdown")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bars (default: when stderr is a terminal)")
    ev.set_defaults(func=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxsparse", description="MeanSparse for any vision model")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="adversarially train a small CNN on sklearn digits, sparsify, evaluate")
    demo.add_argument("--retrain", action="store_true", help="ignore the cached demo model")
    demo.set_defaults(func=_cmd_demo)

    audit = sub.add_parser("audit", help="show where MeanSparse operators go in a timm or torchvision model")
    audit.add_argument("model", help="timm or torchvision model name (prefix timm: or torchvision: to choose)")
    audit.add_argument("--format", choices=("markdown", "json"), default="markdown")
    audit.add_argument("--input-size", type=int, nargs="+", metavar="N", help="input shape without batch, e.g. 3 224 224")
    audit.add_argument("--kinds", nargs="+", help="activation kinds to select (default: every default kind)")
    audit.add_argument("--include", nargs="+", help="site-name globs to include")
    audit.add_argument("--exclude", nargs="+", help="site-name globs to exclude")
    audit.add_argument("--submodule", help="sparsify only this part, e.g. backbone (default for torchvision "
                       "detectors)")
    audit.add_argument("--pretrained", choices=("auto", "never"), default="auto",
                       help="auto: use weights already in the local cache, never download (default)")
    audit.add_argument("--calibrate", type=int, default=0, metavar="N",
                       help="calibrate on N batches of Gaussian noise to show statistics (illustration only)")
    audit.add_argument("--batch", type=int, default=4, help="batch size for --calibrate")
    audit.add_argument("--alpha", type=float, default=0.2, help="alpha to show with --calibrate")
    audit.set_defaults(func=_cmd_audit)
    _add_evaluate(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from fxsparse.errors import FxsparseError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FxsparseError as exc:
        print(f"fxsparse: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
