"""rnn LCP-DI against RBP at fixed trained parameters (a training checkpoint), and which equilibrium it reaches.

    python benchmarks/rnn_checkpoint_speed.py --checkpoint /tmp/ckpt.pt --batches 30 --reference 12

Loads the model of a ``lcp_meta.supervised`` training checkpoint (copy it first if a run is still writing it),
computes the update of MNIST batches of 64 at those parameters (no optimizer step) with: LCP-DI's default path
('auto': the flat reduced map with per-sample Newton), the same with ``newton='off'``, the generic reduced map
(``model.step_terms``, Newton output step; the map before issue 9's flat state), the faithful Euler dynamics on
one flat state with an active set (solver 'euler-flat'), and RBP; interleaved, one torch
thread, process CPU time.  With ``--reference N`` the first N batches are also solved by the faithful Euler
simulation of the joint dynamics in float64 to relative change 1e-10 (at most 15000 steps), and each update is
compared with it (1 - cosine) where that simulation settles: where the controlled equilibrium is not unique, the
reduced iterations can settle to another one than the dynamics themselves.  They are also compared with the
authors' computation in float64 (the same Euler dynamics with the paper preset's batch-wide stop: 1e-6 or 800
steps, the state reached applied), which the 'paper' variants (batch-wide stop) are the float32 counterparts of.
"""
from __future__ import annotations

import argparse
import math
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
from lcp_meta.supervised import default_hparams, make_method  # noqa: E402
from lcp_meta.supervised.trainer import TRAINER_KEYS  # noqa: E402
from lcp_meta.utils import harness  # noqa: E402

VARIANTS = {  # name: (method, overrides, generic map)
    "lcp-di (default)": ("lcp-di", {}, False),
    "lcp-di newton=off": ("lcp-di", {"newton": "off"}, False),
    "lcp-di euler-flat": ("lcp-di", {"solver": "euler-flat"}, False),
    # the faithful dynamics until a sample's relative change is below 1e-2, the reduced map from there
    "lcp-di euler-flat handover": ("lcp-di", {"solver": "euler-flat", "control_options": {"handover_tol": 1e-2}},
                                   False),
    "lcp-di generic map": ("lcp-di", {}, True),
    "rbp": ("rbp", {}, False),
    # the paper preset's stop rule (batch-wide, the state reached applied): the reduced map it runs today, and the
    # faithful dynamics (the authors' computation) on the flat state
    "paper reduced": ("lcp-di", {"stop_rule": "batch", "max_residual": math.inf}, False),
    "paper euler-flat": ("lcp-di", {"solver": "euler-flat", "stop_rule": "batch", "max_residual": math.inf}, False),
}
REFERENCE = dict(solver="euler", tol=1e-10, max_iter=15000, max_residual=1e-6)
# the authors' computation itself: the joint Euler dynamics, batch-wide stop at 1e-6 or 800 steps, in float64
PAPER_REFERENCE = dict(solver="euler", stop_rule="batch", max_residual=math.inf)


def _update(state, bias, name, x, y, dtype=torch.float32, **extra):
    """(update as a float64 vector or None where the solve was refused, CPU seconds, statistics)."""
    method_name, overrides, generic = VARIANTS.get(name, ("lcp-di", {}, False))
    model = build_model("rnn", in_shape=(1, 28, 28), num_classes=10, recurrent_bias=bias)
    model.load_state_dict(state)
    model = model.to(dtype)
    if generic:
        model.controlled_terms = None  # (the instance attribute hides the method: control.py takes the generic map)
    hp = {k: v for k, v in default_hparams("rnn", method_name).items() if k not in TRAINER_KEYS}
    kw = {**hp, **overrides, **extra}
    control = kw.pop("control_options", None)
    method = make_method(method_name, model, **kw)
    if control:
        method.control_options = control  # (ControlProblem fields, not a method argument)
    t0 = time.process_time()
    try:
        stats = method.backward(x.to(dtype), y)
    except DivergenceError as exc:
        return None, time.process_time() - t0, (exc.stats.as_dict() if exc.stats is not None else {})
    seconds = time.process_time() - t0
    return torch.cat([p.grad.reshape(-1).double() for p in method.parameters()]), seconds, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--reference", type=int, default=0, help="compare the first N batches with the faithful Euler")
    p.add_argument("--data-root", default=os.environ.get("LCP_META_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of the variants to time (rbp always)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state = ck["model"]
    bias = state.get("W.bias") is not None
    x, y = load_mnist(args.data_root, "train", device=torch.device("cpu"))
    it = iter(TensorBatches(x, y, 64, drop_last=True, seed=args.seed))
    names = [n for n in VARIANTS if n in args.variants.split(",") or n == "rbp"]
    times = {n: [] for n in names}
    refused = {n: 0 for n in names}
    cos = {n: [] for n in names if n != "rbp"}
    cos_paper = {n: [] for n in names if n != "rbp"}
    ref_settled = 0
    for b in range(args.batches):
        xb, yb = next(it)
        updates = {}
        for name in names:  # interleaved, one batch each in turn
            g, sec, _ = _update(state, bias, name, xb, yb)
            times[name].append(sec)
            refused[name] += g is None
            updates[name] = g
        if b < args.reference:
            ref, _, _ = _update(state, bias, "reference", xb, yb, torch.float64, **REFERENCE)
            ref_settled += ref is not None
            paper, _, _ = _update(state, bias, "paper reference", xb, yb, torch.float64, **PAPER_REFERENCE)
            for name in cos:
                g = updates[name]
                if ref is not None and g is not None:
                    cos[name].append(float(1 - g @ ref / (g.norm() * ref.norm())))
                if paper is not None and g is not None:
                    cos_paper[name].append(float(1 - g @ paper / (g.norm() * paper.norm())))
        print(f"batch {b}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.0f} ms" for n in names), flush=True)
    fastest_rbp = statistics.median(times["rbp"])
    rows = [{"variant": n, "seconds_per_batch": statistics.median(times[n]), "refused": refused[n],
             "ratio_to_rbp": statistics.median(times[n]) / fastest_rbp,
             "one_minus_cos_vs_euler": cos.get(n), "one_minus_cos_vs_paper_euler": cos_paper.get(n)} for n in names]
    meta = {**harness.provenance(torch.device("cpu"), "python benchmarks/rnn_checkpoint_speed.py "
                                 + " ".join(sys.argv[1:] if argv is None else argv)),
            "checkpoint_epoch": ck.get("epoch"), "checkpoint_step": ck.get("step"),
            "checkpoint_config": {k: ck.get("config", {}).get(k) for k in ("method", "preset", "seed")},
            "batches": args.batches, "reference_batches": args.reference, "reference_settled": ref_settled,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    out = Path(args.results) / "rnn_checkpoint_cpu.json"
    harness.write_json({"meta": meta, "rows": rows}, out)
    for r in rows:
        c = r["one_minus_cos_vs_euler"]
        far = "" if c is None else f"; 1 - cos vs faithful Euler > 1e-3 on {sum(v > 1e-3 for v in c)} of {len(c)}"
        c = r["one_minus_cos_vs_paper_euler"]
        far += "" if c is None else f", vs the authors' Euler (batch stop, 800) on {sum(v > 1e-3 for v in c)} of {len(c)}"
        print(f"{r['variant']:20s} {1e3 * r['seconds_per_batch']:7.1f} ms ({r['ratio_to_rbp']:.2f}x rbp), "
              f"refused {r['refused']}{far}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
