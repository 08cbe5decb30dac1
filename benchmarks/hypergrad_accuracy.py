"""Meta-gradient accuracy against the exact hypergradient, and its cost: the cheapest LCP and iMAML settings
reaching cosine >= 0.99 with lam (Hess l_in + lam I)^-1 grad l_out(phi*) (dense Hessian, float64).

Problem: a float64 1-16-16-1 tanh sinusoid regressor, 4 tasks of 10 support / 10 query points on [-3, 3],
amplitudes 0.5-2.5, lam = 1.  Every setting is timed on the same tasks, all settings interleaved in each
repetition (shuffled order, one torch thread), median over repetitions.  Both methods use the same inner
relaxation (automatic step from a power-iteration estimate, residual tolerance ``tol``); iMAML then runs
``cg_steps`` conjugate-gradient steps, LCP its controller until the control residual meets ``control_tol``
(CG-integrated control at the relaxed state, certified by its own residual; at beta = 1e-3 rounds of
relaxation under beta u where beta u moves the inner equilibrium by more than tol).  Both methods are
searched over the same two dimensions: the inner tolerance, and how exactly the linear system is solved
(iMAML: cg_steps; LCP: control_tol, and for tol >= 0.01 also its batch stop rule ``control_stop="batch"``).
Both solve it with the same CG routine (``meta.dynamics.cg_control``): iMAML for a fixed count, LCP until each
task's residual meets control_tol (per task by default; under the batch rule the tasks step together until the
last one meets it, so a task done first goes on with the others at no cost).  The two cheapest settings are then timed again head
to head (``--final-reps`` interleaved pairs) for the ratio.

    python benchmarks/hypergrad_accuracy.py [--reps 7]
    # writes benchmarks/results/hypergrad_accuracy_cpu.md and .json
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lcp_meta.meta import IMAML, LCP, DivergenceError, TaskBatch
from lcp_meta.meta.reference import exact_hypergradient
from lcp_meta.models import MetaMLP
from lcp_meta.utils import harness

DT = torch.float64
LAM = 1.0
TARGET = 0.99
TOLS = (1e-1, 5e-2, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6)  # inner tolerance, both methods
CG_STEPS = (1, 2, 3, 4, 5, 6, 7, 8, 10)                   # iMAML's linear solve
CONTROL_TOLS = (0.3, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01, 1e-3)  # LCP's (and its default, control_tol = tol)


def problem(seed=1, T=4, n=10):
    torch.manual_seed(seed)
    model = MetaMLP(1, (16, 16), 1, activation="tanh").double()
    amp, phase = 0.5 + 2 * torch.rand(T, 1, 1, dtype=DT), 3 * torch.rand(T, 1, 1, dtype=DT)
    xs, xq = 6 * torch.rand(T, n, 1, dtype=DT) - 3, 6 * torch.rand(T, n, 1, dtype=DT) - 3
    return model, TaskBatch(xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase))


def settings(model):
    out = []
    for tol in TOLS:
        for ct in sorted(set(CONTROL_TOLS) | {tol}, reverse=True):
            name = f"tol={tol:g}" if ct == tol else f"tol={tol:g}, control_tol={ct:g}"  # ct == tol: the default
            out.append(("lcp", name, LCP(model, F.mse_loss, lam=LAM, tol=tol, control_tol=ct)))
            if tol >= 1e-2:  # the batch stop rule of the control (tasks step together; see LCP.control_stop)
                out.append(("lcp", f"{name}, control_stop=batch",
                            LCP(model, F.mse_loss, lam=LAM, tol=tol, control_tol=ct, control_stop="batch")))
        for cg in CG_STEPS:
            out.append(("imaml", f"tol={tol:g}, cg_steps={cg}",
                        IMAML(model, F.mse_loss, lam=LAM, tol=tol, cg_steps=cg)))
    for tol in (1e-2, 1e-3, 1e-6):
        out.append(("lcp", f"tol={tol:g}, solver=heavy-ball",
                    LCP(model, F.mse_loss, lam=LAM, tol=tol, solver="heavy-ball")))
    return out


def run(method, tasks):
    # CPU time of this thread (torch runs on it with one thread): other jobs on a shared machine do not
    # inflate it the way they inflate wall time
    method.model.zero_grad()
    t = time.thread_time()
    st = method.meta_backward(tasks)
    dt = time.thread_time() - t
    g = torch.cat([p.grad.reshape(-1) for p in method.model.parameters()])
    return g, st, dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--final-reps", type=int, default=41, help="head-to-head pairs of the two cheapest settings")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tasks = problem()
    ref = exact_hypergradient(model, F.mse_loss, tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query,
                              lam=LAM)
    cands = settings(model)
    rows = {}
    raised = []
    for method, setting, m in list(cands):  # accuracy (and a warm-up)
        try:
            g, st, _ = run(m, tasks)
        except DivergenceError as exc:  # reported, not timed
            raised.append(f"| {method} | {setting} | raised: {str(exc).split(';')[0]} |")
            cands.remove((method, setting, m))
            continue
        rows[(method, setting)] = dict(
            method=method, setting=setting, cosine=float(g @ ref / (g.norm() * ref.norm())),
            rel_error=float((g - ref).norm() / ref.norm()), iterations=st.iterations,
            hvps=st.extra.get("hvps", (st.extra.get("hvps_power", 0))), rounds=st.extra.get("rounds"),
            control_residual=st.control_residual,
            inner_residual=st.inner_residual, converged=st.converged,
            cg_indefinite=st.extra.get("cg_indefinite"), times=[])
        if method == "imaml":  # power iteration + CG steps (+ one HVP per CG step)
            rows[(method, setting)]["hvps"] = m.power_iters + m.cg_steps
        # gradient evaluations of the inner relaxation (LCP's iterations also count its CG steps)
        cg = m.cg_steps if method == "imaml" else (st.extra.get("control_iterations") or 0)
        rows[(method, setting)]["relax_steps"] = st.iterations - (0 if method == "imaml" else cg)
    order = list(range(len(cands)))
    rng = random.Random(0)
    for _ in range(args.reps):  # interleaved timing
        rng.shuffle(order)
        for i in order:
            method, setting, m = cands[i]
            rows[(method, setting)]["times"].append(run(m, tasks)[2])
    for r in rows.values():
        r["median_ms"] = 1e3 * statistics.median(r.pop("times"))
    best = {}
    for name in ("lcp", "imaml"):
        ok = [r for r in rows.values() if r["method"] == name and r["cosine"] >= TARGET and r["converged"] is not None]
        best[name] = min(ok, key=lambda r: r["median_ms"]) if ok else None
    ratio = best["lcp"]["median_ms"] / best["imaml"]["median_ms"] if best["lcp"] and best["imaml"] else None
    # the same choice by work instead of by a noisy median: the cost of a setting modelled as
    # c0 + c1 (relaxation steps) + c2 (Hessian-vector products), fitted by least squares to every row's median
    # (both methods pooled: the per-step costs are properties of the problem, not of the method)
    X = torch.tensor([[1.0, r["relax_steps"], r["hvps"]] for r in rows.values()], dtype=torch.float64)
    y = torch.tensor([r["median_ms"] for r in rows.values()], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1).tolist()
    work = lambda r: coef[1] * r["relax_steps"] + coef[2] * r["hvps"]  # noqa: E731
    # LCP's default (per-task) stop alone: a task's meta-gradient independent of its batch-mates
    ok = [r for r in rows.values() if r["method"] == "lcp" and "control_stop" not in r["setting"]
          and r["cosine"] >= TARGET]
    per_task = min(ok, key=lambda r: (work(r), r["median_ms"])) if ok else None
    least = {}
    for name in ("lcp", "imaml"):
        ok = [r for r in rows.values() if r["method"] == name and r["cosine"] >= TARGET and r["converged"] is not None]
        least[name] = min(ok, key=lambda r: (work(r), r["median_ms"])) if ok else None
    head = None
    if ratio is not None and args.final_reps > 0:  # the two least-work settings alone, in pairs of random order
        pick = {n: next(m for meth, sett, m in cands if meth == n and sett == least[n]["setting"]) for n in least}
        pairs = []
        for _ in range(args.final_reps):
            order2 = list(pick)
            rng.shuffle(order2)
            t = {n: run(pick[n], tasks)[2] for n in order2}
            pairs.append((t["lcp"], t["imaml"]))
        lt, it = [1e3 * a for a, _ in pairs], [1e3 * b for _, b in pairs]
        ratios = sorted(a / b for a, b in pairs)
        q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
        head = dict(pairs=len(pairs), lcp=least["lcp"]["setting"], imaml=least["imaml"]["setting"],
                    lcp_work=(least["lcp"]["hvps"], least["lcp"]["relax_steps"]),
                    imaml_work=(least["imaml"]["hvps"], least["imaml"]["relax_steps"]),
                    lcp_ms=statistics.median(lt), imaml_ms=statistics.median(it),
                    ratio_of_medians=statistics.median(lt) / statistics.median(it),
                    median_pair_ratio=statistics.median(ratios), pair_ratio_q25=q(0.25), pair_ratio_q75=q(0.75))

    prov = harness.provenance("cpu", "python benchmarks/hypergrad_accuracy.py" + (
        f" --reps {args.reps}" if args.reps != 7 else "") + (
        f" --final-reps {args.final_reps}" if args.final_reps != 41 else ""))
    lines = ["# Meta-gradient accuracy against the exact hypergradient, and its cost (CPU, float64)", "",
             *harness.provenance_lines(prov),
             "- times are CPU times of the computing thread (one torch thread), medians of "
             f"{args.reps} repetitions, all settings interleaved in shuffled order in each repetition (robust to, "
             "not immune from, other jobs on a shared machine)",
             "- problem: 1-16-16-1 tanh sinusoid regressor, 4 tasks x 10 support / 10 query points, lam = 1; "
             "reference: dense-Hessian hypergradient at the Newton-solved inner problem", "",
             f"**Cheapest setting reaching cosine >= {TARGET}:** "
             + "; ".join(f"{n}: {b['setting']} ({b['median_ms']:.1f} ms, cosine {b['cosine']:.5f})" if b else f"{n}: none"
                         for n, b in best.items())
             + (f". **LCP / iMAML time: {ratio:.2f}x** (target <= 1.0x)." if ratio else ""),
             *([] if head is None else [
                 "", f"**Head to head at the least work reaching cosine >= {TARGET}** (work: the fit "
                 f"{coef[0]:.1f} ms + {coef[1]:.2f} ms per relaxation step + {coef[2]:.2f} ms per Hessian-vector product "
                 f"over all rows; {head['pairs']} interleaved pairs): LCP {head['lcp']} ({head['lcp_work'][0]} "
                 f"HVPs, {head['lcp_work'][1]} relaxation steps) {head['lcp_ms']:.1f} ms, iMAML {head['imaml']} "
                 f"({head['imaml_work'][0]} HVPs, {head['imaml_work'][1]} relaxation steps) {head['imaml_ms']:.1f} ms "
                 f"(medians): **{head['ratio_of_medians']:.3f}x**; "
                 f"per-pair ratio median {head['median_pair_ratio']:.3f} (quartiles {head['pair_ratio_q25']:.3f} - "
                 f"{head['pair_ratio_q75']:.3f})."]),
             *([] if per_task is None or least["imaml"] is None else [
                 "", f"LCP with its default per-task stop (a task's result independent of its batch-mates): least work "
                 f"{per_task['setting']} ({per_task['hvps']} HVPs, {per_task['relax_steps']} relaxation steps, cosine "
                 f"{per_task['cosine']:.5f}); modelled work {work(per_task) / work(least['imaml']):.2f}x iMAML's."]),
             "", "| method | setting | cosine | relative error | median CPU ms | iterations | HVPs | LCP rounds "
             "| control residual | inner residual | converged | CG stopped at p^T A p <= 0 (tasks) | relaxation steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        cr = "-" if r["control_residual"] is None else f"{r['control_residual']:.1e}"
        ir = "-" if r["inner_residual"] is None else f"{r['inner_residual']:.1e}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['cosine']:.6f} | {r['rel_error']:.1e} | "
                     f"{r['median_ms']:.1f} | {r['iterations']} | {r['hvps']} | "
                     f"{'-' if r['rounds'] is None else r['rounds']} | {cr} | {ir} | {r['converged']} | "
                     f"{'-' if r['cg_indefinite'] is None else r['cg_indefinite']} | {r['relax_steps']} |")
    if raised:
        lines += ["", "Settings that raised (DivergenceError; nothing accumulated):", "", "| method | setting | error |",
                  "|---|---|---|"] + raised
    lines += ["", "iMAML's converged flag refers to its inner relaxation; its CG runs a fixed number of steps and its "
              "control residual is the CG residual.  LCP is converged only when its inner residual is below tol and "
              "its control residual below control_tol (default: tol)."]
    harness.write_results(Path(args.out) / "hypergrad_accuracy_cpu", {
        **prov, "shared_machine": True, "target_cosine": TARGET, "best": best, "lcp_over_imaml_time": ratio, "head_to_head": head, "cost_fit_ms": coef, "lcp_per_task_least_work": per_task,
        "rows": list(rows.values()), "raised": raised}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
