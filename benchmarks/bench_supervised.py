"""Seconds per training batch (batch 64, MNIST) of the supervised methods, ours and (with --peer) the authors'.

    python benchmarks/bench_supervised.py --device cpu --threads 1 --models ff,rnn --methods bp,rbp,lcp-di \\
        --batches 20 --warmup 3 --peer /tmp/least-control

One training batch = zero the gradients, ``method.backward`` (the whole controlled or two-phase dynamics),
gradient clipping where the published setting has it, the Adam step and ``method.after_step``.  Every
configuration trains its own model on the same MNIST batches, and the configurations are run *interleaved*,
one batch each in turn, so that load from other processes on a shared machine hits them alike.  Times are
medians over ``--batches`` timed batches after ``--warmup`` batches (process CPU time on the CPU, wall time
on CUDA, synchronised).

``--peer DIR`` also times the authors' implementation (a checkout of the public seijin-kobayashi/least-control,
which has no licence: it is imported from DIR at run time, never copied here) with the settings of its README:
BP, RBP (vanilla solver, 200 iterations, threshold 1e-4) and LCP-DI (800 iterations, threshold 1e-6).

For every LCP-DI configuration of ours the result also holds the cosine between its update (default solver,
at the model's dtype) and the update of the Euler simulation run to a tight tolerance in float64, at the
parameters reached after the timed batches.  Ratios are taken against the fastest BP (ff) / RBP (rnn) in the
table, ours or the authors'.  Writes ``<results>/supervised_<device>.json`` (``rows``: ours, ``peer_rows``: the
authors') and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
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
from lcp_meta.utils import atomic_write_text, harness, resolve_device  # noqa: E402

# targets: LCP-DI within 5x of the fastest BP on ff, within 1.5x of the fastest RBP on rnn
TARGETS = {"ff": ("bp", 5.0), "rnn": ("rbp", 1.5)}
FROZEN = False  # --frozen: no optimizer step, every batch's update is computed at the initial parameters


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """One of our (model, method) configurations training on its own copy of the model."""

    impl = "lcp_meta"

    def __init__(self, model_name, method_name, in_shape, device, seed, **overrides):
        torch.manual_seed(seed)
        self.model_name, self.method_name = model_name, method_name
        self.impl = "lcp_meta" + "".join(f" {k}={v}" for k, v in overrides.items())
        self.model = build_model(model_name, in_shape=in_shape, num_classes=10).to(device)
        hp = {k: v for k, v in default_hparams(model_name, method_name).items() if k not in TRAINER_KEYS}
        hp.update(overrides)
        control = hp.pop("control_options", None)  # ControlProblem fields (e.g. euler-flat's handover_tol)
        self.hp = hp
        self.initial = copy.deepcopy(self.model)  # for the update cosine at the initial parameters
        self.method = make_method(method_name, self.model, **hp)
        if control:
            self.method.control_options = control
        self.clip = trainer_defaults("mnist", model_name, method_name)["grad_clip"]
        self.params = list(self.method.parameters())
        self.opt = torch.optim.Adam(self.params, lr=1e-3)
        self.errors = 0
        self.sample_iterations = []  # per batch: mean over samples of each sample's count (active-set solves)
        self.newton = []  # per batch: LCP-DI's per-sample Newton counts (samples handed over, solved, Jacobians)

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        try:
            stats = self.method.backward(x, y)
        except DivergenceError as exc:  # timed all the same: the work was done
            self.errors += 1
            st = exc.stats
            self.newton.append(dict(st.extra or {}) if st is not None else {})
            self.sample_iterations.append(float("nan") if st is None else float(st.mean_iterations or st.iterations))
            return float(st.iterations) if st is not None else float("nan")
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not FROZEN:
            self.opt.step()
            self.method.after_step()
        self.sample_iterations.append(float(stats.get("mean_iterations", stats.get("iterations", 0))))
        self.newton.append({k: v for k, v in stats.items() if k.startswith("newton_")})
        return float(stats.get("iterations", 0))

    def update_cosine(self, x, y, model=None):
        """Cosine of the default solver's update with the tight float64 Euler update, at the current parameters
        (or those of ``model``); None where the Euler simulation itself does not settle."""
        model = self.model if model is None else model
        def grads(method):
            method.backward(x.to(next(method.model.parameters()).dtype), y)
            return torch.cat([p.grad.reshape(-1).double() for p in method.parameters()])
        tight = dict(self.hp, solver="euler", tol=1e-12, max_iter=50000, max_residual=1e-6)
        try:
            torch.manual_seed(1)
            fast = grads(make_method(self.method_name, copy.deepcopy(model), **self.hp))
            torch.manual_seed(1)
            ref = grads(make_method(self.method_name, copy.deepcopy(model).double(), **tight))
        except DivergenceError as exc:  # at these parameters the dynamics do not settle on this batch
            print(f"{self.model_name}/{self.method_name}: no cosine: {exc}", flush=True)
            return None
        return float(fast @ ref / (fast.norm() * ref.norm()))


class Peer:
    """The authors' implementation, run as their ``train()`` loop runs one batch (README settings)."""

    impl = "authors"
    SETTINGS = {"bp": dict(solver_max_iter=800, solver_error_threshold=1e-4),
                "rbp": dict(solver_max_iter=200, solver_error_threshold=1e-4),
                "lcp-di": dict(solver_max_iter=800, solver_error_threshold=1e-6)}

    def __init__(self, peer_dir, model_name, method_name, in_shape, device, seed, batches_total):
        import argparse as ap
        sys.path.insert(0, str(peer_dir))
        import fixpoint_solver
        import fixpoint_trainer
        import implicit_model
        torch.manual_seed(seed)
        self.model_name, self.method_name = model_name, method_name
        args = ap.Namespace(model=model_name, rnn_hidden_units=256, trainer=method_name, solver="vanilla",
                            solver_threshold_metric="l2", alpha=0.1, dt=1.0, k_i=1.0, k_p=0.0, tau_v=1.0, tau_u=1.0,
                            tau_e=1.0, metagrad_clip=10.0 if model_name == "rnn" else -1.0,
                            **self.SETTINGS[method_name])
        self.args = args
        self.model = implicit_model.get_impliciti_model(args, list(in_shape), 10).to(device)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.solver = fixpoint_solver.get_fp_solver(args)
        self.trainer = fixpoint_trainer.get_fp_trainer(self.loss_fn, self.solver, args)
        self.aux = self.trainer.get_auxiliary_module(self.model, device)
        self.opt = torch.optim.Adam(list(self.model.parameters()) + list(self.aux.parameters()), 1e-3)
        # their schedule runs over 30 epochs of 937 batches: over a benchmark's few batches the lr stays at 1e-3
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, 30 * 937, eta_min=1e-4)
        self.errors = 0

    def step(self, x, y):
        before = getattr(self.solver, "inner_loop_length", 0)
        yp = self.trainer.forward_train(self.model, x, y, auxiliary_module=self.aux)
        self.opt.zero_grad()
        self.loss_fn(yp, y).backward()
        if self.args.metagrad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.args.metagrad_clip)
            torch.nn.utils.clip_grad_norm_(self.aux.parameters(), max_norm=self.args.metagrad_clip)
        if not FROZEN:
            self.opt.step()
            self.sched.step()
        return float(getattr(self.solver, "inner_loop_length", 0) - before)


def run_interleaved(runners, loader, device, warmup, batches):
    """Each runner trains on the same batches; per batch index every runner takes its step in turn."""
    times = {id(r): [] for r in runners}
    iters = {id(r): [] for r in runners}
    it = iter(loader)
    for b in range(warmup + batches):
        x, y = next(it)
        for r in runners:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            n = r.step(x, y)
            _sync(device)
            if b >= warmup:
                times[id(r)].append((time.perf_counter() - t0, time.process_time() - c0))
                iters[id(r)].append(n)
    rows = []
    for r in runners:
        wall = [t[0] for t in times[id(r)]]
        cpu = [t[1] for t in times[id(r)]]
        ok = [i for i in iters[id(r)] if i == i]
        rows.append({"model": r.model_name, "method": r.method_name, "impl": r.impl,
                     "seconds_per_batch": statistics.median(cpu if device.type == "cpu" else wall),
                     "wall_seconds_per_batch": statistics.median(wall), "cpu_seconds_per_batch": statistics.median(cpu),
                     "min_seconds": min(cpu if device.type == "cpu" else wall),
                     "mean_iterations": statistics.fmean(ok) if ok else None, "errors": r.errors,
                     "batches": len(wall)})
        if getattr(r, "sample_iterations", None):  # ours: each sample's own count (below the slowest's with active sets)
            ok_s = [i for i in r.sample_iterations[-len(wall):] if i == i]
            rows[-1]["mean_sample_iterations"] = statistics.fmean(ok_s) if ok_s else None
        if any(getattr(r, "newton", None) or []):  # LCP-DI's per-sample Newton over the timed batches (sums)
            timed = r.newton[-len(wall):]
            keys = ("newton_samples", "newton_solved", "newton_jacobians")
            rows[-1]["newton"] = {k: sum(d.get(k, 0) for d in timed) for k in keys}
            rows[-1]["newton"]["batches_with_newton"] = sum(bool(d.get("newton_samples")) for d in timed)
    return rows


def ratios_of(rows, peer_rows):
    out = {}
    for model_name, (base, target) in TARGETS.items():
        everything = rows + peer_rows
        bases = [r for r in everything if r["model"] == model_name and r["method"] == base]
        dis = [r for r in everything if r["model"] == model_name and r["method"] == "lcp-di"]
        if not bases or not dis:
            continue
        fastest = min(bases, key=lambda r: r["seconds_per_batch"])
        out[model_name] = {"baseline": f"{fastest['impl']} {base}", "target": target,
                           "baseline_ms": 1e3 * fastest["seconds_per_batch"]}
        for r in dis:
            ratio = r["seconds_per_batch"] / fastest["seconds_per_batch"]
            out[model_name][f"lcp-di ({r['impl']}) / fastest {base}"] = ratio
            if r["impl"] == "lcp_meta":
                out[model_name]["ratio"], out[model_name]["met"] = ratio, ratio <= target
    return out


def write_markdown(meta, rows, peer_rows, ratios, path):
    """The results table as markdown (also rebuilt from the JSON with ``--markdown-only``)."""
    lines = ["# Supervised training speed (MNIST, batch 64)", "", *harness.provenance_lines(meta),
             f"- median over {meta['timed_batches']} timed batches after {meta['warmup_batches']} warm-up batches; "
             + ("one batch = backward (all dynamics) + clip, **no optimizer step**: every update is computed at the "
              "initial parameters (seed 0), on successive batches" if meta.get("frozen") else
              "one batch = backward (all dynamics) + clip + Adam step (lr 1e-3); every configuration trains its own "
              "model on the same batches"),
             "- the machine was shared with other jobs: the configurations ran interleaved (one batch each in turn) "
             "and the times are process CPU times" + (f"; load average at the end {meta['load_average']:.1f} on "
                                                       f"{meta['cores']} cores" if meta.get("load_average") else ""),
             "", "| model | method | implementation | ms / batch | wall ms / batch | mean iterations (per sample) | "
             "1 - cosine with the tight Euler update (initial / final parameters) | batches that raised |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows + peer_rows:
        it, its = r.get("mean_iterations"), r.get("mean_sample_iterations")
        per = f" ({its:.0f})" if its is not None and it is not None and round(its) != round(it) else ""
        cos = " / ".join("-" if r.get(k) is None else f"{1 - r[k]:.1e}" for k in ("update_cosine_init", "update_cosine"))
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {1e3 * r['seconds_per_batch']:.1f} | "
                     f"{1e3 * r['wall_seconds_per_batch']:.1f} | {'-' if it is None else f'{it:.0f}'}{per} | "
                     f"{cos if 'update_cosine' in r else '-'} | {r.get('errors', 0)} |")
    newton = [r for r in rows + peer_rows if r.get("newton")]
    if newton:
        lines += ["", "Per-sample Newton on the samples the reduced iteration does not settle (sums over the timed batches):", ""]
        lines += [f"- {r['model']} {r['method']} ({r['impl']}): {n['newton_samples']} samples handed over in "
                  f"{n['batches_with_newton']} of {r['batches']} batches, {n['newton_solved']} solved, "
                  f"{n['newton_jacobians']} Jacobians" for r in newton for n in [r["newton"]]]
    lines += ["", "Ratios against the fastest baseline in the table (targets: ff <= 5x BP, rnn <= 1.5x RBP):", ""]
    for model_name, r in ratios.items():
        parts = [f"{k} = {v:.2f}x" for k, v in r.items() if k.startswith("lcp-di")]
        verdict = "met" if r.get("met") else "not met"
        lines.append(f"- {model_name} (fastest: {r['baseline']}, {r['baseline_ms']:.1f} ms): {', '.join(parts)}; "
                     f"target {r['target']}x: {verdict}")
    atomic_write_text("\n".join(lines) + "\n" + meta.get("notes", ""), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--models", default="ff,rnn")
    p.add_argument("--methods", default="bp,rbp,lcp-di", help="comma list or 'all'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peer", default=None, help="checkout of seijin-kobayashi/least-control to time beside ours")
    p.add_argument("--also-tol", type=float, default=None,
                   help="also time LCP-DI at this tolerance (reported in variant_rows, not in rows or ratios)")
    p.add_argument("--also-newton-off", action="store_true",
                   help="also time LCP-DI without its per-sample Newton for stalled samples (newton='off'; reported in "
                        "variant_rows, not in rows or ratios)")
    p.add_argument("--also-generic-map", action="store_true",
                   help="also time rnn LCP-DI with the generic reduced map (model.step_terms, Newton output step) "
                        "instead of the flat one (model.controlled_terms); reported in variant_rows")
    p.add_argument("--also-solver", default=None,
                   help="comma list of LCP-DI solvers to time beside the default (e.g. 'euler-flat': the faithful "
                        "Euler dynamics on one flat state with an active set)")
    p.add_argument("--lcp-options", default=None,
                   help="JSON dict of LCP-DI settings for every lcp-di configuration, e.g. the paper preset's stop "
                        "'{\"stop_rule\": \"batch\", \"max_residual\": Infinity}'")
    p.add_argument("--frozen", action="store_true",
                   help="skip the optimizer step: time the updates at the initial parameters (no training drift); "
                        "writes supervised_<device>_frozen.*")
    p.add_argument("--no-cosine", action="store_true", help="skip the tight-Euler cosine of the LCP-DI updates")
    p.add_argument("--data-root", default=os.environ.get("LCP_META_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--markdown-only", action="store_true", help="rebuild the .md from the JSON of --device")
    args = p.parse_args(argv)
    if args.markdown_only:
        stem = Path(args.results) / (f"supervised_{resolve_device(args.device).type}" + ("_frozen" if args.frozen else ""))
        saved = json.loads(stem.with_suffix(".json").read_text())
        write_markdown(saved["meta"], saved["rows"], saved.get("peer_rows", []) + saved.get("variant_rows", []),
                       saved["ratios"], stem.with_suffix(".md"))
        return 0
    global FROZEN
    FROZEN = args.frozen
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    methods = list(METHOD_NAMES) if args.methods == "all" else args.methods.split(",")
    x, y = load_mnist(args.data_root, "train", device=device)
    loader = TensorBatches(x, y, 64, drop_last=True, seed=args.seed)
    in_shape = tuple(x.shape[1:])
    try:
        lcp_options = json.loads(args.lcp_options) if args.lcp_options else {}
    except json.JSONDecodeError as exc:
        p.error(f"--lcp-options must be a JSON dict, got {args.lcp_options!r} ({exc})")
    if not isinstance(lcp_options, dict):
        p.error(f"--lcp-options must be a JSON dict, got {args.lcp_options!r}")
    runners, skipped = [], []
    for model_name in args.models.split(","):
        for method_name in methods:
            lcp = lcp_options if method_name == "lcp-di" else {}
            try:
                runners.append(Ours(model_name, method_name, in_shape, device, args.seed, **lcp))
            except (ValueError, TypeError, NotImplementedError) as exc:  # a combination the registry rejects
                skipped.append(f"{model_name}/{method_name}: {exc}")
            if method_name == "lcp-di" and args.also_tol:  # the same solver at the baseline's tolerance
                runners.append(Ours(model_name, method_name, in_shape, device, args.seed, tol=args.also_tol))
            if method_name == "lcp-di" and args.also_newton_off:  # the same solver without per-sample Newton
                runners.append(Ours(model_name, method_name, in_shape, device, args.seed, newton="off"))
            if method_name == "lcp-di" and args.also_generic_map and model_name == "rnn":  # the map before issue 9's
                # flat state: the instance attribute hides the method, and control.py takes the generic map
                runners.append(Ours(model_name, method_name, in_shape, device, args.seed))
                runners[-1].model.controlled_terms = None
                runners[-1].impl += " generic-map"
            for solver in (args.also_solver.split(",") if args.also_solver and method_name == "lcp-di" else []):
                runners.append(Ours(model_name, method_name, in_shape, device, args.seed, **lcp, solver=solver))
            if args.peer and method_name in Peer.SETTINGS and model_name in ("ff", "rnn") and \
                    not (method_name == "bp" and model_name == "rnn"):
                runners.append(Peer(args.peer, model_name, method_name, in_shape, device, args.seed,
                                    args.warmup + args.batches))
    all_rows = run_interleaved(runners, loader, device, args.warmup, args.batches)
    if not args.no_cosine:
        xc, yc = next(iter(loader))
        for r, row in zip(runners, all_rows):
            if r.impl.startswith("lcp_meta") and r.method_name in ("lcp-di", "lcp-di-kp"):
                row["update_cosine_init"] = r.update_cosine(xc, yc, r.initial)
                row["update_cosine"] = r.update_cosine(xc, yc)
    rows = [r for r in all_rows if r["impl"] == "lcp_meta"]
    peer_rows = [r for r in all_rows if r["impl"] == "authors"]
    variant_rows = [r for r in all_rows if r["impl"] not in ("lcp_meta", "authors")]
    for r in all_rows:
        it = r["mean_iterations"]
        print(f"{r['model']:4s} {r['method']:10s} {r['impl']:9s} {1e3 * r['seconds_per_batch']:8.1f} ms/batch "
              f"({'-' if it is None else f'{it:.0f}'} it)" +
              "".join(f" {k} {r[k]}" for k in ("update_cosine_init", "update_cosine") if k in r), flush=True)
    ratios = ratios_of(rows, peer_rows)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]) if argv is None else \
        "python benchmarks/bench_supervised.py " + " ".join(argv)
    meta = {**harness.provenance(device, command), "batch_size": 64, "timed_batches": args.batches,
            "warmup_batches": args.warmup, "command": command, "interleaved": True, "frozen": args.frozen,
            "peer": "seijin-kobayashi/least-control" if args.peer else None, "skipped": skipped,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "cores": os.cpu_count()}
    stem = Path(args.results) / (f"supervised_{device.type}" + ("_frozen" if args.frozen else ""))
    harness.write_json({"meta": meta, "rows": rows, "peer_rows": peer_rows, "variant_rows": variant_rows,
                        "ratios": ratios}, stem.with_suffix(".json"))
    write_markdown(meta, rows, peer_rows + variant_rows, ratios, stem.with_suffix(".md"))
    for model_name, r in ratios.items():
        print(f"{model_name}: " + ", ".join(f"{k} = {v:.2f}x" for k, v in r.items() if k.startswith("lcp-di")))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
