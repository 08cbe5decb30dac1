"""Issue 8 (one core): the same LCP work with the code of an older commit and with this tree, interleaved.

Checks that the restructuring changed no number (the gradients are compared bit for bit, the iteration counts
must match) and measures what the shared controllers/systems cost per call.  The older code is imported from a
git worktree: ``git worktree add /tmp/lcp_before d5a5805``, then

    python benchmarks/core_before_after.py --before /tmp/lcp_before [--reps 5] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(root):
    """Import lcp_meta from ``root`` (dropping any lcp_meta imported before)."""
    for k in [k for k in sys.modules if k == "lcp_meta" or k.startswith("lcp_meta.")]:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        return {n: importlib.import_module(n) for n in ("lcp_meta.supervised", "lcp_meta.models", "lcp_meta.meta",
                                                       "lcp_meta.models.fewshot")}
    finally:
        sys.path.pop(0)


def supervised(m, solver):
    torch.manual_seed(0)
    model = m["lcp_meta.models"].build_model("ff", in_shape=(20,), num_classes=5, hidden=(32, 32)).double()
    x, y = torch.randn(16, 20, dtype=torch.float64), torch.randint(0, 5, (16,))
    method = m["lcp_meta.supervised"].make_method("lcp-di", model, solver=solver, tol=1e-8, max_iter=3000,
                                                  max_residual=1.0)

    def run():
        model.zero_grad(set_to_none=True)
        return int(method.backward(x, y)["iterations"])
    return model, run


def meta(m, **kw):
    torch.manual_seed(0)
    model = m["lcp_meta.models.fewshot"].MetaMLP(1, (16, 16), 1, activation="tanh").double()
    T, n = 4, 10
    a, ph = 0.5 + 2 * torch.rand(T, 1, 1, dtype=torch.float64), 3 * torch.rand(T, 1, 1, dtype=torch.float64)
    xs, xq = 6 * torch.rand(T, n, 1, dtype=torch.float64) - 3, 6 * torch.rand(T, n, 1, dtype=torch.float64) - 3
    tb = m["lcp_meta.meta"].TaskBatch(xs, a * torch.sin(xs + ph), xq, a * torch.sin(xq + ph))
    method = m["lcp_meta.meta"].LCP(model, F.mse_loss, lam=1.0, **kw)

    def run():
        model.zero_grad(set_to_none=True)
        return int(method.meta_backward(tb).iterations)
    return model, run


CASES = {
    "supervised lcp-di, euler (ff 20-32-32-5, batch 16, tol 1e-8)": lambda m: supervised(m, "euler"),
    "supervised lcp-di, auto (structured solver)": lambda m: supervised(m, "auto"),
    "meta lcp, di (MLP 1-16-16-1 tanh, 4 tasks, lam 1)": lambda m: meta(m, controller="di"),
    "meta lcp, direct": lambda m: meta(m, controller="direct"),
    "meta lcp, leaky direct (inner_lr 0.05, psi_lr 0.5)": lambda m: meta(m, controller="direct", leaky=True,
                                                                         inner_lr=0.05, psi_lr=0.5),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="a checkout (worktree) of the older commit")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "benchmarks", "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    roots = {"before": os.path.abspath(args.before), "after": HERE}
    runs, grads, iters = {}, {}, {}
    for r, root in roots.items():
        m = load(root)
        for c, make in CASES.items():
            model, fn = make(m)
            iters[r, c] = fn()  # warm-up, and the numbers to compare
            grads[r, c] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            runs[r, c] = fn
    times = {k: [] for k in runs}
    for _ in range(args.reps):
        for c in CASES:
            for r in roots:  # interleaved: both see the same load on a shared machine
                t = time.perf_counter()
                runs[r, c]()
                times[r, c].append(time.perf_counter() - t)
    rows = []
    for c in CASES:
        same = bool(torch.equal(grads["before", c], grads["after", c]))
        rows.append({"case": c, "iterations_before": iters["before", c], "iterations_after": iters["after", c],
                     "gradient_bit_identical": same, "best_s_before": min(times["before", c]),
                     "best_s_after": min(times["after", c])})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = {"command": "python " + " ".join(sys.argv), "date": stamp, "torch": torch.__version__,
            "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, 1 torch thread), no GPU; machine shared",
            "reps": args.reps, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "core_before_after.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    lines = ["# Issue 8: the same work before and after the one-core restructuring", "",
             f"- command: `{info['command']}`", f"- date: {stamp}", f"- device: {info['device']}",
             f"- torch {torch.__version__}; best of {args.reps} interleaved runs per side", "",
             "| case | iterations before / after | gradient bit-identical | best s before | best s after |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['iterations_before']} / {r['iterations_after']} | {r['gradient_bit_identical']} | "
              f"{r['best_s_before']:.4f} | {r['best_s_after']:.4f} |" for r in rows]
    with open(os.path.join(args.out, "core_before_after.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
