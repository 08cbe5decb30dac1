"""LCP and iMAML meta-gradients on conv-4 Omniglot 20-way 1-shot: why the inner problem does (not) settle, and the
seconds per meta-step of each method's cheapest setting reaching cosine >= 0.99 with a tight reference.

A dense Hessian is out of reach (113k parameters), so the reference is the hypergradient both methods compute at
tol = 1e-6 in float64 (iMAML with CG to a 1e-10 residual); it is used only where the two agree to cosine > 0.9999.
Parameters: the seeded initialisation and the parameters after ``--fomaml-steps`` FOMAML meta-steps (Adam 1e-3,
10 inner steps of 0.1).  Per point: the curvature of the inner problem (spectral radius of Hess l_in + lam at
omega, by power iteration, with its sign; the same at the relaxed state and a bound on its smallest eigenvalue
by power iteration on ``c - A``), then the candidate settings in float32, their cosine with the reference and their
time per meta-step (median of ``--reps``, settings interleaved, one torch thread).

    python benchmarks/hypergrad_accuracy_conv4.py --data-root /work/shared/data [--variant relu|smooth]
    # writes benchmarks/results/hypergrad_accuracy_conv4_cpu[_VARIANT].md and .json

``--variant smooth`` replaces ReLU by GELU and max-pooling by average pooling (a smooth inner problem); ``relu`` is
the conv-4 of the few-shot literature (lcp_meta.models.fewshot.Conv4).
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lcp_meta.core.solvers import DivergenceError
from lcp_meta.core.tree import tree_norm
from lcp_meta.fewshot.tasks import OmniglotSource
from lcp_meta.meta import FOMAML, IMAML, LCP
from lcp_meta.meta.dynamics import power_iteration
from lcp_meta.utils import harness

TARGET = 0.99


def build(src, variant, dtype, seed=0):
    torch.manual_seed(seed)
    model = src.build_model()
    if variant == "smooth":
        f = model.features
        for i, mod in enumerate(f):
            if isinstance(mod, nn.ReLU):
                f[i] = nn.GELU()
            elif isinstance(mod, nn.MaxPool2d):
                f[i] = nn.AvgPool2d(2)
    return model.to(dtype)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def meta_grad(method, tb):
    method.model.zero_grad()
    t = time.perf_counter()
    st = method.meta_backward(tb)
    return flat_grad(method.model).double(), st, time.perf_counter() - t


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def curvature(model, tb, lam, iters=30):
    """Per task: Rayleigh quotient of power iteration on Hess l_in + lam at omega (sign kept: negative = the
    dominant eigenvalue is negative), and, at the relaxed state (300 steps), the same and an upper bound on the
    smallest eigenvalue (power iteration on c - A)."""
    m = LCP(model, F.cross_entropy, lam=lam, tol=1e-6, inner_steps=300, power_iters=iters)
    system, params = m._system()
    omega = {k: v.detach() for k, v in params.items()}
    lt = m.lam_tree(params)
    phi, st, _ = m._relax(system, omega, lt, tb.x_support, tb.y_support)
    out = []
    for t in range(tb.num_tasks):
        xs, ys = tb.x_support[t], tb.y_support[t]
        p = {k: v[t] for k, v in phi.items()}
        at_omega = float(power_iteration(system, omega, lt, xs, ys, iters))
        top = float(power_iteration(system, p, lt, xs, ys, iters))
        c = 1.05 * abs(top)
        v = {k: torch.randn_like(w) for k, w in p.items()}
        low = float("nan")
        for _ in range(2 * iters):
            n = tree_norm(v)
            v = {k: w / n for k, w in v.items()}
            av = system.curvature(p, v, lt, xs, ys)
            low = float(sum((v[k] * av[k]).sum() for k in v))
            v = {k: c * v[k] - av[k] for k in v}
        out.append(dict(rq_omega=at_omega, rq_phi=top, min_bound_phi=low, relax_residual_300=float(st.per_sample[t])))
    return out


def settle(model, tb, lam, steps):
    """The automatic relaxation (float64) for ``steps`` steps: final residual per task, the step it started and
    ended with, and how many plain gradient steps raised E (each shrinks the step by 0.7)."""
    m = LCP(model, F.cross_entropy, lam=lam, tol=1e-6, inner_steps=steps)
    system, params = m._system()
    omega = {k: v.detach() for k, v in params.items()}
    lt = m.lam_tree(params)
    t = time.perf_counter()
    phi, st, info = m._relax(system, omega, lt, tb.x_support, tb.y_support)
    a0 = 1.0 / (1.25 * info["lmax"])
    return dict(lam=lam, steps=st.iterations, seconds=time.perf_counter() - t, residual=st.per_sample.tolist(),
                step_start=a0.tolist(), step_end=info["a"].tolist(),
                plain_step_rises=[round(float(torch.log(e / s) / torch.log(torch.tensor(0.7, dtype=e.dtype))))
                                  for s, e in zip(a0, info["a"])])


def candidates(model, lam, tols, cgs, ctols, cap):
    out = []
    for tol in tols:
        for cg in cgs:
            out.append(("imaml", f"tol={tol:g}, cg_steps={cg}",
                        IMAML(model, F.cross_entropy, lam=lam, tol=tol, cg_steps=cg, inner_steps=cap)))
        for ct in ctols:
            out.append(("lcp", f"tol={tol:g}, control_tol={ct:g}",
                        LCP(model, F.cross_entropy, lam=lam, tol=tol, control_tol=ct, inner_steps=cap)))
    return out


def point(name, model, tb, args, log):
    """Reference, curvature, candidates and timings at the current parameters of ``model`` (float32)."""
    rec = {"point": name}
    m64 = build(SRC, args.variant, torch.float64)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    tb64 = tb.to(torch.device("cpu"), torch.float64)
    rec["curvature"] = curvature(m64, tb64, args.lam)
    log(f"{name}: curvature {rec['curvature']}")
    refs = {}
    for mname, meth in (("imaml", IMAML(m64, F.cross_entropy, lam=args.lam, tol=1e-6, cg_steps=500, cg_tol=1e-10,
                                        inner_steps=args.ref_cap)),
                        ("lcp", LCP(m64, F.cross_entropy, lam=args.lam, tol=1e-6, inner_steps=args.ref_cap))):
        try:
            g, st, dt = meta_grad(meth, tb64)
            refs[mname] = g
            rec[f"reference_{mname}"] = dict(seconds=dt, iterations=st.iterations, inner_residual=st.inner_residual,
                                             control_residual=st.control_residual, extra=st.extra)
        except DivergenceError as exc:
            rec[f"reference_{mname}"] = dict(raised=str(exc).split(";")[0])
        log(f"{name}: reference {mname} {rec[f'reference_{mname}']}")
    if len(refs) < 2:
        rec["verdict"] = "no reference: the float64 runs to tol 1e-6 did not both converge"
        return rec
    rec["reference_agreement"] = cos(refs["imaml"], refs["lcp"])
    if rec["reference_agreement"] <= 0.9999:
        rec["verdict"] = f"no reference: the two tight runs agree only to cosine {rec['reference_agreement']:.6f}"
        return rec
    ref = refs["imaml"]
    rows, cands = [], candidates(model, args.lam, args.tols, args.cg_steps, args.control_tols, args.cap)
    for method, setting, meth in cands:
        try:
            g, st, dt = meta_grad(meth, tb)
            rows.append(dict(method=method, setting=setting, cosine=cos(g, ref), first_s=dt, hvps=st.extra.get(
                "hvps", (meth.power_iters + meth.cg_steps) if method == "imaml" else None),
                iterations=st.iterations, inner_residual=st.inner_residual, control_residual=st.control_residual,
                times=[], m=meth))
        except DivergenceError as exc:
            rows.append(dict(method=method, setting=setting, raised=str(exc).split(";")[0]))
        log(f"{name}: {rows[-1]['method']} {rows[-1]['setting']} " + (f"cos {rows[-1]['cosine']:.5f} "
            f"{rows[-1]['first_s']:.1f}s" if "cosine" in rows[-1] else rows[-1]["raised"]))
    # time the few cheapest settings of each method that reach the target (by their first run), interleaved
    timed = []
    for method in ("lcp", "imaml"):
        ok = sorted((r for r in rows if r["method"] == method and r.get("cosine", 0) >= TARGET),
                    key=lambda r: r["first_s"])
        timed += ok[:args.timed]
    rng = random.Random(0)
    for _ in range(args.reps):
        rng.shuffle(timed)
        for r in timed:
            r["times"].append(meta_grad(r["m"], tb)[2])
    for r in rows:
        r.pop("m", None)
        if r.get("times"):
            r["median_s"] = statistics.median(r.pop("times"))
        else:
            r.pop("times", None)
    best = {}
    for method in ("lcp", "imaml"):
        ok = [r for r in rows if r["method"] == method and "median_s" in r]
        best[method] = min(ok, key=lambda r: r["median_s"]) if ok else None
    rec.update(rows=rows, best=best, ratio=(best["lcp"]["median_s"] / best["imaml"]["median_s"]
                                            if best["lcp"] and best["imaml"] else None))
    return rec


def main(argv=None):
    global SRC
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--variant", choices=("relu", "smooth"), default="relu")
    ap.add_argument("--tasks", type=int, default=2, help="meta-batch (20-way 1-shot episodes, 5 queries per class)")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--fomaml-steps", type=int, default=30)
    ap.add_argument("--tols", type=float, nargs="+", default=[3e-2, 1e-2, 3e-3])
    ap.add_argument("--cg-steps", type=int, nargs="+", default=[3, 5, 8])
    ap.add_argument("--control-tols", type=float, nargs="+", default=[0.1, 0.03, 0.01])
    ap.add_argument("--cap", type=int, default=1000, help="inner_steps cap of the candidates")
    ap.add_argument("--ref-cap", type=int, default=3000, help="inner_steps cap of the float64 references")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--timed", type=int, default=2, help="settings per method timed (the fastest first runs)")
    ap.add_argument("--points", nargs="*", default=["init", "fomaml"])
    ap.add_argument("--settle-lams", type=float, nargs="*", default=[],
                    help="only run the automatic relaxation at these lam (float64, --settle-steps steps) at init")
    ap.add_argument("--settle-steps", type=int, default=400)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    SRC = OmniglotSource(20, 1, 5, args.tasks, 0, 1, 1, torch.device("cpu"), torch.float32, data_root=args.data_root)

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    model = build(SRC, args.variant, torch.float32)
    tb = SRC.train_batch(10_000)  # episodes no FOMAML step trains on
    recs = []
    settled = []
    if args.settle_lams:
        m64 = build(SRC, args.variant, torch.float64)
        for lam in args.settle_lams:
            settled.append(settle(m64, tb.to(torch.device("cpu"), torch.float64), lam, args.settle_steps))
            log(f"settle {settled[-1]}")
    if "init" in args.points:
        recs.append(point("init", model, tb, args, log))
    if "fomaml" in args.points:
        fo = FOMAML(model, F.cross_entropy, inner_lr=0.1, inner_steps=10)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(args.fomaml_steps):
            opt.zero_grad()
            fo.meta_backward(SRC.train_batch(step))
            opt.step()
        recs.append(point(f"after {args.fomaml_steps} FOMAML steps", model, tb, args, log))
    cmd = "python benchmarks/hypergrad_accuracy_conv4.py " + " ".join(sys.argv[1:] if argv is None else argv)
    prov = harness.provenance("cpu", cmd.strip())
    suffix = ("" if args.variant == "relu" else f"_{args.variant}") + ("_settle" if settled else "")
    lines = [f"# LCP and iMAML meta-gradients on conv-4 Omniglot 20-way 1-shot ({args.variant}), CPU", "",
             *harness.provenance_lines(prov),
             "- the machine was shared with other jobs (two background Omniglot runs, other helpers' tests): "
             + (f"times are medians of {args.reps} interleaved repetitions" if recs else "times are single runs"),
             f"- {args.tasks} tasks per meta-step (20-way 1-shot, 5 queries per class), conv-4 64 channels, "
             + (f"lam = {args.lam}, candidates float32, references float64" if recs else "lam per row; the \"plain "
                "steps that raised E\" column is the step's total shrink expressed in factors of 0.7"), ""]
    if settled:
        lines += [f"## Does the inner problem settle? ({args.settle_steps} steps of the automatic relaxation, float64)",
                  "", "| lam | residual per task | step start | step end | plain steps that raised E | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['lam']:g} | {', '.join(f'{x:.2e}' for x in r['residual'])} | "
                  f"{', '.join(f'{x:.2e}' for x in r['step_start'])} | {', '.join(f'{x:.2e}' for x in r['step_end'])}"
                  f" | {', '.join(map(str, r['plain_step_rises']))} | {r['seconds']:.0f} |" for r in settled]
        lines.append("")
    for r in recs:
        lines += [f"## {r['point']}", "", "Curvature of the inner problem per task (power iteration, 30 HVPs): "
                  + "; ".join(f"RQ at omega {c['rq_omega']:.3g}, at the relaxed state {c['rq_phi']:.3g}, smallest "
                              f"eigenvalue <= {c['min_bound_phi']:.3g}, relaxation residual after 300 steps "
                              f"{c['relax_residual_300']:.2e}" for c in r["curvature"]), ""]
        for k in ("reference_imaml", "reference_lcp"):
            lines.append(f"- {k}: {r.get(k)}")
        if "verdict" in r:
            lines += ["", f"**{r['verdict']}**", ""]
            continue
        lines += [f"- the two references agree to cosine {r['reference_agreement']:.6f}", ""]
        if r["ratio"] is not None:
            b = r["best"]
            lines += [f"**Cheapest reaching cosine >= {TARGET}:** lcp {b['lcp']['setting']} ({b['lcp']['median_s']:.1f}"
                      f" s/meta-step, cosine {b['lcp']['cosine']:.4f}); imaml {b['imaml']['setting']} "
                      f"({b['imaml']['median_s']:.1f} s, cosine {b['imaml']['cosine']:.4f}). **LCP / iMAML: "
                      f"{r['ratio']:.2f}x**", ""]
        lines += ["| method | setting | cosine | s (first run) | median s | HVPs | inner residual | control residual |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if "raised" in row:
                lines.append(f"| {row['method']} | {row['setting']} | raised: {row['raised']} | | | | | |")
                continue
            lines.append(f"| {row['method']} | {row['setting']} | {row['cosine']:.5f} | {row['first_s']:.1f} | "
                         f"{row.get('median_s', float('nan')):.1f} | {row['hvps']} | {row['inner_residual']:.1e} | "
                         f"{row['control_residual']:.1e} |")
        lines.append("")
    harness.write_results(Path(args.out) / f"hypergrad_accuracy_conv4_cpu{suffix}", {
        **prov, "shared_machine": True, "target_cosine": TARGET, "args": vars(args), "points": recs,
        "settle": settled}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
