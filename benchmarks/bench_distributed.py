"""Meta-steps per second of data-parallel meta-training (lcp_meta.distributed) for 1, 2, ... processes.

Every configuration runs under torchrun (also N=1, so start-up is the same) on 127.0.0.1; the ranks time
``meta_steps`` meta-steps of the sinusoid MLP (1-40-40-1, tanh) after ``warmup`` steps, between barriers, and
rank 0 reports.  Rounds alternate over the process counts (1, 2, 1, 2, ...) so that load from other jobs on
a shared machine hits all of them alike; the table gives the median over rounds.

    python benchmarks/bench_distributed.py --nprocs 1 2 --device cpu --rounds 3 \
        --out benchmarks/results/distributed_cpu.md
    python benchmarks/bench_distributed.py --nprocs 1 --device cuda --force-wrap      # one GPU: NCCL path

``--force-wrap`` wraps the method in DistributedMeta also for one process (the NCCL/gloo collectives run on
a group of one), which measures the cost of the reduction itself.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # explicit settings: the timing must not move with the library's defaults
    "maml": dict(inner_lr=0.01, inner_steps=5, tol=None),
    "imaml": dict(inner_lr=0.01, inner_steps=10, lam=1.0, cg_steps=5, tol=None),
    "lcp": dict(lam=10.0, beta=0.1, tol=1e-4, inner_steps=1000),  # the residual-stopped default solver
}


# ------------------------------------------------------------------------------------------- one rank
def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from lcp_meta import distributed as D
    from lcp_meta.core.solvers import DivergenceError
    from lcp_meta.data.sinusoid import SinusoidTasks
    from lcp_meta.fewshot.tasks import mse_loss
    from lcp_meta.meta import make_method
    from lcp_meta.models.fewshot import MetaMLP
    from lcp_meta.utils import harness

    torch.set_num_threads(1)
    with D.session(torch.device(args.device)) as device:
        dtype = torch.float32
        sampler = SinusoidTasks(shots=10, queries=10)
        out = {}
        for name in args.methods:
            torch.manual_seed(0)
            # tanh: the residual-stopped LCP reaches tol on it (on the ReLU MLP its dynamics chatter at the kinks)
            model = MetaMLP(1, (40, 40), 1, activation="tanh").to(device=device, dtype=dtype)
            method = make_method(name, model, mse_loss, **METHODS[name])
            method = D.DistributedMeta(method) if (args.force_wrap or D.world_size() > 1) else method
            opt = torch.optim.Adam(method.parameters(), lr=1e-3)
            batches = [tuple(t.to(device) for t in sampler.sample(args.meta_batch, seed=s, dtype=dtype).tasks)
                       for s in range(args.warmup + args.meta_steps)]
            skipped = 0

            def step(b):
                nonlocal skipped
                opt.zero_grad(set_to_none=True)
                try:
                    method.meta_backward(b)
                    opt.step()
                except DivergenceError:  # every rank skips together; the work was done all the same
                    skipped += 1

            for b in batches[:args.warmup]:
                step(b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if D.world_size() > 1:
                dist.barrier()
            t0 = time.perf_counter()
            for b in batches[args.warmup:]:
                step(b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if D.world_size() > 1:
                dist.barrier()
            dt = time.perf_counter() - t0
            out[name] = {"steps_per_s": args.meta_steps / dt, "skipped": skipped}
        if D.is_main():
            dev = harness.provenance(device)["device_name"]
            print("RESULT " + json.dumps({"world_size": D.world_size(), "device": dev, "methods": out,
                                          "wrapped": bool(args.force_wrap or D.world_size() > 1)}), flush=True)


# -------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
           "--device", args.device, "--meta-batch", str(args.meta_batch), "--meta-steps", str(args.meta_steps),
           "--warmup", str(args.warmup), "--methods", *args.methods] + (["--force-wrap"] if args.force_wrap else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{n} process(es) failed (exit {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--meta-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--force-wrap", action="store_true")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None, help="markdown file for the table (printed in any case)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs = {n: [] for n in args.nprocs}
    for _ in range(args.rounds):
        for n in args.nprocs:  # interleaved
            runs[n].append(launch(n, args))
    device = runs[args.nprocs[0]][0]["device"]
    head = ["method"] + [f"{n} proc. (steps/s)" for n in args.nprocs] + \
        [f"speed-up x{n}" for n in args.nprocs[1:]] + ["skipped steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in args.methods:
        med = {n: statistics.median(r["methods"][m]["steps_per_s"] for r in runs[n]) for n in args.nprocs}
        base = med[args.nprocs[0]]
        skipped = sum(r["methods"][m]["skipped"] for n in args.nprocs for r in runs[n])
        row = [m] + [f"{med[n]:.2f}" for n in args.nprocs] + [f"{med[n] / base:.2f}" for n in args.nprocs[1:]] \
            + [str(skipped)]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    from lcp_meta.utils import atomic_write_text, harness
    cmd = ["python", "benchmarks/bench_distributed.py", *(sys.argv[1:] if argv is None else argv)]
    prov = {**harness.provenance("cpu", cmd), "device": args.device, "device_name": device}  # what the workers ran on
    all_rounds = {n: [{m: round(r["methods"][m]["steps_per_s"], 3) for m in args.methods} for r in runs[n]]
                  for n in args.nprocs}
    text = ("# Data-parallel meta-training: meta-steps per second\n\n" + "\n".join(harness.provenance_lines(prov))
            + "\n- one intra-op thread per process\n"
            + f"- work: sinusoid MLP 1-40-40-1 tanh, float32, meta-batch {args.meta_batch}, {args.meta_steps} timed meta-steps "
            f"after {args.warmup} warm-up steps, median of {args.rounds} interleaved rounds"
            f"{'; the DistributedMeta wrapper also for one process' if args.force_wrap else ''}.\n"
            f"Settings: {json.dumps({m: METHODS[m] for m in args.methods})}\n\n{table}\n\n"
            f"All rounds (steps/s): {json.dumps(all_rounds)}\n")
    print(text)
    if args.out:
        atomic_write_text(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
