"""The `fxsparse` command (also `python -m fxsparse`): `demo` and `audit MODEL`."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch


def _cmd_demo(args) -> int:
    from fxsparse import demo

    demo.run(retrain=args.retrain)
    return 0


def _cmd_audit(args) -> int:
    import fxsparse
    from fxsparse.inputs import default_input_shape
    from fxsparse.zoo import load_model

    device = "cpu" if args.calibrate else "meta"
    model, note = load_model(args.model, pretrained=args.pretrained, device=device)
    shape = tuple(args.input_size) if args.input_size else default_input_shape(model)
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    example = torch.randn(2, *shape, device=dev)
    select = {}
    if args.kinds:
        select["kinds"] = args.kinds
    if args.include:
        select["include"] = args.include
    if args.exclude:
        select["exclude"] = args.exclude
    gm = fxsparse.prepare(model, example, select=select or None)
    if args.calibrate:
        gen = torch.Generator().manual_seed(0)
        noise = [torch.randn(args.batch, *shape, generator=gen) for _ in range(args.calibrate)]
        fxsparse.calibrate(gm, noise)
        fxsparse.set_alpha(gm, args.alpha)
        note += f"; calibrated on {args.calibrate} batches of Gaussian noise (illustration only), alpha={args.alpha}"
    elif device == "meta":
        note += "; built on the meta device (structure only: use --calibrate N for statistics)"
    report = fxsparse.audit(gm)
    if args.format == "json":
        print(report.to_json())
    else:
        print(f"# fxsparse audit: {args.model}\n\n{note}; input {tuple(example.shape)}\n")
        print(report.to_markdown())
    return 0


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
    audit.add_argument("--pretrained", choices=("auto", "never"), default="auto",
                       help="auto: use weights already in the local cache, never download (default)")
    audit.add_argument("--calibrate", type=int, default=0, metavar="N",
                       help="calibrate on N batches of Gaussian noise to show statistics (illustration only)")
    audit.add_argument("--batch", type=int, default=4, help="batch size for --calibrate")
    audit.add_argument("--alpha", type=float, default=0.2, help="alpha to show with --calibrate")
    audit.set_defaults(func=_cmd_audit)
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
