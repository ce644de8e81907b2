"""Speed of the pass, the calibration and the operator, measured side by side.

    python benchmarks/perf.py                       # every part, CPU defaults
    python benchmarks/perf.py --parts infer --device cuda --dtype bfloat16 --size 224 --batches 1 32

Parts:
  targets   the issue's three CPU ratios (eager, compiled, calibration) on resnet18, batch 16, 64x64, each
            against its target
  pass      capture + locate + splice time against graph size over a spread of timm models (meta device)
  calib     calibration time / plain eval forward over the same batches: the statistics pass, and the default
            calibrate() with its second (histogram) pass
  infer     latency and throughput, sparsified / original, eager and torch.compile'd, per model and batch
  authors   the authors' formulation of the operator (several temporaries and a host sync per call) against
            fxsparse's, same sites, same statistics, same run

Ratios are measured in one process, interleaved (original, sparsified, original, ...), median of repeats.
Random-init models; statistics from random inputs (speed does not depend on them beyond the replaced fraction).
"""
from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch
from torch import nn

import fxsparse

PASS_MODELS = ["resnet18", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
               "resnet50", "efficientnet_b3", "convnext_base", "vit_base_patch16_224", "vit_large_patch16_224",
               "maxvit_tiny_tf_224", "regnety_160"]
INFER_MODELS = ["resnet50", "convnext_tiny", "vit_small_patch16_224", "efficientnet_b0"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns, device, rounds, repeats):
    """Median time of each fn, measured in alternation so that machine noise hits all of them alike."""
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            samples[i].append(timed(fn, device, repeats))
    return [statistics.median(s) for s in samples]


def forwards(model, batches):
    """A callable running `model` over `batches` without autograd."""
    def f():
        with torch.no_grad():
            for x in batches:
                model(x)
    return f


def forward_and_calibration(model, gm, data, measure=False):
    """Two callables over the same batches: the plain eval forward of `model`, and the calibration of its
    sparsified `gm`: the statistics pass alone, or with `measure` the default two passes (statistics, then
    the z-score histogram the audit reads)."""
    def calib():
        fxsparse.calibrate(gm, data, measure=measure, progress=False)

    return forwards(model, data), calib


def build(name, device, dtype):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval().to(device, dtype)


def part_pass(args):
    import timm

    print("\n## Pass time against graph size (meta device, capture + locate + splice, median of 3)\n")
    print("| model | graph nodes | sites | capture path | pass time | ms / 100 nodes |\n|---|---|---|---|---|---|")
    rows = []
    for name in PASS_MODELS:
        with torch.device("meta"):
            model = timm.create_model(name).eval()
        x = torch.empty(2, *model.pretrained_cfg["input_size"], device="meta")
        t = timed(lambda: fxsparse.prepare(model, x), torch.device("cpu"), 3)
        gm = fxsparse.prepare(model, x)
        n = len(gm.graph.nodes)
        rows.append((n, t))
        print(f"| {name} | {n} | {len(fxsparse.audit(gm))} | {gm.meta['fxsparse_capture'].path} | {t:.3f} s "
              f"| {100 * 1000 * t / n:.2f} |", flush=True)
    ns, ts = zip(*rows)
    mean_n, mean_t = statistics.mean(ns), statistics.mean(ts)
    slope = sum((a - mean_n) * (b - mean_t) for a, b in rows) / sum((a - mean_n) ** 2 for a in ns)
    ss_res = sum((b - (mean_t + slope * (a - mean_n))) ** 2 for a, b in rows)
    ss_tot = sum((b - mean_t) ** 2 for b in ts)
    print(f"\nLeast-squares fit: {1000 * slope:.3f} ms per node, R^2 = {1 - ss_res / ss_tot:.3f}")


def resnet18_and_batches(args, device, dtype):
    """The targets' configuration: torchvision resnet18 (random init) and `--calib-batches` random batches."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(device, dtype)
    data = [torch.randn(args.calib_batch, 3, args.calib_size, args.calib_size, device=device, dtype=dtype)
            for _ in range(args.calib_batches)]
    return model, data


def part_calib(args, device, dtype):
    print(f"\n## Calibration / plain forward (resnet18, batch {args.calib_batch}, {args.calib_size}x"
          f"{args.calib_size}, {args.calib_batches} batches, {dtype})\n")
    model, data = resnet18_and_batches(args, device, dtype)
    gm = fxsparse.prepare(model, data[0])
    plain, calib = forward_and_calibration(model, gm, data)
    _, both = forward_and_calibration(model, gm, data, measure=True)
    calib(), both()
    t_plain, t_calib, t_both = interleaved([plain, calib, both], device, args.rounds, 1)
    print("| plain forward | statistics pass | ratio | calibrate() default, both passes | ratio |\n|---|---|---|---|---|")
    print(f"| {t_plain * 1000:.1f} ms | {t_calib * 1000:.1f} ms | {t_calib / t_plain:.3f} | {t_both * 1000:.1f} ms "
          f"| {t_both / t_plain:.3f} |")


TARGETS = {"eager": 1.10, "compiled": 1.02, "calibration": 1.15}


def part_targets(args, device, dtype):
    """The issue's CPU targets, on their own configuration: torchvision resnet18, batch 16, 64x64, alpha 0.2.
    Eager forwards and calibration are timed in one interleaved loop, the compiled forwards in another."""
    print(f"\n## Targets (torchvision resnet18, batch {args.calib_batch}, {args.calib_size}x{args.calib_size}, "
          f"{dtype}, alpha 0.2, {args.target_rounds} interleaved rounds)\n")
    model, data = resnet18_and_batches(args, device, dtype)
    gm = fxsparse.sparsify(model, data, alpha=0.2, progress=False)
    fresh = fxsparse.prepare(model, data[0])
    plain, calib = forward_and_calibration(model, fresh, data)
    compiled_model, compiled_gm = torch.compile(model, mode=args.mode), torch.compile(gm, mode=args.mode)
    run = functools.partial(forwards, batches=data)
    # Two loops: compiled code leaves OpenMP threads spinning for a while after each call, which would slow
    # whichever eager callable came next.
    eager_fns, compiled_fns = [plain, run(gm), calib], [run(compiled_model), run(compiled_gm)]
    for f in eager_fns + compiled_fns:
        f()
    t_eager = interleaved(eager_fns, device, args.target_rounds, 1)
    t_compiled = interleaved(compiled_fns, device, args.target_rounds, 1)
    t = [t_eager[0], t_eager[1], t_compiled[0], t_compiled[1], t_eager[2]]
    rows = [("eager sparsified / original", t[1] / t[0], TARGETS["eager"]),
            ("compiled sparsified / compiled original", t[3] / t[2], TARGETS["compiled"]),
            ("calibration / plain eval forward", t[4] / t[0], TARGETS["calibration"])]
    print(f"original eager {t[0] * 1000:.1f} ms, sparsified eager {t[1] * 1000:.1f} ms, original compiled "
          f"{t[2] * 1000:.1f} ms, sparsified compiled {t[3] * 1000:.1f} ms, calibration {t[4] * 1000:.1f} ms "
          f"({args.calib_batches} batches each)\n")
    print("| ratio | measured | target | met |\n|---|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value:.3f} | <= {target:.2f} | {'yes' if value <= target else 'no'} |", flush=True)


class AuthorsMeanSparse(nn.Module):
    """The operator as the authors wrote it, per its description: a host sync on the threshold every call and
    full-size temporaries for the difference, its absolute value, the mask and a mean-filled tensor."""

    def __init__(self, op: fxsparse.MeanSparse):
        super().__init__()
        self.dim = op.dim
        self.register_buffer("running_mean", op.mean.clone())
        self.register_buffer("running_std", op.std.clone())
        self.register_buffer("threshold", op.alpha.clone())

    def forward(self, x):
        if self.threshold == 0:  # host-device sync
            return x
        shape = [1] * x.dim()
        shape[self.dim] = -1
        bias = self.running_mean.view(shape)
        crop = self.threshold * self.running_std.view(shape)
        diff = x - bias
        mask = diff.abs() < crop
        filled = bias * torch.ones_like(x)
        return torch.where(mask, filled, x)


def with_authors_ops(gm):
    import copy

    out = copy.deepcopy(gm)
    for name, op in list(out.named_modules()):
        if isinstance(op, fxsparse.MeanSparse):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, AuthorsMeanSparse(op))
    return out


def plain_ops(fn):
    """`fn` run with the fused eager kernel off: the operator as four plain elementwise ops."""
    import fxsparse.ops as ops

    def f():
        saved, ops.FUSED_EAGER = ops.FUSED_EAGER, False
        try:
            fn()
        finally:
            ops.FUSED_EAGER = saved
    return f


def part_infer(args, device, dtype, authors_only=False):
    title = "Authors' operator against fxsparse's" if authors_only else "Inference, sparsified / original"
    print(f"\n## {title} ({device.type}, {dtype}, {args.size}x{args.size}, alpha 0.2)\n")
    if authors_only:
        print("| model | batch | fxsparse eager | authors eager | authors / fxsparse | fxsparse compiled "
              "| authors compiled | authors / fxsparse |\n|---|---|---|---|---|---|---|---|")
    else:
        print("| model | batch | original eager | sparsified eager | ratio | sparsified eager, plain ops | ratio "
              "| original compiled | sparsified compiled | ratio | sparsified img/s (compiled) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    models = args.authors_models if authors_only else args.models
    ms = lambda t: f"{t * 1000:.2f} ms" if isinstance(t, float) else t  # noqa: E731
    ratio = lambda p, q: f"{q / p:.3f}" if isinstance(p, float) else "-"  # noqa: E731
    for name in models:
        model = build(name, device, dtype)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
            gm = fxsparse.sparsify(model, [x], alpha=0.2, progress=False)
            a, b = (gm, with_authors_ops(gm)) if authors_only else (model, gm)
            run = functools.partial(forwards, batches=[x])
            fns = [run(a), run(b)] + ([] if authors_only else [plain_ops(run(b))])
            for f in fns:
                f()
            eager = interleaved(fns, device, args.rounds, args.repeats)
            compiled = ["-", "-"]
            if not args.no_compile:
                torch._dynamo.reset()
                ca = torch.compile(a, mode=args.mode)
                cb = torch.compile(b, mode=args.mode)
                for _ in range(3):
                    run(ca)(), run(cb)()
                compiled = interleaved([run(ca), run(cb)], device, args.rounds, args.repeats)
            if authors_only:
                print(f"| {name} | {batch} | {ms(eager[0])} | {ms(eager[1])} | {ratio(*eager[:2])} | "
                      f"{ms(compiled[0])} | {ms(compiled[1])} | {ratio(*compiled)} |", flush=True)
            else:
                rate = f"{batch / compiled[1]:.1f}" if isinstance(compiled[1], float) else "-"
                print(f"| {name} | {batch} | {ms(eager[0])} | {ms(eager[1])} | {ratio(*eager[:2])} | "
                      f"{ms(eager[2])} | {ratio(eager[0], eager[2])} | {ms(compiled[0])} | {ms(compiled[1])} | "
                      f"{ratio(*compiled)} | {rate} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["targets", "pass", "calib", "infer", "authors"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--models", nargs="+", default=INFER_MODELS)
    parser.add_argument("--authors-models", nargs="+", default=["resnet18", "convnext_tiny"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per timing")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--target-rounds", type=int, default=21, help="interleaved rounds of the targets part")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"# {platform.node()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f", {time.strftime('%Y-%m-%d %H:%M')}")
    if "targets" in args.parts:
        part_targets(args, device, dtype)
    if "pass" in args.parts:
        part_pass(args)
    if "calib" in args.parts:
        part_calib(args, device, dtype)
    if "infer" in args.parts:
        part_infer(args, device, dtype)
    if "authors" in args.parts:
        part_infer(args, device, dtype, authors_only=True)


if __name__ == "__main__":
    main()
