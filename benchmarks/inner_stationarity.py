"""Does the inner problem of the sinusoid learner have a stationary point that gradient descent reaches?

Runs plain gradient descent on ``l_in(phi) + lam/2 |phi - omega|^2`` (one sinusoid task, K support points, the
few-shot runner's MLP at its initialisation) and records the relative gradient norm ``|grad(phi_t)| / |grad(omega)|``,
the quantity every residual-stopped method (lcp, imaml, cml) must drive below its tolerance.  ReLU learners have
kinks where this norm does not go to zero; smooth (tanh) learners do.

    python benchmarks/inner_stationarity.py --results benchmarks/results/inner_stationarity_cpu.md
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.func import functional_call, grad

from lcp_meta.data.sinusoid import SinusoidTasks
from lcp_meta.models import MetaMLP
from lcp_meta.utils import atomic_write_text, harness

CHECKPOINTS = (10, 100, 300, 1000, 3000)


def trace(activation: str, lr: float, lam: float, steps: int, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = MetaMLP(1, (40, 40), 1, activation=activation).to(dtype)
    omega = {k: v.detach() for k, v in model.named_parameters()}
    tb = SinusoidTasks(shots=10, queries=None).sample(1, seed=seed, dtype=dtype).tasks
    x, y = tb.x_support[0], tb.y_support[0]

    def energy(p):
        prox = sum(((p[k] - omega[k]) ** 2).sum() for k in p)
        return ((functional_call(model, p, (x,)) - y) ** 2).mean() + lam / 2 * prox

    g = grad(energy)
    norm = lambda t: float(sum((v ** 2).sum() for v in t.values()).sqrt())
    phi, g0, out = dict(omega), norm(g(omega)), {}
    for it in range(1, steps + 1):
        gp = g(phi)
        phi = {k: phi[k] - lr * gp[k] for k in phi}
        if it in CHECKPOINTS:
            out[it] = norm(gp) / g0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ap.add_argument("--results", help="write a markdown results file here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    rows = []
    for act, lr in (("relu", 0.01), ("relu", 0.002), ("tanh", 0.01)):
        for seed in (int(s) for s in args.seeds.split(",")):
            r = trace(act, lr, args.lam, max(CHECKPOINTS), seed, dtype)
            rows.append(f"| {act} | {lr:g} | {seed} | " + " | ".join(f"{r[c]:.2e}" for c in CHECKPOINTS) + " |")
            print(rows[-1], flush=True)
    prov = harness.provenance("cpu", f"python benchmarks/inner_stationarity.py {' '.join(argv or sys.argv[1:])}")
    head = ["# Stationarity of the sinusoid learner's inner problem (plain gradient descent)", "",
            *harness.provenance_lines(prov),
            f"- problem: MLP 1-40-40-1 at initialisation, one sinusoid task (K = 10), MSE + lam/2 |phi - omega|^2, "
            f"lam = {args.lam:g}, {args.dtype}",
            "- value: |grad(phi_t)| / |grad(omega)| after t steps (a residual-stopped method needs it below its tol, "
            "e.g. 1e-4)", "",
            "| activation | step | seed | " + " | ".join(f"t = {c}" for c in CHECKPOINTS) + " |",
            "|---|---|---|" + "---|" * len(CHECKPOINTS)]
    text = "\n".join(head + rows) + "\n"
    if args.results:
        atomic_write_text(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
