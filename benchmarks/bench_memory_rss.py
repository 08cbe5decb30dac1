"""Peak process memory of one meta-step against the number of inner steps, on the CPU.

torch keeps no allocator statistics on the CPU, so each (method, steps) pair runs in a fresh subprocess and
reports the growth of the process's peak resident set size (``ru_maxrss``) over one meta-step, after a
1-step warm-up meta-step has paid for vmap tracing, allocator pools and workspace.  This is a real peak,
intermediate tensors included, unlike the autograd-graph proxy of ``bench_meta.py``.

    python benchmarks/bench_memory_rss.py            # writes benchmarks/results/memory_rss_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import resource, sys, time, torch, torch.nn.functional as F
torch.set_num_threads(1)
from lcp_meta import make_method, TaskBatch
from lcp_meta.models import MetaMLP
name, steps, T, N, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
xs, xq = torch.randn(T, N, 1, generator=g), torch.randn(T, N, 1, generator=g)
tasks = TaskBatch(xs, torch.sin(xs), xq, torch.sin(xq))
model = MetaMLP(1, (H, H), 1)
kw = dict(inner_lr=0.01)
if name in ("lcp", "imaml"):
    kw["lam"] = 1.0
make_method(name, model, F.mse_loss, inner_steps=1, **kw).meta_backward(tasks)   # warm-up
model.zero_grad()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
make_method(name, model, F.mse_loss, inner_steps=steps, **kw).meta_backward(tasks)
sec = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024.0, sec)   # ru_maxrss is in KiB on Linux
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="lcp,imaml,fomaml,maml")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    rows = []
    for name in args.methods.split(","):
        for k in args.steps:
            res = subprocess.run([sys.executable, "-c", CHILD, name, str(k), str(args.tasks), str(args.points),
                                  str(args.hidden)], capture_output=True, text=True, check=True)
            mib, sec = map(float, res.stdout.split()[-2:])
            rows.append(dict(method=name, steps=k, peak_growth_mib=mib, seconds=sec))
            print(f"{name:8s} {k:4d} steps: peak RSS growth {mib:9.1f} MiB, {sec:.2f} s", flush=True)
    import torch
    from lcp_meta.utils import harness
    torch.set_num_threads(1)  # as in the measured children: the provenance says what they ran with
    prov = harness.provenance("cpu", "python benchmarks/bench_memory_rss.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    problem = (f"MetaMLP 1-{args.hidden}-{args.hidden}-1, {args.tasks} tasks x {args.points} support/query points, "
               f"float32, 1 thread, vmapped")
    out = Path(args.out)
    lines = ["# Peak memory per meta-step vs inner steps (CPU, process peak RSS)", "", *harness.provenance_lines(prov)]
    lines += [f"- problem: {problem}", "- measure: growth of the process's peak RSS over one meta-step in a fresh "
              "subprocess, after a 1-step warm-up meta-step", "", "| method | inner steps | peak RSS growth (MiB) | seconds |",
              "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['steps']} | {r['peak_growth_mib']:.1f} | {r['seconds']:.2f} |" for r in rows]
    harness.write_results(out / "memory_rss_cpu", dict(meta={**prov, "problem": problem}, rows=rows), lines)
    print(f"wrote {out / 'memory_rss_cpu.md'}")


if __name__ == "__main__":
    main()
