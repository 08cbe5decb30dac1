"""Benchmark of the meta-learning methods: time and memory per meta-step against inner steps, the cosine
of each meta-gradient to the exact hypergradient, and vmapped vs per-task loop.

    python benchmarks/bench_meta.py --quick            # small CPU run (minutes)
    python benchmarks/bench_meta.py --device cuda      # the full run (GPU)

Writes ``benchmarks/results/meta_<device>.json`` and ``.md``.  Memory is CUDA ``max_memory_allocated``
(peak over the meta-step, minus what was allocated before it) on a GPU; on the CPU it is the bytes of the
tensors saved for backward in the autograd graph held when the meta-gradient is taken
(``MetaStats.extra["graph_bytes"]``), which is what grows with the number of unrolled steps.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lcp_meta.meta import TaskBatch, make_method
from torch.autograd.functional import hessian

from lcp_meta.meta.reference import exact_hypergradient, flat_loss, flatten_params
from lcp_meta.models.fewshot import Conv4, MetaMLP
from lcp_meta.utils import harness, resolve_device

METHODS = ("lcp", "lcp-direct", "imaml", "maml", "fomaml")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_tasks(T, ways, shots, queries, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab_s = torch.arange(ways).repeat(shots).expand(T, -1).clone()
    lab_q = torch.arange(ways).repeat(queries).expand(T, -1).clone()
    xs = torch.rand(T, ways * shots, 1, 28, 28, generator=g, dtype=dtype)
    xq = torch.rand(T, ways * queries, 1, 28, 28, generator=g, dtype=dtype)
    return TaskBatch(xs, lab_s, xq, lab_q).to(device)


def sine_tasks(T, n, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g, dtype=dtype)
    phase = math.pi * torch.rand(T, 1, 1, generator=g, dtype=dtype)
    xs = 10 * torch.rand(T, n, 1, generator=g, dtype=dtype) - 5
    xq = 10 * torch.rand(T, n, 1, generator=g, dtype=dtype) - 5
    return TaskBatch(xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase)).to(device)


def time_step(method, tasks, device, repeats):
    """(median seconds per meta_backward, memory bytes, stats of the last call)."""
    method.model.zero_grad()
    method.meta_backward(tasks)  # warm-up (first calls of torch.func transforms are slow)
    times, mem, stats = [], 0, None
    for _ in range(repeats):
        method.model.zero_grad()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        stats = method.meta_backward(tasks)
        _sync(device)
        times.append(time.perf_counter() - t0)
        mem = (torch.cuda.max_memory_allocated(device) - base if device.type == "cuda"
               else stats.extra.get("graph_bytes", 0))
    return statistics.median(times), int(mem), stats


def higher_maml_step(model, tasks, inner_lr, steps):
    """One MAML meta-gradient through higher.innerloop_ctx (a per-task loop, as higher works)."""
    import higher
    opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    model.zero_grad()
    T = tasks.num_tasks
    for t in range(T):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(tasks.x_support[t]), tasks.y_support[t]))
            (F.cross_entropy(fmodel(tasks.x_query[t]), tasks.y_query[t]) / T).backward()


def bench_scaling(args, device, rows):
    problems = {
        "conv4-20way-1shot": (lambda: Conv4(n_ways=20, hidden=args.channels).to(device), F.cross_entropy,
                              conv_tasks(args.meta_batch, 20, 1, args.queries, device), 0.1),
        "mlp-sinusoid": (lambda: MetaMLP(1, (40, 40), 1).to(device), F.mse_loss,
                         sine_tasks(args.meta_batch, 10, device), 0.01),
    }
    for pname, (build, loss_fn, tasks, lr) in problems.items():
        for name in METHODS:
            for K in args.steps:
                torch.manual_seed(0)
                model = build()
                m = make_method(name, model, loss_fn, inner_lr=lr, inner_steps=K, lam=1.0)
                try:
                    sec, mem, st = time_step(m, tasks, device, args.repeats)
                    row = dict(problem=pname, method=name, inner_steps=K, seconds=sec, memory_bytes=mem,
                               converged=st.converged, residual=st.residual, query_loss_after=st.query_loss_after)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # report, keep going
                    row = dict(problem=pname, method=name, inner_steps=K, error=str(exc).splitlines()[0][:200])
                rows.append(row)
                print(json.dumps(row), flush=True)
        if pname.startswith("conv4") and args.higher:
            for K in args.steps:
                torch.manual_seed(0)
                model = build()
                higher_maml_step(model, tasks, 0.1, K)
                times = []
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    _sync(device)
                    t0 = time.perf_counter()
                    higher_maml_step(model, tasks, 0.1, K)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                mem = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
                row = dict(problem=pname, method="maml-higher", inner_steps=K, seconds=statistics.median(times),
                           memory_bytes=mem)
                rows.append(row)
                print(json.dumps(row), flush=True)


def bench_cosine(args, device, rows):
    """Cosine of each method's meta-gradient to the dense exact hypergradient (float64 MLP)."""
    dtype = torch.float64
    torch.manual_seed(0)
    model = MetaMLP(1, (args.cos_hidden, args.cos_hidden), 1, activation="tanh").to(device, dtype)
    tasks = sine_tasks(args.cos_tasks, 10, device, dtype, seed=1)
    lam = 1.0
    ref = exact_hypergradient(model, F.mse_loss, tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query, lam)
    # step size 1 / (largest eigenvalue of Hess l_in + lam) at omega: stable and as fast as plain GD allows
    loss, (omega, _, _) = flat_loss(model, F.mse_loss), flatten_params(model)
    hmax = max(float(torch.linalg.eigvalsh(hessian(lambda p: loss(p, tasks.x_support[t], tasks.y_support[t]),
                                                   omega, vectorize=True))[-1]) for t in range(tasks.num_tasks))
    lr = 1.0 / (hmax + lam)
    print(f"cosine benchmark: inner_lr = 1/(h_max + lam) = {lr:.4g}", flush=True)
    for name in METHODS:
        for K in args.cos_steps:
            kw = {"beta": 1e-3} if name.startswith("lcp") else {}
            m = make_method(name, model, F.mse_loss, inner_lr=lr, inner_steps=K, lam=lam, **kw)
            model.zero_grad()
            st = m.meta_backward(tasks)
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            cos = float(g @ ref / (g.norm() * ref.norm()))
            row = dict(problem=f"mlp-1-{args.cos_hidden}-{args.cos_hidden}-1-tanh-float64", method=name,
                       inner_steps=K, cosine_to_exact=cos, rel_error=float((g - ref).norm() / ref.norm()),
                       residual=st.residual, inner_lr=lr)
            rows.append(row)
            print(json.dumps(row), flush=True)


def bench_vmap(args, device, rows):
    """vmapped vs per-task loop at meta-batch 16."""
    tasks = sine_tasks(16, 10, device)
    for name in ("lcp", "maml"):
        for use_vmap in (True, False):
            torch.manual_seed(0)
            m = make_method(name, MetaMLP(1, (40, 40), 1).to(device), F.mse_loss, inner_lr=0.01,
                            inner_steps=args.vmap_steps, vmap=use_vmap)
            sec, mem, _ = time_step(m, tasks, device, args.repeats)
            row = dict(problem="mlp-sinusoid-metabatch16", method=name, vmap=use_vmap,
                       inner_steps=args.vmap_steps, seconds=sec, memory_bytes=mem)
            rows.append(row)
            print(json.dumps(row), flush=True)


def bench_training(args, device, rows):
    """A short meta-training run on sinusoid regression: held-out post-adaptation query MSE before/after."""
    test = sine_tasks(64, 10, device, seed=123)
    for name in ("lcp", "lcp-direct", "imaml", "maml", "fomaml", "reptile", "cml"):
        torch.manual_seed(0)
        model = MetaMLP(1, (40, 40), 1).to(device)
        kw = dict(inner_lr=0.01, inner_steps=args.train_inner, lam=0.1) if name not in ("maml", "fomaml", "reptile") \
            else dict(inner_lr=0.01, inner_steps=args.train_inner)
        m = make_method(name, model, F.mse_loss, **kw)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3 if name != "reptile" else 1e-2)
        before = float(F.mse_loss(m.predict(test), test.y_query))
        t0 = time.perf_counter()
        for it in range(args.train_iters):
            opt.zero_grad()
            m.meta_backward(sine_tasks(16, 10, device, seed=1000 + it))
            opt.step()
        row = dict(problem="sinusoid-metatraining", method=name, meta_steps=args.train_iters,
                   inner_steps=args.train_inner, heldout_query_mse_before=before,
                   heldout_query_mse_after=float(F.mse_loss(m.predict(test), test.y_query)),
                   seconds=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)


def write(args, device, rows, command):
    out = Path(args.out)
    prov = harness.provenance(device, command)
    meta = dict(quick=args.quick,
                note=("built-in MAML on conv-4 (affine BatchNorm) uses its hand-written reverse pass over the stored "
                      "trajectory (vmap computes BatchNorm's double backward wrongly in torch 2.x); its memory on "
                      "CPU is then the trajectory's bytes"),
                memory=("CUDA max_memory_allocated over the meta-step (bytes above the pre-step level)"
                        if device.type == "cuda" else
                        "bytes saved for backward in the autograd graph held at the meta-gradient (CPU)"))
    tag = device.type
    lines = [f"# Meta-learning benchmark ({tag})", "", *harness.provenance_lines(prov)]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    scal = [r for r in rows if "seconds" in r and "vmap" not in r and "meta_steps" not in r]
    if scal:
        lines += ["## Seconds / memory per meta-step vs inner steps", "",
                  "| problem | method | steps | seconds | memory (MiB) | converged |", "|---|---|---|---|---|---|"]
        for r in scal:
            mem = "-" if r.get("memory_bytes") is None else f"{r['memory_bytes'] / 2**20:.3f}"
            lines.append(f"| {r['problem']} | {r['method']} | {r['inner_steps']} | {r['seconds']:.4f} | {mem} | "
                         f"{r.get('converged', '-')} |")
    errs = [r for r in rows if "error" in r]
    for r in errs:
        lines.append(f"| {r['problem']} | {r['method']} | {r['inner_steps']} | error: {r['error']} | | |")
    cos = [r for r in rows if "cosine_to_exact" in r]
    if cos:
        lines += ["", "## Cosine to the exact hypergradient lam (H + lam)^-1 grad l_out (dense Hessian)", "",
                  "| problem | method | steps | cosine | rel. error |", "|---|---|---|---|---|"]
        lines += [f"| {r['problem']} | {r['method']} | {r['inner_steps']} | {r['cosine_to_exact']:.6f} | "
                  f"{r['rel_error']:.2e} |" for r in cos]
    vm = [r for r in rows if "vmap" in r]
    if vm:
        lines += ["", "## vmap vs per-task loop (meta-batch 16)", "", "| method | vmap | steps | seconds |",
                  "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['vmap']} | {r['inner_steps']} | {r['seconds']:.4f} |" for r in vm]
    tr = [r for r in rows if "heldout_query_mse_after" in r]
    if tr:
        lines += ["", f"## Sinusoid meta-training ({tr[0]['meta_steps']} meta-steps of 16 tasks, Adam; held-out "
                  f"64 tasks, 10-shot)", "", "| method | inner steps | query MSE before | after | seconds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['inner_steps']} | {r['heldout_query_mse_before']:.3f} | "
                  f"{r['heldout_query_mse_after']:.3f} | {r['seconds']:.1f} |" for r in tr]
    harness.write_results(out / f"meta_{tag}", dict(meta={**prov, **meta}, results=rows), lines)
    print(f"wrote {out / f'meta_{tag}.json'} and .md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="small CPU-sized run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    q = args.quick
    args.steps = args.steps or ([10, 25] if q else [10, 25, 50, 100, 200])
    args.repeats = args.repeats or (1 if q else 3)
    args.meta_batch, args.channels, args.queries = (2, 16, 1) if q else (16, 64, 5)
    args.cos_hidden, args.cos_tasks = (10, 2) if q else (40, 4)
    args.vmap_steps = 10 if q else 50
    args.cos_steps = [10, 25, 100] if q else args.steps
    args.train_iters, args.train_inner = (100, 10) if q else (2000, 25)
    try:
        import higher  # noqa: F401
        args.higher = True
    except ImportError:
        args.higher = False
        print("higher is not installed: skipping the higher MAML comparison", file=sys.stderr)
    rows = []
    bench_scaling(args, device, rows)
    bench_cosine(args, device, rows)
    bench_vmap(args, device, rows)
    bench_training(args, device, rows)
    write(args, device, rows, "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    main()
