"""Seconds per training batch (batch 64, MNIST) of every supervised method on the ff and rnn models.

    python benchmarks/bench_supervised.py --device auto --batches 20

One training batch = zero the gradients, ``method.backward`` (the whole controlled or two-phase dynamics),
gradient clipping where the published setting has it, the Adam step and ``method.after_step``.  Times are
medians over ``--batches`` batches after ``--warmup`` batches (CUDA is synchronised around every batch),
with the mean controller / solver iterations.  Writes ``benchmarks/results/supervised_<device>.json`` and
``.md`` (device, torch version, date, the exact command) next to the authors' published timings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcp_meta.core import DivergenceError  # noqa: E402
from lcp_meta.data.mnist import TensorBatches, load_mnist  # noqa: E402
from lcp_meta.models.supervised import build_model  # noqa: E402
from lcp_meta.supervised import METHOD_NAMES, default_hparams, make_method  # noqa: E402
from lcp_meta.supervised.trainer import TRAINER_KEYS, trainer_defaults  # noqa: E402
from lcp_meta.utils import resolve_device  # noqa: E402

# the authors' timings on a 2-core CPU (seconds per batch of 64), quoted for scale
AUTHORS_CPU = {("ff", "bp"): 3.5e-3, ("ff", "lcp-di"): 185e-3, ("rnn", "rbp"): 32e-3, ("rnn", "lcp-di"): 325e-3}
# targets: LCP-DI within 5x of BP on ff, within 1.5x of RBP on rnn
TARGETS = {"ff": ("bp", 5.0), "rnn": ("rbp", 1.5)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(model_name, method_name, loader, device, warmup, batches, seed):
    torch.manual_seed(seed)
    model = build_model(model_name, in_shape=tuple(loader.x.shape[1:]), num_classes=10).to(device)
    hp = default_hparams(model_name, method_name)
    method = make_method(method_name, model, **{k: v for k, v in hp.items() if k not in TRAINER_KEYS})
    clip = trainer_defaults("mnist", model_name, method_name)["grad_clip"]
    params = list(method.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    times, cpu, iters, skipped = [], [], [], 0
    it = iter(loader)
    for b in range(warmup + batches):
        x, y = next(it)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        try:
            stats = method.backward(x, y)
        except DivergenceError:
            skipped += 1
            continue
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        method.after_step()
        _sync(device)
        if b >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            iters.append(float(stats.get("iterations", 0)))
    if not times:
        return {"seconds_per_batch": None, "mean_iterations": None, "skipped": skipped}
    # process CPU time is the robust number on a shared, oversubscribed CPU (wall time includes waiting)
    return {"seconds_per_batch": statistics.median(times), "min_seconds": min(times),
            "cpu_seconds_per_batch": statistics.median(cpu),
            "mean_iterations": statistics.fmean(iters), "skipped": skipped, "batches": len(times)}


def write_markdown(meta, rows, ratios, path):
    """The results table as markdown (also rebuilt from the JSON with ``--markdown-only``)."""
    cpu = meta["device"].startswith("cpu")
    load = meta.get("load_average")
    lines = ["# Supervised training speed (MNIST, batch 64)", "",
             f"- device: {meta['device_name']} (`{meta['device']}`)",
             f"- torch {meta['torch_version']}, python {meta['python_version']}",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- median over {meta['timed_batches']} timed batches after {meta['warmup_batches']} warm-up batches; "
             "one batch = backward (all dynamics) + clip + Adam step",
             f"- load average at the end: {load:.1f} on {meta['cores']} cores (wall times include waiting for the "
             "CPU; the process CPU time does not)" if load is not None else "- load average: n/a",
             "", "| model | method | ms / batch (wall) | CPU ms / batch (process) | mean iterations | "
             "authors, 2-core CPU (ms) |", "|---|---|---|---|---|---|"]
    skipped = []
    for r in rows:
        spb = r["seconds_per_batch"]
        if not spb:
            skipped.append(f"{r['model']}/{r['method']}: {r.get('error', 'every batch diverged')}")
            continue
        a = r["authors_cpu_seconds"]
        lines.append(f"| {r['model']} | {r['method']} | {1e3 * spb:.1f} | {1e3 * r['cpu_seconds_per_batch']:.1f} | "
                     f"{r['mean_iterations']:.0f} | {f'{1e3 * a:.1f}' if a else '-'} |")
    lines += [""] + [f"- not run: {s}" for s in skipped]
    lines += ["", "Targets: LCP-DI within 5x of BP on ff, within 1.5x of RBP on rnn "
              "(authors on a 2-core CPU: ff 185/3.5 = 53x, rnn 325/32 = 10x).", ""]
    for model_name, r in ratios.items():
        key = next(k for k in r if k.startswith("lcp-di_over"))
        lines.append(f"- {model_name}: {key.replace('_', ' ')} = {r[key]:.1f}x ({'CPU' if cpu else 'wall'} time; "
                     f"target {r['target']}x: {'met' if r['met'] else 'not met'})")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, default=20, help="timed batches per method")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--models", default="ff,rnn")
    p.add_argument("--methods", default="all", help="comma list or 'all'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-root", default=os.environ.get("LCP_META_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--markdown-only", action="store_true", help="rebuild the .md from the JSON of --device")
    args = p.parse_args(argv)
    if args.markdown_only:
        stem = Path(args.results) / f"supervised_{resolve_device(args.device).type}"
        saved = json.loads(stem.with_suffix(".json").read_text())
        write_markdown(saved["meta"], saved["rows"], saved["ratios"], stem.with_suffix(".md"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    methods = list(METHOD_NAMES) if args.methods == "all" else args.methods.split(",")
    x, y = load_mnist(args.data_root, "train", device=device)
    loader = TensorBatches(x, y, 64, drop_last=True, seed=args.seed)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    rows = []
    for model_name in args.models.split(","):
        for method_name in methods:
            try:
                r = bench_one(model_name, method_name, loader, device, args.warmup, args.batches, args.seed)
            except (ValueError, TypeError, NotImplementedError) as exc:  # a combination the registry rejects
                r = {"seconds_per_batch": None, "error": str(exc)}
            r.update(model=model_name, method=method_name, authors_cpu_seconds=AUTHORS_CPU.get((model_name, method_name)))
            rows.append(r)
            spb = r["seconds_per_batch"]
            print(f"{model_name:4s} {method_name:10s} " + (f"{1e3 * spb:9.1f} ms/batch, "
                  f"{1e3 * r['cpu_seconds_per_batch']:9.1f} CPU ms/batch, {r['mean_iterations']:.0f} it"
                  if spb else f"n/a ({r.get('error', 'all batches diverged')})"), flush=True)
    ratios = {}
    for model_name, (base, target) in TARGETS.items():
        # ratios from CPU time on the CPU (robust to other load), from wall time on a GPU
        key = "cpu_seconds_per_batch" if device.type == "cpu" else "seconds_per_batch"
        t = {r["method"]: r.get(key) for r in rows if r["model"] == model_name}
        if t.get("lcp-di") and t.get(base):
            ratios[model_name] = {"lcp-di_over_" + base: t["lcp-di"] / t[base], "target": target,
                                  "met": t["lcp-di"] / t[base] <= target}
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]) if argv is None else \
        "python benchmarks/bench_supervised.py " + " ".join(argv)
    meta = {"device": str(device), "device_name": dev_name, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "batch_size": 64, "timed_batches": args.batches,
            "warmup_batches": args.warmup, "command": command,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"supervised_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    write_markdown(meta, rows, ratios, stem.with_suffix(".md"))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
