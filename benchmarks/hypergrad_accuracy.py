"""Accuracy of each meta-gradient against the exact hypergradient lam (Hess l_in + lam I)^-1 grad l_out(phi*).

A float64 1-10-1 tanh sinusoid regressor, 2 tasks of 6 support / 6 query points, lam = 2, inner dynamics solved
to a relative change of 1e-12; the reference comes from a dense Hessian (lcp_meta.meta.reference).

    python benchmarks/hypergrad_accuracy.py      # writes benchmarks/results/hypergrad_accuracy_cpu.md
"""
import datetime
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lcp_meta.meta import IMAML, LCP, ContrastiveMeta
from lcp_meta.meta.reference import exact_hypergradient
from lcp_meta.models import MetaMLP

DT = torch.float64


def problem(seed=0, T=2, n=6):
    torch.manual_seed(seed)
    model = MetaMLP(1, (10,), 1, activation="tanh").double()
    amp, phase = 0.5 + 0.5 * torch.rand(T, 1, 1, dtype=DT), 3 * torch.rand(T, 1, 1, dtype=DT)
    xs, xq = 4 * torch.rand(T, n, 1, dtype=DT) - 2, 4 * torch.rand(T, n, 1, dtype=DT) - 2
    return model, (xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase))


def main():
    torch.set_num_threads(1)
    model, tasks = problem()
    ref = exact_hypergradient(model, F.mse_loss, *tasks, lam=2.0)
    common = dict(lam=2.0, inner_lr=0.15, inner_steps=1000)
    methods = [
        ("lcp (DI), beta 1e-5", LCP(model, F.mse_loss, beta=1e-5, tol=1e-12, **common)),
        ("lcp (DI), beta 1e-2", LCP(model, F.mse_loss, beta=1e-2, tol=1e-12, **common)),
        ("lcp-direct, beta 1e-5", LCP(model, F.mse_loss, beta=1e-5, controller="direct", tol=1e-12, **common)),
        ("imaml, 62 CG steps", IMAML(model, F.mse_loss, cg_steps=62, tol=1e-12, **common)),
        ("imaml, 5 CG steps", IMAML(model, F.mse_loss, cg_steps=5, tol=1e-12, **common)),
        ("cml symmetric, beta 1e-4", ContrastiveMeta(model, F.mse_loss, beta=1e-4, symmetric=True, tol=1e-14,
                                                     **common)),
    ]
    lines = ["# Meta-gradient accuracy against the exact hypergradient (CPU, float64)", "",
             f"- command: `python benchmarks/hypergrad_accuracy.py`",
             f"- device: CPU {platform.machine()}, 1 thread; torch {torch.__version__}, python {platform.python_version()}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             "- problem: " + __doc__.strip().splitlines()[2].strip(), "",
             "| method | cosine | relative error | inner iterations |", "|---|---|---|---|"]
    for name, m in methods:
        model.zero_grad()
        st = m.meta_backward(tasks)
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        cos, rel = float(g @ ref / (g.norm() * ref.norm())), float((g - ref).norm() / ref.norm())
        lines.append(f"| {name} | {cos:.8f} | {rel:.2e} | {st.iterations} |")
        print(lines[-1], flush=True)
    out = Path(__file__).resolve().parent / "results" / "hypergrad_accuracy_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
