"""Census: fxsparse on every timm model and every torchvision classification model.

For each model:
  1. structure: build on the meta device (instant), `fxsparse.prepare` at the configured input size; record
     success, capture path (and why FX was not used), number of sites, pass time;
  2. run (models with at most --max-params parameters and inputs no larger than --max-size): random init,
     a real forward at the configured size, alpha = 0 bit-exactness, the run-time coverage oracle
     (fxsparse.tools.coverage), and a calibrated alpha = 0.2 forward that must stay finite;
  3. compile (a deterministic sample of --compile-every models, up to 10M parameters): torch.compile of the
     sparsified model in float64 at alpha = 0.2 against eager (see tests/test_compile.py for why float64).

Parallel over worker processes, each model under a time limit (a stuck worker is killed and replaced),
resumable (rows already in the CSV are skipped), with a progress bar.

    python benchmarks/census.py --workers 2 --out benchmarks/census.csv
    python benchmarks/census.py --summary benchmarks/census.csv     # Markdown summary of a CSV
    python benchmarks/census.py --layout --workers 2 --out benchmarks/out/layout.csv
        # layout mode: per timm model (meta device) and placement policy, how many sites got a default
        # channel axis (the goal is none), and which
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict

FIELDS = ["library", "model", "family", "status", "capture", "fx_reason", "export_reason", "meta_reason", "sites", "params_m", "input",
          "pass_s", "ran", "exact", "events", "covered", "coverage", "finite", "compiled", "error", "seconds"]


def model_names(libraries):
    names = []
    if "timm" in libraries:
        import timm

        names += [("timm", n) for n in timm.list_models()]
    if "torchvision" in libraries:
        import torchvision

        names += [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    return names


def family(library, name):
    if library == "torchvision":
        return "torchvision"
    import timm

    try:
        return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    except Exception:
        return name.split("_")[0]


def build(library, name, device):
    import timm
    import torch
    import torchvision

    with torch.device(device):
        if library == "timm":
            return timm.create_model(name, pretrained=False).eval()
        return torchvision.models.get_model(name, weights=None).eval()


def input_shape(model):
    from fxsparse.inputs import default_input_shape

    shape = default_input_shape(model)
    return (2,) + tuple(shape)


class Timeout(BaseException):  # not an Exception: the pass's own catch-alls must not swallow it
    pass


def _alarm(signum, frame):
    raise Timeout()


def examine(library, name, opts):
    """One census row."""
    import torch

    import fxsparse
    from fxsparse.tools.coverage import verify

    row = dict(library=library, model=name, family=family(library, name), status="ok")
    t_start = time.time()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(opts["timeout"]))
    try:
        try:
            meta_model = build(library, name, "meta")
        except Exception as exc:  # constructors that write data (torchvision's RegNet) refuse the meta device
            row["meta_reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
            torch.manual_seed(0)
            meta_model = build(library, name, "cpu")
        shape = input_shape(meta_model)
        row["input"] = "x".join(map(str, shape[1:]))
        row["params_m"] = round(sum(p.numel() for p in meta_model.parameters()) / 1e6, 2)
        t = time.time()
        try:
            device = next(meta_model.parameters()).device
            gm = fxsparse.prepare(meta_model, torch.empty(shape, device=device).normal_() if device.type != "meta"
                                  else torch.empty(shape, device="meta"))
        except Exception as exc:  # some models compare tensor values while running (convit: aten.equal)
            if row["params_m"] > opts["max_real_params"]:
                raise
            row["meta_reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
            torch.manual_seed(0)
            t = time.time()
            gm = fxsparse.prepare(build(library, name, "cpu"), torch.randn(shape))
        row["pass_s"] = round(time.time() - t, 3)
        report = gm.meta["fxsparse_capture"]
        row["capture"] = report.path
        row["fx_reason"] = report.reasons.get("fx", "")[:160]
        row["export_reason"] = report.reasons.get("export", "")[:160]
        row["sites"] = len(fxsparse.audit(gm))
        del gm, meta_model
        small = row["params_m"] <= opts["max_params"] and max(shape[2:], default=0) <= opts["max_size"]
        row["ran"] = small
        if small:
            torch.manual_seed(0)
            model = build(library, name, "cpu")
            x = torch.randn(shape)
            result = verify(model, (x,))
            row.update(exact=result.exact, events=result.report.sparsified_events, covered=result.report.covered,
                       coverage=round(result.report.coverage, 4), finite=result.finite_after_alpha)
            if not result.report.complete:
                row["error"] = result.report.summary()[:300]
            if not result.ok:
                row["status"] = "check-failed"
            every = opts["compile_every"]
            digest = int(hashlib.sha1(name.encode()).hexdigest(), 16)
            if every and digest % every == 0 and row["params_m"] <= 10:
                row["compiled"] = compile_check(model.double(), x.double())
    except Timeout:
        row["status"], row["error"] = "timeout", f"over {opts['timeout']} s"
    except Exception as exc:
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if opts.get("traceback"):
            traceback.print_exc()
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.time() - t_start, 2)
    return row


def compile_check(model, x):
    import torch

    import fxsparse

    gm = fxsparse.sparsify(model, [x], alpha=0.2, progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(gm)
    with torch.no_grad():
        a, b = compiled(x), gm(x)
    return bool(torch.allclose(a, b, rtol=1e-7, atol=1e-7))


def worker(conn, opts):
    import torch

    torch.set_num_threads(1)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(examine(*task, opts))


def run(args):
    names = model_names(args.libraries)
    if args.filter:
        import fnmatch

        names = [n for n in names if fnmatch.fnmatch(n[1], args.filter)]
    if args.limit:
        names = names[: args.limit]
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = list(csv.DictReader(f))
        if args.retry:  # drop the rows that did not pass, to examine those models again
            keep = [r for r in rows if r["status"] == "ok"]
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in FIELDS} for r in keep)
            rows = keep
        done = {(r["library"], r["model"]) for r in rows}
    todo = [n for n in names if n not in done]
    print(f"{len(names)} models, {len(done)} already in {args.out}, {len(todo)} to go", file=sys.stderr)
    opts = dict(timeout=args.timeout, max_params=args.max_params, max_size=args.max_size,
                compile_every=args.compile_every, max_real_params=args.max_real_params)
    new_file = not os.path.exists(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ctx = mp.get_context("spawn")
    from tqdm import tqdm

    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        bar = tqdm(total=len(todo), unit="model", disable=not sys.stderr.isatty() and not args.progress)
        workers = {}

        def start(i):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(child, opts), daemon=True)
            p.start()
            workers[i] = [p, parent, None, 0.0]

        for i in range(args.workers):
            start(i)
        queue = list(todo)
        while queue or any(w[2] for w in workers.values()):
            for i, w in list(workers.items()):
                p, conn, task, since = w
                if task is None and queue:
                    w[2], w[3] = queue.pop(0), time.time()
                    conn.send(w[2])
                    continue
                if task is None:
                    continue
                if conn.poll(0.05):
                    try:
                        row = conn.recv()
                    except EOFError:
                        row = dict(library=task[0], model=task[1], status="failed", error="worker died")
                        p.kill()
                        start(i)
                    else:
                        w[2] = None
                    writer.writerow(row)
                    f.flush()
                    bar.update(1)
                    bar.set_postfix_str(task[1][:30])
                elif not p.is_alive() or time.time() - since > 2 * args.timeout + 60:
                    p.kill()
                    writer.writerow(dict(library=task[0], model=task[1], family=family(*task),
                                         status="timeout" if p.is_alive() else "failed",
                                         error="killed: hard time limit" if p.is_alive() else "worker died",
                                         seconds=round(time.time() - since, 1)))
                    f.flush()
                    bar.update(1)
                    start(i)
        for p, conn, _, _ in workers.values():
            conn.send(None)
        bar.close()


def summarize(path):
    rows = list(csv.DictReader(open(path)))
    lines = []
    for lib in ("timm", "torchvision"):
        sub = [r for r in rows if r["library"] == lib]
        if not sub:
            continue
        ok = [r for r in sub if r["status"] == "ok"]
        transformed = [r for r in sub if r["capture"] and r["status"] in ("ok", "check-failed")]
        ran = [r for r in sub if r["ran"] == "True" and r["events"]]
        full = [r for r in ran if r["events"] and r["covered"] == r["events"]]
        exact = [r for r in ran if r["exact"] == "True"]
        paths = Counter(r["capture"] for r in transformed)
        compiled = [r for r in sub if r["compiled"] in ("True", "False")]
        lines += [
            f"### {lib}: {len(sub)} models",
            "",
            f"- transformed with one call: **{len(transformed)} / {len(sub)} ({100 * len(transformed) / len(sub):.2f}%)**"
            f"; capture paths: " + ", ".join(f"{k} {v}" for k, v in paths.most_common()),
            f"- run for real (random init, configured input size): {len(ran)}; 100% oracle coverage: "
            f"**{len(full)} / {len(ran)}**; alpha = 0 bit-identical: **{len(exact)} / {len(ran)}**",
            f"- all checks passed: {len(ok)} / {len(sub)}",
            f"- torch.compile (float64, alpha 0.2) equal to eager: "
            f"{sum(r['compiled'] == 'True' for r in compiled)} / {len(compiled)} sampled",
            "",
        ]
        bad = [r for r in sub if r["status"] != "ok"]
        if bad:
            lines += ["| model | status | reason |", "|---|---|---|"]
            for r in sorted(bad, key=lambda r: (r["status"], r["model"])):
                reason = (r["error"] or "").replace("|", "/")
                lines.append(f"| {r['model']} | {r['status']} | {reason[:200]} |")
            lines.append("")
        fams = defaultdict(list)
        for r in sub:
            fams[r["family"]].append(r)
        lines += ["<details><summary>per family</summary>", "",
                  "| family | models | transformed | ran | full coverage | exact | export used |",
                  "|---|---|---|---|---|---|---|"]
        for fam in sorted(fams):
            rs = fams[fam]
            ran_f = [r for r in rs if r["ran"] == "True" and r["events"]]
            lines.append(
                f"| {fam} | {len(rs)} | {sum(1 for r in rs if r['capture'] and r['status'] in ('ok', 'check-failed'))} "
                f"| {len(ran_f)} | {sum(1 for r in ran_f if r['covered'] == r['events'])} "
                f"| {sum(1 for r in ran_f if r['exact'] == 'True')} | {sum(1 for r in rs if r['capture'] == 'export')} |")
        lines += ["", "</details>", ""]
    secs = sum(float(r["seconds"] or 0) for r in rows)
    lines.append(f"Sum of per-model times: {secs / 3600:.2f} CPU-hours over {len(rows)} models.")
    return "\n".join(lines)


LAYOUT_POLICIES = ("activations", "residual", "residual_branch", "mlp_out")
LAYOUT_FIELDS = ["model", "family", "policy", "status", "sites", "defaults", "warned", "default_sites", "error",
                 "seconds"]


def layout_rows(name, timeout):
    """Rows for one timm model: per placement policy, sites and sites whose channel axis is a default."""
    import torch

    import fxsparse

    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(timeout))
    try:
        model = build("timm", name, "meta")
        x = torch.randn(*input_shape(model), device="meta")
        gm = fxsparse.capture(model, (x,))
        for policy in LAYOUT_POLICIES:
            t0 = time.time()
            row = dict(model=name, family=family("timm", name), policy=policy, status="ok")
            try:
                spliced = copy.deepcopy(gm)
                sites = fxsparse.place(spliced, None, policy)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", fxsparse.LayoutWarning)
                    fxsparse.splice(spliced, sites)  # the axes splice itself decides
                ops = [m for m in spliced.modules() if isinstance(m, fxsparse.MeanSparse)]
                defaults = [f"{op.site}({op.axis_rule})" for op in ops if op.axis_default]
                warned = [re.search(r"of (\d+) site", str(w.message)) for w in caught
                          if issubclass(w.category, fxsparse.LayoutWarning)]
                row.update(sites=len(sites), defaults=len(defaults), default_sites=" ".join(defaults[:3]),
                           warned=sum(int(m.group(1)) for m in warned if m))
            except Exception as exc:
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            row["seconds"] = round(time.time() - t0, 2)
            rows.append(row)
    except Timeout:
        rows.append(dict(model=name, policy="*", status="timeout"))
    except Exception as exc:
        rows.append(dict(model=name, policy="*", status="error",
                         error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"))
    finally:
        signal.alarm(0)
    return rows


def _layout_worker(task):
    import torch

    torch.set_num_threads(1)
    return layout_rows(*task)


def run_layout(args):
    """Layout census over timm models: parallel over --workers processes, resumable (models already in the CSV
    are skipped), one CSV row per model and policy."""
    import random

    import timm

    names = timm.list_models(args.filter or "*")
    if args.sample:
        names = sorted(random.Random(0).sample(names, min(args.sample, len(names))))
    if args.limit:
        names = names[:args.limit]
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {r["model"] for r in csv.DictReader(f)}
    todo = [n for n in names if n not in done]
    print(f"{len(names)} models, {len(names) - len(todo)} already in {args.out}, {len(todo)} to go",
          file=sys.stderr, flush=True)
    new_file = not os.path.exists(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", newline="") as f, mp.get_context("spawn").Pool(args.workers, maxtasksperchild=50) as pool:
        writer = csv.DictWriter(f, LAYOUT_FIELDS)
        if new_file:
            writer.writeheader()
        tasks = [(name, args.timeout) for name in todo]
        for i, rows in enumerate(pool.imap_unordered(_layout_worker, tasks)):
            for row in rows:
                writer.writerow(row)
            f.flush()
            print(f"[{i + 1}/{len(todo)}] {rows[0]['model']}", file=sys.stderr, flush=True)
    print(summarize_layout(args.out))


def summarize_layout(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    models = {r["model"] for r in rows}
    failed = {r["model"] for r in rows if r["status"] != "ok"}
    lines = [f"{len(models)} timm models (meta device), {len(failed)} not examined in full", "",
             "| policy | models | sites | default axes | models with a default | warned sites |", "|---|---|---|---|---|---|"]
    for policy in LAYOUT_POLICIES:
        ok = [r for r in rows if r["policy"] == policy and r["status"] == "ok"]
        sites = sum(int(r["sites"]) for r in ok)
        defaults = sum(int(r["defaults"]) for r in ok)
        with_default = sorted({r["model"] for r in ok if int(r["defaults"])})
        warned = sum(int(r["warned"]) for r in ok)
        lines.append(f"| {policy} | {len(ok)} | {sites} | {defaults} | {len(with_default)} | {warned} |")
    listed = sorted({(r["model"], r["policy"], r["default_sites"]) for r in rows
                     if r["status"] == "ok" and int(r["defaults"] or 0)})
    if listed:
        lines += ["", "Defaults (first sites):"] + [f"- {m} / {p}: {s}" for m, p, s in listed[:40]]
    errors = sorted({(r["model"], r["error"]) for r in rows if r["status"] != "ok"})
    if errors:
        lines += ["", "Not examined:"] + [f"- {m}: {e}" for m, e in errors[:20]]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/census.csv")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per model")
    parser.add_argument("--max-params", type=float, default=30, help="run models up to this many M parameters")
    parser.add_argument("--max-size", type=int, default=320, help="run models whose input side is at most this")
    parser.add_argument("--max-real-params", type=float, default=400,
                        help="when a model fails on the meta device, retry its structure with real random weights "
                             "up to this many M parameters")
    parser.add_argument("--retry", action="store_true", help="examine again the models whose row is not ok")
    parser.add_argument("--compile-every", type=int, default=40, help="compile-check about 1 model in N")
    parser.add_argument("--libraries", nargs="+", default=["timm", "torchvision"])
    parser.add_argument("--filter", help="fnmatch pattern over model names")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--progress", action="store_true", help="progress bar even when not on a terminal")
    parser.add_argument("--summary", metavar="CSV", help="print the Markdown summary of a census CSV and exit")
    parser.add_argument("--layout", action="store_true",
                        help="layout mode: default channel-axis decisions per timm model and placement policy")
    parser.add_argument("--sample", type=int, help="layout mode: a seeded random sample of this many models")
    args = parser.parse_args()
    if args.layout:
        if args.summary:
            print(summarize_layout(args.summary))
        else:
            run_layout(args)
        return
    if args.summary:
        print(summarize(args.summary))
        return
    run(args)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
