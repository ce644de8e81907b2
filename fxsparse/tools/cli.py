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
    if args.plot:
        if not args.calibrate:
            raise fxsparse.FxsparseValueError("--plot draws calibrated statistics: give --calibrate N too")
        from fxsparse.robust.plots import plot_audit

        plot_audit(report, args.plot)
        print(f"fxsparse: per-site plot written to {args.plot}", file=sys.stderr)
    if args.format == "json":
        print(report.to_json())
    else:
        from fxsparse.calibrate.diagnose import describe_tensors

        print(f"# fxsparse audit: {args.model}\n\n{note}; input [{describe_tensors(example)}]\n")
        print(report.to_markdown())
    return 0


def _with_model_normalization(name: str, model, log=lambda m: print(m, file=sys.stderr)):
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
        log(f"fxsparse: no input normalisation known for {name}; the model gets the [0, 1] images as they are "
            "(--normalization none silences this)")
        return model
    log(f"fxsparse: normalisation inside the model (mean {mean}, std {std}); data files hold [0, 1] images")
    return fxsparse.with_normalization(model, mean, std)


def _distributed(args):
    """(rank, world size): under torchrun (WORLD_SIZE > 1) the process group is started here, NCCL with one
    GPU per process for --device cuda, gloo otherwise."""
    import torch.distributed as dist

    from fxsparse.calibrate.distributed import rank_and_size
    from fxsparse.config import launched_world

    world, local = launched_world()
    if world > 1 and not dist.is_initialized():
        cuda = (args.device or "").startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank_and_size()


def _evaluation_setup(args, rank: int, world: int):
    """(model, {calibration, validation, test}) for `fxsparse evaluate`: each split this rank's share."""
    from fxsparse.errors import FxsparseValueError
    from fxsparse.tools import data, demo
    from fxsparse.tools.zoo import load_model, resolve

    log = (lambda m: print(m, file=sys.stderr)) if rank == 0 else (lambda m: None)
    digits = demo.load_digits_splits(args.split_seed) if "digits" in (args.data, args.model) else None
    if args.model == "digits":
        config = dict(demo.CONFIG, epochs=args.epochs, width=args.width)
        if rank == 0:  # trains and caches the model once; the other processes then load it
            model = demo.trained_model(digits, config, log=log)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            model = demo.trained_model(digits, config, log=log)
        library, name = "digits", "digits"
    else:
        model, note = load_model(args.model, pretrained=args.pretrained, device=args.device or "cpu")
        library, name = resolve(args.model)
        if args.weights:
            data.load_weights(model, args.weights)
        elif "random init" in note:
            if not args.allow_random_weights:
                raise FxsparseValueError(
                    f"{note}: the accuracies of a random model mean nothing. Give --weights FILE, put the "
                    "pretrained weights in the local cache, or pass --allow-random-weights to evaluate it anyway")
            log(f"fxsparse: {note}: --allow-random-weights given, the numbers below measure an untrained model")
    transform = None
    if any(str(p).startswith(data.IMAGEFOLDER) for p in (args.data, args.calibration, args.validation) if p):
        transform = data.unnormalized_transform(model, library, name)
    if library != "digits" and args.normalization == "auto":
        model = _with_model_normalization(args.model, model, log)
    splits = {}
    if digits is not None:  # the digits splits, unless files replace one
        splits = {"calibration": digits["train"], "validation": digits["val"], "test": digits["test"]}
    for key, spec in (("calibration", args.calibration), ("validation", args.validation),
                      ("test", args.data if args.data not in (None, "digits") else None)):
        if spec:
            splits[key] = data.load_split(spec, transform, args.batch_size)
    missing = [k for k in ("calibration", "test") if k not in splits] + (
        ["validation"] if args.search and "validation" not in splits else [])
    if missing:
        digits_hint = "give --data digits, or " if args.model == "digits" else ""
        raise FxsparseValueError(f"fxsparse evaluate needs {' and '.join(missing)} data: {digits_hint}give "
                                 "--calibration, --validation (for --search) and --data as .pt files or "
                                 "imagefolder:DIR, images the model was made for")
    return model.eval(), {k: data.shard(v, rank, world) for k, v in splits.items()}


def _calibration_batches(split, batch_size: int):
    """Calibration batches: a DataLoader as it is (read once, in one pass), tensors cut into batches."""
    from fxsparse.inputs import iter_batches

    return list(iter_batches(split, batch_size)) if isinstance(split, tuple) else split


def _cmd_evaluate(args) -> int:
    rank, world = _distributed(args)
    try:
        return _evaluate(args, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _evaluate(args, rank: int, world: int) -> int:
    import fxsparse

    if args.plot and not args.search:
        raise fxsparse.FxsparseValueError("--plot draws the alpha search: give --search too")
    model, splits = _evaluation_setup(args, rank, world)
    if args.device:
        model = model.to(args.device)
    select = {"kinds": args.kinds} if args.kinds else None
    gm = fxsparse.sparsify(model, _calibration_batches(splits["calibration"], args.batch_size), alpha=0.0,
                           select=select, placement=args.placement, progress=args.progress)
    common = dict(eps=args.eps, norm=args.norm, seed=args.seed, batch_size=args.batch_size,
                  progress=args.progress if rank == 0 else False)
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
    if rank != 0:  # every rank holds the same result; one prints it
        return 0
    if args.plot:
        search.plot(args.plot)
        print(f"fxsparse: alpha search plot written to {args.plot}", file=sys.stderr)
    if args.format == "json":
        import json

        doc = {name: r.to_dict() for name, r in reports.items()}
        doc["alpha"] = search.alpha if search else args.alpha
        doc["placement"] = args.placement
        doc["processes"] = world
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

    ev = sub.add_parser("evaluate", help="clean, PGD, APGD, Square, AutoAttack accuracy in every column (as is, "
                        "BPDA, smooth and annealed band, transfer) and the worst case",
                        description="Sparsify MODEL (calibrating on the calibration split), set or search alpha "
                        "(on the validation split), and report every attack on the test split in every column "
                        "(the model as is, straight-through gradients (BPDA), the smooth and annealed band "
                        "surrogates, transfer from alpha 0) with the worst case over them, beside the original "
                        "model and paired against it.")
    ev.add_argument("model", help="'digits' (the demo's CNN, trained and cached) or a timm / torchvision name")
    ev.add_argument("--data", metavar="SOURCE", help="test images: 'digits', a torch.save'd (x, y) file of images in "
                    "[0, 1], or imagefolder:DIR (class subfolders, read with the model's own preprocessing, not "
                    "normalised: the model's normalisation goes inside it, see --normalization)")
    ev.add_argument("--calibration", metavar="SOURCE", help="images to calibrate on (training images), as --data")
    ev.add_argument("--validation", metavar="SOURCE", help="images to search alpha on, as --data; disjoint from it")
    ev.add_argument("--weights", help="a state_dict or training checkpoint for the model (.pth / .pt / .safetensors, "
                    "read by timm's loader: 'model_ema', 'state_dict' or 'model' entries and 'module.' / "
                    "'_orig_mod.' prefixes are handled)")
    ev.add_argument("--plot", metavar="PNG", help="with --search: draw validation accuracy against alpha to this file")
    ev.add_argument("--attacks", nargs="+", default=["clean", "pgd", "square"], metavar="ATTACK",
                    help=f"attacks with options, e.g. pgd:steps=50 square:queries=500 (default: clean pgd square); "
                         f"known: {', '.join(ATTACKS)}")
    ev.add_argument("--eps", type=float, default=0.1, help="perturbation budget on [0, 1] inputs (default 0.1)")
    ev.add_argument("--norm", type=str.lower, choices=("linf", "l2"), default="linf", help="linf or l2 (Linf, L2 too)")
    ev.add_argument("--alpha", type=float, default=0.2, help="alpha when not searching (default 0.2)")
    ev.add_argument("--search", action="store_true", help="choose alpha on the validation split")
    ev.add_argument("--search-attack", default=None,
                    help="attack that scores alpha, run in every column (the worst over them scores); default "
                         "apgd-ce, or where no reference APGD is installed (pyautoattack, RobustBench's git "
                         "autoattack) a scheduled PGD with restarts, with a ScoreAttackWarning; the table names it")
    ev.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS),
                    help=f"alphas the search tries (default {' '.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    ev.add_argument("--max-clean-drop", type=float, default=0.01,
                    help="clean validation accuracy the search may lose against alpha 0, a fraction (default 0.01)")
    ev.add_argument("--strategy", choices=("grid", "refine"), default="grid",
                    help="grid: the alphas given (default); refine: then bisect around the best and extend the "
                         "grid upward when the best is at its top")
    ev.add_argument("--per-stage", action="store_true", help="also tune one alpha per stage")
    ev.add_argument("--placement", nargs="+", default=None, help="placement policies or a preset (swin, convnext)")
    ev.add_argument("--kinds", nargs="+", help="activation kinds to select")
    ev.add_argument("--max-examples", type=int, help="evaluate on the first N test images only")
    ev.add_argument("--batch-size", type=int, default=256, help="batch size of every split (default 256)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default 0)")
    ev.add_argument("--split-seed", type=int, default=0, help="seed of the digits split")
    ev.add_argument("--epochs", type=int, default=30, help="digits model: PGD-AT epochs")
    ev.add_argument("--width", type=int, default=32, help="digits model: width")
    ev.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    ev.add_argument("--pretrained", choices=("auto", "never"), default="auto",
                    help="auto: use weights already in the local cache, never download (default); never: no "
                         "cached weights (give --weights, or --allow-random-weights)")
    ev.add_argument("--allow-random-weights", action="store_true",
                    help="evaluate a model without weights (random init) anyway; refused otherwise, since its "
                         "accuracies mean nothing")
    ev.add_argument("--normalization", choices=("auto", "none"), default="auto",
                    help="auto: put the model's input normalisation (timm pretrained_cfg, torchvision weights) "
                         "inside it, so data files hold [0, 1] images; none: the model takes them as they are")
    ev.add_argument("--no-baseline", action="store_true", help="skip the original model's row")
    ev.add_argument("--format", choices=("markdown", "json"), default="markdown", help="output format")
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
    audit.add_argument("--format", choices=("markdown", "json"), default="markdown", help="output format")
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
    audit.add_argument("--plot", metavar="PNG", help="with --calibrate: draw the replaced fraction and the channel "
                       "std of every site, in graph order, to this file")
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
