"""Per-sample Newton on the rnn LCP-DI stragglers (issue 9): how many it solves, at what cost, and what the
samples it does not solve are.

    python benchmarks/rnn_newton.py --batches 20 --reps 2

1. Trains the MNIST rnn with LCP-DI as benchmarks/bench_supervised.py does (seed 0, batch 64, Adam 1e-3, clip 10,
   a refused batch skipped) with ``newton='off'`` and keeps the parameters and the batch of every batch whose
   controlled solve did not converge (the stragglers' batches).
2. On each kept batch, at its parameters: the solve with ``newton='off'`` and with the default, interleaved,
   ``--reps`` times, process CPU time with one thread (the last rep is reported).
3. Untimed: the spectral radius of the reduced map's Jacobian at each Newton solution (``stability``), and in
   each batch Newton did not settle a Levenberg-Marquardt minimisation of |r| for every sample still unsettled
   after 400 reduced steps: a minimum with |r| > 0 at a singular Jacobian says there is no root near it.
Writes rnn_newton_cpu.json and .md next to this file.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcp_meta.core import DivergenceError  # noqa: E402
from lcp_meta.core.control import CONTROL_SOLVERS, ControlProblem, OutputControl  # noqa: E402
from lcp_meta.data.mnist import TensorBatches, load_mnist  # noqa: E402
from lcp_meta.models.supervised import build_model  # noqa: E402
from lcp_meta.supervised import make_method  # noqa: E402
from lcp_meta.supervised.newton import StragglerNewton  # noqa: E402


def collect(x, y, batches):
    torch.manual_seed(0)
    model = build_model("rnn", in_shape=tuple(x.shape[1:]), num_classes=10)
    method = make_method("lcp-di", model, newton="off")
    params = list(method.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    it, kept = iter(TensorBatches(x, y, 64, drop_last=True, seed=0)), []
    for b in range(batches):
        xb, yb = next(it)
        state = copy.deepcopy(model.state_dict())
        opt.zero_grad(set_to_none=True)
        try:
            st = method.backward(xb, yb)
        except DivergenceError:
            kept.append((b, state, xb, yb))
            continue
        if not st["converged"]:
            kept.append((b, state, xb, yb))
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    return kept


def solve(state, xb, yb, **kw):
    model = build_model("rnn", in_shape=tuple(xb.shape[1:]), num_classes=10)
    model.load_state_dict(state)
    method = make_method("lcp-di", model, max_residual=math.inf, **kw)
    t0 = time.process_time()
    st = method.backward(xb, yb)
    return time.process_time() - t0, st, model


def no_root_check(state, xb, yb, start_iter=400):
    """Levenberg-Marquardt on |r| (float64) for each sample the reduced iteration leaves unsettled after
    ``start_iter`` steps: (min |r|, smallest singular value of J there)."""
    model = build_model("rnn", in_shape=tuple(xb.shape[1:]), num_classes=10)
    model.load_state_dict(state)
    model = model.double()
    with torch.no_grad():
        c = model.encode(xb.double())
    out = OutputControl(yb, 10, torch.float64, "ce", 10.0)
    prob = ControlProblem(model, c, out, None, 1e-6, start_iter, 1, active_set=True)
    with torch.no_grad():
        (v, yy, _, _), st = CONTROL_SOLVERS["reduced"](prob)
    newton = StragglerNewton(prob)  # (its residual only)
    res = []
    for r in torch.nonzero(st.per_sample >= 1e-6)[:, 0].tolist():
        cr, oh = c[r:r + 1], out.onehot[r:r + 1]
        F = lambda z: newton.residual(z[None], cr, oh)[0]  # noqa: E731
        z, lam = torch.cat([v[r], yy[r]]), 1e-3
        with torch.no_grad():
            for _ in range(60):
                f, J = F(z), torch.func.jacfwd(F)(z)
                A, g = J.T @ J, J.T @ f
                while lam < 1e10:
                    dz = torch.linalg.solve(A + lam * torch.diag(A.diagonal()), -g)
                    if F(z + dz).norm() < f.norm():
                        z, lam = z + dz, max(lam / 3, 1e-12)
                        break
                    lam *= 4
                if lam >= 1e10:
                    break
            sv = torch.linalg.svdvals(torch.func.jacfwd(F)(z))
        res.append({"sample": r, "min_abs_r": float(F(z).norm()), "smallest_singular_value": float(sv[-1]),
                    "relative_change_after_400": float(st.per_sample[r])})
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y = load_mnist(args.data_root, "train")
    kept = collect(x, y, args.batches)
    rows = []
    for b, state, xb, yb in kept:
        for rep in range(args.reps):
            t_off, s_off, _ = solve(state, xb, yb, newton="off")
            t_on, s_on, _ = solve(state, xb, yb)
        _, s_stab, _ = solve(state, xb, yb, newton_options={"stability": True})
        row = {"batch": b, "off_ms": 1e3 * t_off, "newton_ms": 1e3 * t_on,
               "off": {k: s_off[k] for k in ("converged", "residual", "iterations", "mean_iterations")},
               "newton": {k: v for k, v in s_on.items() if k.startswith("newton_") or k in
                          ("converged", "residual", "iterations", "mean_iterations")},
               "stability": {k: s_stab[k] for k in ("newton_solved", "newton_unstable", "newton_max_rho",
                                                    "newton_max_move")}}
        if not s_on["converged"]:
            row["no_root_check"] = no_root_check(state, xb, yb)
        rows.append(row)
        print(json.dumps(row), flush=True)
    date = subprocess.run(["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python benchmarks/rnn_newton.py " + " ".join(sys.argv[1:]), "date": date,
            "device": f"CPU ({os.cpu_count()} cores, shared with other jobs), 1 torch thread, no GPU",
            "torch": torch.__version__, "load_average": os.getloadavg()[0]}
    here = Path(__file__).resolve().parent / "results"
    (here / "rnn_newton_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# rnn LCP-DI stragglers: per-sample Newton (issue 9)", "",
             f"- command: `{meta['command']}`", f"- device: {meta['device']}; load average {meta['load_average']:.1f}",
             f"- torch {meta['torch']}; date {date}",
             "- the batches of a training run (newton='off', seed 0) whose controlled solve did not converge, each "
             "re-solved at its own parameters without and with Newton, interleaved, process CPU time (last of "
             f"{args.reps} reps); max_residual=inf so that every solve runs to its end", "",
             "| batch | off ms | Newton ms | off: converged / residual | Newton: converged / residual | handed over |"
             " solved | Jacobians | unstable roots (max rho) | max move |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, s = r["newton"], r["stability"]
        lines.append(f"| {r['batch']} | {r['off_ms']:.0f} | {r['newton_ms']:.0f} | {r['off']['converged']} / "
                     f"{r['off']['residual']:.1e} | {n['converged']} / {n['residual']:.1e} | {n['newton_samples']} | "
                     f"{n['newton_solved']} | {n['newton_jacobians']} | {s['newton_unstable']} "
                     f"({s['newton_max_rho']:.4f}) | {s['newton_max_move']:.2f} |")
    tot_off, tot_on = sum(r["off_ms"] for r in rows), sum(r["newton_ms"] for r in rows)
    lines += ["", f"Mean over these {len(rows)} batches: off {tot_off / max(len(rows), 1):.0f} ms, Newton "
              f"{tot_on / max(len(rows), 1):.0f} ms; converged: off {sum(r['off']['converged'] for r in rows)}, "
              f"Newton {sum(r['newton']['converged'] for r in rows)}.", "",
              "In the batches Newton did not settle, every sample still unsettled after 400 reduced steps: "
              "Levenberg-Marquardt on |r| from there (float64); |r| ~ 1e-15 is a root, a minimum |r| > 0 at a "
              "singular Jacobian says there is none near:", ""]
    for r in rows:
        for q in r.get("no_root_check", []):
            lines.append(f"- batch {r['batch']} sample {q['sample']}: relative change {q['relative_change_after_400']:.1e}"
                         f" after 400 steps; min |r| {q['min_abs_r']:.1e}, smallest singular value of J there "
                         f"{q['smallest_singular_value']:.1e}")
    (here / "rnn_newton_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
