"""Our update against the authors' on the same weights and the same batch (float64), for every MNIST method they ran.

    python benchmarks/peer_update_check.py --peer /tmp/least-control --data-root ../shared/data \
        --results benchmarks/results/peer_update_check_cpu.md

``--peer DIR`` is a checkout of the public ``seijin-kobayashi/least-control`` (it has no licence: it is imported from
outside this repository, at run time, and never copied).  For each (model, method) of their README (ff: bp, lcp-di,
lcp-kp, lcp-lf, lcp-ebd; rnn: rbp, lcp-di, lcp-kp, lcp-lf, lcp-ebd) we build our model with the ``paper`` preset,
copy its weights into theirs (and the feedback weights: KP's B and D, LF's Q), run one training batch of MNIST through
both (their ``forward_train`` and ``loss.backward()``, our ``method.backward``), and compare every parameter's
gradient: the relative error ``|g_ours - g_theirs| / |g_theirs|`` over all parameters, the cosine, and the worst
single parameter tensor.  Two settings: ``published`` (each side's own published stop rule and cap, so the two solvers
may stop at slightly different states) and ``tight`` (both to a relative change of 1e-12, or 3000 steps); EBD, which
runs a fixed number of Adam steps, is also compared after 5 steps on both sides.

What is not compared: LF's update of Q (the authors' noisy phase draws its noise in another order than ours; the
parameter gradient of the batch does not depend on it, since Q changes after the update is computed).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcp_meta.supervised import make_method  # noqa: E402
from lcp_meta.supervised.trainer import RunConfig, build_run_model, resolve_hparams  # noqa: E402
from lcp_meta.utils import harness, resolve_device  # noqa: E402

# their trainer names and README settings (run_classification.py's flags) for each of our method names
THEIRS = {"bp": "bp", "rbp": "rbp", "lcp-di": "lcp-di", "lcp-di-kp": "lcp-kp", "lcp-lf": "lcp-lf",
          "lcp-ebd": "lcp-ebd"}
README = {
    ("ff", "bp"): dict(solver_max_iter=800, solver_error_threshold=1e-4),
    ("rnn", "rbp"): dict(solver_max_iter=200, solver_error_threshold=1e-4),
    ("ff", "lcp-di"): dict(solver_max_iter=800, solver_error_threshold=1e-6),
    ("rnn", "lcp-di"): dict(solver_max_iter=800, solver_error_threshold=1e-6),
    ("ff", "lcp-di-kp"): dict(solver_max_iter=800, solver_error_threshold=1e-6, kp_wd=1e-6),
    ("rnn", "lcp-di-kp"): dict(solver_max_iter=800, solver_error_threshold=1e-6, kp_wd=1e-6),
    ("ff", "lcp-lf"): dict(solver_max_iter=800, solver_error_threshold=1e-6, wd_Q=0.01, sigma=0.01, tau_Q=1e5,
                           timescale_factor=5, tau_eps=1.0),
    ("rnn", "lcp-lf"): dict(solver_max_iter=800, solver_error_threshold=1e-6, wd_Q=0.01, sigma=0.01, tau_Q=1e5,
                            timescale_factor=5, tau_eps=1.0),
    ("ff", "lcp-ebd"): dict(solver_max_iter=800, solver_error_threshold=1e-6, ebd_lr=0.01, ebd_optim="adam",
                            ff_init=False),
    ("rnn", "lcp-ebd"): dict(solver_max_iter=200, solver_error_threshold=1e-4, ebd_lr=1e-3, ebd_optim="adam",
                             ff_init=True),
}
TIGHT = dict(tol=1e-12, max_iter=3000)


def _peer_modules(peer_dir: Path):
    sys.path.insert(0, str(peer_dir))
    import fixpoint_solver
    import fixpoint_trainer
    import implicit_model
    return fixpoint_solver, fixpoint_trainer, implicit_model


def settings_of(method_name):
    """The settings compared: each side's published ones; both solves tight (not for BP, which has no solve, nor
    EBD, which runs a fixed number of Adam steps); for EBD a short run of 5 Adam steps (before rounding grows)."""
    if method_name == "bp":
        return ("published",)
    return ("published", EBD_SHORT) if method_name == "lcp-ebd" else ("published", "tight")


EBD_SHORT = "5 Adam steps"


def _ours(model_name, method_name, setting):
    cfg = RunConfig(dataset="mnist", model=model_name, method=method_name, preset="paper", device="cpu")
    _, kwargs = resolve_hparams(cfg)
    if setting == EBD_SHORT:
        kwargs["ebd_steps"] = 5
    if setting == "tight":
        kwargs.update(TIGHT)
        if "solver" in kwargs and kwargs["solver"] not in ("euler", "euler-flat", "sweep"):
            kwargs["solver"] = "euler"
    model = build_run_model(cfg, (1, 28, 28)).double()
    method = make_method(method_name, model, **kwargs)
    return model, method


def _copy_weights(ours, method, peer, aux, model_name, method_name):
    """Our weights (and feedback weights) into their model, in their layout (the pairs of :func:`_pairs`)."""
    with torch.no_grad():
        pairs = _pairs(ours, method, peer, aux, model_name, method_name)
        for _, mine, theirs in pairs:
            theirs.copy_(mine)
        lin = peer.implicit_module.module_list[0][1]
        if lin.bias is not None and not any(theirs is lin.bias for _, _, theirs in pairs):
            lin.bias.zero_()  # their rnn has a recurrent bias; ours has it only under the paper preset
        if method_name == "lcp-lf":
            aux.Q.copy_(method.Q)  # (a buffer, not a trained parameter: not in the pairs)


def _pairs(ours, method, peer, aux, model_name, method_name):
    """``[(name, our tensor, their tensor)]`` of every trained parameter."""
    enc = "encoder.1" if model_name == "ff" else "U"
    imp = "maps.0" if model_name == "ff" else "W"
    mine = dict(ours.named_parameters())
    lin = peer.implicit_module.module_list[0][1]
    pairs = [(f"{enc}.weight", mine[f"{enc}.weight"], peer.encoder_module[1].weight),
             (f"{enc}.bias", mine[f"{enc}.bias"], peer.encoder_module[1].bias),
             (f"{imp}.weight", mine[f"{imp}.weight"], lin.weight),
             ("readout.weight", mine["readout.weight"], peer.decoder_module[2].weight),
             ("readout.bias", mine["readout.bias"], peer.decoder_module[2].bias)]
    if f"{imp}.bias" in mine:
        pairs.append((f"{imp}.bias", mine[f"{imp}.bias"], lin.bias))
    if method_name == "lcp-di-kp":
        fb = dict(method.feedback.named_parameters())
        key = "B.map0" if model_name == "ff" else "B.W"
        pairs += [(key, fb[key], aux.implicit_module.module_list[0][1].weight), ("B.readout", fb["B.readout"], aux.D_t)]
    return pairs


def compare(peer_dir, model_name, method_name, x, y, setting, seed=0):
    fixpoint_solver, fixpoint_trainer, implicit_model = _peer_modules(peer_dir)
    torch.manual_seed(seed)
    ours, method = _ours(model_name, method_name, setting)
    settings = dict(README[(model_name, method_name)])
    if setting == "tight":
        settings.update(solver_max_iter=TIGHT["max_iter"], solver_error_threshold=TIGHT["tol"])
    args = argparse.Namespace(model=model_name, rnn_hidden_units=256, trainer=THEIRS[method_name], solver="vanilla",
                              solver_threshold_metric="l2", alpha=0.1, dt=1.0, k_i=1.0, k_p=0.0, tau_v=1.0,
                              tau_u=1.0, tau_e=1.0, **settings)
    peer = implicit_model.get_impliciti_model(args, [1, 28, 28], 10).double()
    trainer = fixpoint_trainer.get_fp_trainer(torch.nn.CrossEntropyLoss(), fixpoint_solver.get_fp_solver(args), args)
    if setting == EBD_SHORT:  # their EBD runs solver_max_iter Adam steps; set after the solver (of the free start,
        args.solver_max_iter = 5  # rnn) took its own cap from it
    aux = trainer.get_auxiliary_module(peer, torch.device("cpu")).double()
    _copy_weights(ours, method, peer, aux, model_name, method_name)
    # theirs: one batch as their train() runs it (forward_train, zero_grad, loss.backward)
    yp = trainer.forward_train(peer, x, y, auxiliary_module=aux)
    for p in list(peer.parameters()) + list(aux.parameters()):
        p.grad = None
    torch.nn.CrossEntropyLoss()(yp, y).backward()
    # ours
    for p in method.parameters():
        p.grad = None
    stats = method.backward(x, y)
    rows, num, den, dot, n_o, n_t = [], 0.0, 0.0, 0.0, 0.0, 0.0
    for name, mine, theirs in _pairs(ours, method, peer, aux, model_name, method_name):
        g_o = mine.grad if mine.grad is not None else torch.zeros_like(mine)
        g_t = theirs.grad if theirs.grad is not None else torch.zeros_like(theirs)
        d, t = float((g_o - g_t).norm()), float(g_t.norm())
        rows.append((name, d / max(t, 1e-300)))
        num, den = num + d * d, den + t * t
        dot, n_o, n_t = dot + float((g_o * g_t).sum()), n_o + float(g_o.norm()) ** 2, t * t + n_t
    worst = max(rows, key=lambda r: r[1])
    extra = (_ebd_checks(ours, method, peer, trainer, x, y, settings)
             if method_name == "lcp-ebd" and setting == "published" else {})
    return {**extra, "model": model_name, "method": method_name, "setting": setting,
            "rel_error": math.sqrt(num / den), "cosine": dot / math.sqrt(n_o * n_t), "worst": worst[0],
            "worst_rel_error": worst[1], "ours_iterations": float(stats.get("iterations", float("nan"))),
            "ours_residual": float(stats.get("residual", float("nan")))}


def _ebd_checks(ours, method, peer, trainer, x, y, settings):
    """EBD runs a fixed number of Adam steps without settling, and Adam divides by the root of tiny squared gradients:
    its trajectory amplifies rounding.  So next to the update we check the energy itself (its gradient at a random
    state, ours against autograd of theirs) and how much our own update moves for a 1e-13 relative change of the
    input: an update difference at that level is rounding, not a different method."""
    c = ours.encode(x).detach()
    enc = peer.encoder_module(x).detach()
    g = torch.Generator().manual_seed(1)
    v = torch.randn(c.shape, generator=g, dtype=torch.float64)
    out = torch.randn(x.shape[0], 10, generator=g, dtype=torch.float64)
    vv, yy = v.clone().requires_grad_(), out.clone().requires_grad_()
    energy = (0.5 * (vv - peer.implicit_module(enc, vv)).pow(2).sum() + 0.5 * (yy - peer.decoder_module(vv)).pow(2).sum()
              + 1 / trainer.args.alpha * torch.nn.CrossEntropyLoss()(yy, y))
    gv_t, gy_t = torch.autograd.grad(energy, (vv, yy))
    with torch.no_grad():
        gv, gy, _, _ = method.energy_grad(c, y, v, out)
    grad_err = float(torch.sqrt(((gv - gv_t) ** 2).sum() + ((gy - gy_t) ** 2).sum())
                     / torch.sqrt((gv_t ** 2).sum() + (gy_t ** 2).sum()))

    def update(xx):
        for p in method.parameters():
            p.grad = None
        method.backward(xx, y)
        return torch.cat([p.grad.flatten() for p in ours.parameters()])
    a, b = update(x), update(x * (1 + 1e-13))
    return {"energy_grad_rel_error": grad_err, "own_sensitivity_1e-13": float((a - b).norm() / a.norm())}


def _peer_commit(peer_dir) -> str:
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(peer_dir), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", required=True, help="checkout of seijin-kobayashi/least-control (never copied here)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--models", default="ff,rnn")
    p.add_argument("--methods", default="bp,rbp,lcp-di,lcp-di-kp,lcp-lf,lcp-ebd")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "peer_update_check_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from lcp_meta.data.mnist import load_mnist
    xtr, ytr = load_mnist(args.data_root, "train")
    x, y = xtr[:args.batch].double(), ytr[:args.batch]
    rows = []
    for model_name in args.models.split(","):
        for method_name in args.methods.split(","):
            if (model_name, method_name) not in README:
                continue
            for setting in settings_of(method_name):
                r = compare(Path(args.peer), model_name, method_name, x, y, setting)
                print(r, flush=True)
                rows.append(r)
    prov = harness.provenance(resolve_device("cpu"), ["python", "benchmarks/peer_update_check.py", *sys.argv[1:]])
    lines = ["# Our update against the authors' (same weights, same batch, float64)", "",
             *harness.provenance_lines(prov), f"- authors' code: seijin-kobayashi/least-control @ {_peer_commit(args.peer)}",
             f"- batch: the first {args.batch} MNIST training images; weights: our paper-preset initialisation, seed 0 "
             f"(copied into theirs; at trained rnn weights the equations can have several equilibria, "
             f"`supervised_cpu.md`, and two exact solvers may then reach different ones)", "",
             "| model | method | setting | relative error of the update | cosine | worst tensor (its relative error) | "
             "our iterations | our final residual |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['setting']} | {r['rel_error']:.1e} | {r['cosine']:.9f} | "
              f"{r['worst']} ({r['worst_rel_error']:.1e}) | {r['ours_iterations']:.0f} | {r['ours_residual']:.1e} |"
              for r in rows]
    for r in rows:
        if "energy_grad_rel_error" in r:
            short = next((q for q in rows if q["model"] == r["model"] and q["method"] == "lcp-ebd"
                          and q["setting"] == EBD_SHORT), None)
            lines += ["", f"{r['model']} lcp-ebd: the energy gradients agree (at a random state: relative error "
                      f"{r['energy_grad_rel_error']:.1e})"
                      + (f", and so do the updates after 5 Adam steps ({short['rel_error']:.1e})" if short else "")
                      + f"; our own update moves by {r['own_sensitivity_1e-13']:.1e} (relative) when the input changes "
                      f"by 1e-13, so an update difference of that size after {int(r['ours_iterations'])} unsettled Adam "
                      f"steps is amplified rounding, not a different method."]
    lines += ["", "relative error: `|g_ours - g_theirs| / |g_theirs|` over all trained tensors (KP: also the feedback "
              "weights B, D); published: each side's own published stop rule and cap; tight: both solved to a relative "
              "change of 1e-12 (or 3000 steps; ff: our layer-ordered sweep against their Euler loop, the same fixed point). "
              "EBD runs a fixed number of Adam steps (published, and 5 steps on both sides); BP has no solve. The update "
              "is the raw gradient, before clipping and the optimizer.", ""]
    harness.write_results(Path(args.results).with_suffix(""), {**prov, "rows": rows}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
