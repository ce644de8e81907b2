"""The MeanSparse operator of another revision against this one, interleaved in one process.

    python benchmarks/ops_ab.py --against 5432663 --rounds 15

Eager inference of a sparsified torchvision resnet18 (b16, 64x64, alpha 0.2, random init): the original, the
operator as it is here, and `fxsparse/ops.py` of `--against` (read with `git show`, loaded as its own module,
its `MeanSparse.forward` swapped in), alternating each round. Prints median ms and both ratios.
"""
import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time

import torch
import torchvision

import fxsparse


def _forward_of(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:fxsparse/ops.py"], check=True, capture_output=True,
                            text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("ops_at_revision", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MeanSparse.forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="a git revision whose fxsparse/ops.py to compare")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.rand(16, 3, 64, 64)
    gm = fxsparse.sparsify(model, [torch.rand(16, 3, 64, 64) for _ in range(4)], alpha=0.2, progress=False)
    forwards = {"here": fxsparse.ops.MeanSparse.forward, args.against: _forward_of(args.against)}

    def once(net):
        with torch.no_grad():
            t = time.perf_counter()
            net(x)
            return time.perf_counter() - t

    samples = {"original": [], **{k: [] for k in forwards}}
    try:
        for _ in range(args.rounds):
            samples["original"].append(min(once(model) for _ in range(3)))
            for name, forward in forwards.items():
                fxsparse.ops.MeanSparse.forward = forward
                once(gm)
                samples[name].append(min(once(gm) for _ in range(3)))
    finally:
        fxsparse.ops.MeanSparse.forward = forwards["here"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(" ".join(f"{k}: {1e3 * v:.2f} ms" for k, v in med.items()))
    print(" ".join(f"{k} / original: {med[k] / med['original']:.3f}" for k in forwards))


if __name__ == "__main__":
    main()
