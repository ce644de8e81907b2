"""Speed of the pass, the calibration and the operator, measured side by side.

    python benchmarks/perf.py                       # every part, CPU defaults
    python benchmarks/perf.py --parts infer --device cuda --dtype bfloat16 --size 224 --batches 1 32
    python benchmarks/perf.py --parts targets --quick      # every row of issue 23's table, fewer rounds

Parts:
  targets   every row of issue 23's table, each against its target: compiled efficientnet_b0 (b8, 128x128) and
            resnet18 (b16, 64x64) sparsified / original, eager resnet18, default calibrate() / plain forwards
            (32 batches), PGD-10 sparsified (as is, BPDA) / original, exact McNemar p (50,000 pairs, 8,000
            discordant), and on CUDA the compiled bfloat16 b32 224x224 figures
  cold      the first eager call of a sparsified resnet18 in a fresh process with an empty Inductor cache
            (minus the original's; CPU only)
  pass      capture + locate + splice time against graph size over a spread of timm models (meta device)
  calib     calibration time / plain eval forward over the same batches: the default calibrate() (one pass,
            replaced fractions estimated in it), measure=False, and measure="exact" (a second pass)
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


def forward_and_calibration(model, gm, data, measure=True):
    """Two callables over the same batches: the plain eval forward of `model`, and the calibration of its
    sparsified `gm` with `measure` (True: the default one pass; False: statistics only; "exact": two passes)."""
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
    fns = [forward_and_calibration(model, gm, data, measure)[1] for measure in (True, False, "exact")]
    fns.insert(0, forwards(model, data))
    for f in fns:
        f()
    t = interleaved(fns, device, args.rounds, 1)
    print("| plain forward | calibrate() default (one pass) | ratio | measure=False | ratio | measure=\"exact\" "
          "(two passes) | ratio |\n|---|---|---|---|---|---|---|")
    print(f"| {t[0] * 1000:.1f} ms | " + " | ".join(f"{x * 1000:.1f} ms | {x / t[0]:.3f}" for x in t[1:]) + " |")


# issue 23's table: name -> target (ratios sparsified / original unless said otherwise)
TARGETS = {"compiled_effnet": 1.03, "compiled_resnet": 1.02, "eager": 1.20, "calibration": 1.10, "pgd": 1.10,
           "mcnemar": 0.010, "gpu": 1.03, "cold": 1.0}

COLD = """
import os, sys, time, torch, torchvision
import fxsparse
torch.manual_seed(0)
model = torchvision.models.resnet18().eval()
x = torch.randn({batch}, 3, {size}, {size})
gm = fxsparse.sparsify(model, [x], alpha=0.2, progress=False)
with torch.no_grad():
    t = time.perf_counter(); model(x); t0 = time.perf_counter() - t
    t = time.perf_counter(); gm(x); t1 = time.perf_counter() - t
print(t0, t1)
"""


def cold_first_call(args):
    """(original, sparsified) first eager call in a fresh process with an empty Inductor cache."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        out = subprocess.run([sys.executable, "-c", COLD.format(batch=args.calib_batch, size=args.calib_size)],
                             env=env, capture_output=True, text=True, check=True).stdout
    return tuple(float(v) for v in out.split()[-2:])


def _row(name, value, target, unit="x"):
    """One line of the targets table, printed at once (a long run shows its rows as they come)."""
    shown = {"x": f"{value:.3f}", "s": f"{value:+.2f} s", "ms": f"{value * 1000:.2f} ms"}[unit]
    limit = {"x": f"{target:.2f}", "s": f"{target:.2f} s", "ms": f"{target * 1000:.0f} ms"}[unit]
    print(f"| {name} | {shown} | <= {limit} | {'yes' if value <= target else 'no'} |", flush=True)


def _compiled_ratio(original, sparse, x, device, args):
    compiled = [torch.compile(original, mode=args.mode), torch.compile(sparse, mode=args.mode)]
    fns = [forwards(c, [x]) for c in compiled]
    for f in fns * 3:
        f()
    t = interleaved(fns, device, args.target_rounds, 3)
    return t[1] / t[0]


def _pgd_ratios(model, gm, x, device, args):
    """PGD-10 (eager) on the sparsified model, as is and through straight-through gradients, / the original."""
    from fxsparse.robust.attacks import pgd

    y = torch.randint(0, 1000, (x.shape[0],), device=device)

    def attack(m, bpda=False):
        def f():
            if bpda:
                with fxsparse.straight_through(m):
                    pgd(m, x, y, 8 / 255, steps=10)
            else:
                pgd(m, x, y, 8 / 255, steps=10)
        return f

    fns = [attack(model), attack(gm), attack(gm, bpda=True)]
    for f in fns:
        f()
    t = interleaved(fns, device, max(3, args.target_rounds // 4), 1)
    return t[1] / t[0], t[2] / t[0]


def part_targets(args, device, dtype):
    """Every row of issue 23's table, each ratio measured in one process, interleaved."""
    import timm

    from fxsparse.robust.compare import mcnemar_exact

    print(f"\n## Targets ({dtype}, alpha 0.2, {args.target_rounds} interleaved rounds)\n")
    print("| row | measured | target | met |\n|---|---|---|---|")
    torch.manual_seed(0)
    effnet = timm.create_model("efficientnet_b0", pretrained=False).eval().to(device, dtype)
    x = torch.randn(8, 3, 128, 128, device=device, dtype=dtype)
    sparse = fxsparse.sparsify(effnet, [x], alpha=0.2, progress=False)
    _row("compiled efficientnet_b0 b8 128x128 (SiLU), sparsified / original",
         _compiled_ratio(effnet, sparse, x, device, args), TARGETS["compiled_effnet"])
    model, data = resnet18_and_batches(args, device, dtype)
    gm = fxsparse.sparsify(model, data[:1], alpha=0.2, progress=False)
    size = f"b{args.calib_batch} {args.calib_size}x{args.calib_size}"
    _row(f"compiled resnet18 {size}", _compiled_ratio(model, gm, data[0], device, args), TARGETS["compiled_resnet"])
    fns = [forwards(model, data[:2]), forwards(gm, data[:2])]
    for f in fns:
        f()
    t = interleaved(fns, device, args.target_rounds, 1)
    _row(f"eager resnet18 {size}, plain ops", t[1] / t[0], TARGETS["eager"])
    fresh = fxsparse.prepare(model, data[0])
    fns = list(forward_and_calibration(model, fresh, data))
    for f in fns:
        f()
    t = interleaved(fns, device, max(3, args.target_rounds // 4), 1)
    _row(f"default calibrate() over {len(data)} batches / plain forwards (resnet18 {size})", t[1] / t[0],
         TARGETS["calibration"])
    images = torch.rand(args.calib_batch, 3, args.calib_size, args.calib_size, device=device, dtype=dtype)
    as_is, bpda = _pgd_ratios(model, gm, images, device, args)
    _row(f"PGD-10 sparsified / original, eager, as is (resnet18 {size})", as_is, TARGETS["pgd"])
    _row(f"PGD-10 sparsified / original, eager, BPDA (resnet18 {size})", bpda, TARGETS["pgd"])
    _row("exact McNemar p, 50,000 pairs with 8,000 discordant (4,200 / 3,800)",
         timed(lambda: mcnemar_exact(4200, 3800), torch.device("cpu"), 3), TARGETS["mcnemar"], "ms")
    if device.type == "cuda":
        for name in ("resnet50", "efficientnet_b0"):
            torch.manual_seed(0)
            net = timm.create_model(name, pretrained=False).eval().to(device, torch.bfloat16)
            xb = torch.randn(32, 3, 224, 224, device=device, dtype=torch.bfloat16)
            _row(f"GPU: compiled bf16 b32 224x224 {name}, sparsified / original",
                 _compiled_ratio(net, fxsparse.sparsify(net, [xb], alpha=0.2, progress=False), xb, device, args),
                 TARGETS["gpu"])
    else:
        print("| GPU: compiled bf16 b32 224x224 | not run (no CUDA device: benchmarks/gpu.sh) | <= 1.03 | - |")


def part_cold(args, device, dtype):
    """The first eager call of a sparsified resnet18 in a fresh process with an empty Inductor cache."""
    t0, t1 = cold_first_call(args)
    print("\n## First eager call, fresh process, empty Inductor cache\n\n| row | measured | target | met |\n"
          "|---|---|---|---|")
    _row(f"sparsified - original ({t1:.2f} s - {t0:.2f} s)", t1 - t0, TARGETS["cold"], "s")


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


def fused_kernel(fn):
    """`fn` run with the opt-in fused eager kernel (fxsparse.set_eager_kernel("fused"))."""
    def f():
        fxsparse.set_eager_kernel("fused")
        try:
            fn()
        finally:
            fxsparse.set_eager_kernel("plain")
    return f


def part_infer(args, device, dtype, authors_only=False):
    title = "Authors' operator against fxsparse's" if authors_only else "Inference, sparsified / original"
    print(f"\n## {title} ({device.type}, {dtype}, {args.size}x{args.size}, alpha 0.2)\n")
    if authors_only:
        print("| model | batch | fxsparse eager | authors eager | authors / fxsparse | fxsparse compiled "
              "| authors compiled | authors / fxsparse |\n|---|---|---|---|---|---|---|---|")
    else:
        print("| model | batch | original eager | sparsified eager | ratio | sparsified eager, fused kernel | ratio "
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
            fns = [run(a), run(b)] + ([] if authors_only else [fused_kernel(run(b))])
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
    parser.add_argument("--parts", nargs="+", default=["targets", "cold", "pass", "calib", "infer", "authors"])
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
    parser.add_argument("--calib-batches", type=int, default=32)
    parser.add_argument("--target-rounds", type=int, default=21, help="interleaved rounds of the targets part")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds (targets: 5 interleaved, calibration and PGD 3; other parts 3): every "
                             "row still printed, for a shared or slow machine")
    args = parser.parse_args()
    if args.quick:
        args.target_rounds, args.rounds = min(args.target_rounds, 5), min(args.rounds, 3)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"# {platform.node()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f", {time.strftime('%Y-%m-%d %H:%M')}")
    if "targets" in args.parts:
        part_targets(args, device, dtype)
    if "cold" in args.parts and device.type == "cpu":
        part_cold(args, device, dtype)
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
