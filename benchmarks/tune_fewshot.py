"""Tuning protocol of the few-shot comparison: the same budget of trials for every method, then seeds on test.

    python benchmarks/tune_fewshot.py --task sinusoid --trials 4 --seeds 0,1,2 --threads 1
    python benchmarks/tune_fewshot.py ... --resume            # continue a cut-off run (finished trials are kept)

Protocol (issue 10, item 2), the same for every method:

1. **Start** from the method's published setting where the paper covers the task (``START``: MAML / first-order
   MAML on sinusoid: 1 inner step of 0.01, Adam 1e-3 (Finn et al. 2017); iMAML: lam 2, 5 CG steps, 16 inner
   steps (Rajeswaran et al. 2019); CML: symmetric nudging (Zucchet et al. 2022)); otherwise from the package's
   task defaults (``lcp_meta.fewshot.defaults``).
2. **Trials**: ``--trials`` settings per method: the published start, the package's untuned setting (the
   shared budget, when it differs), then a local random search: each further trial multiplies every setting
   the method has (``SPACES``: inner_lr, inner_steps, lam, beta, cg_steps, outer_lr) of the best trial so far
   by a factor log-uniform in [1/SPREAD, SPREAD] (integers rounded, at least 1; a generator seeded by (tune
   seed, method)).  Every
   trial meta-trains with the same budget (meta-steps, meta-batch) on the tuning seed's task stream and is
   scored on that seed's **validation** episodes only; a trial that skips more than ``max_skipped`` of its
   meta-steps (diverged), or runs past ``--trial-seconds``, is stopped and scores worst.
3. **Choose** the trial with the best validation score, then run it **once per seed** (``--seeds``) on the fixed
   test episodes of that seed (the same episodes for every method of a seed).  The test episodes are never read
   before this step.
4. **Report** mean ± 95% CI over seeds and episodes and a paired Wilcoxon test of every method against the best
   one over the shared (seed, episode) pairs, Holm-corrected (``lcp_meta.fewshot.stats``), with the chosen
   setting, seconds per meta-step, skipped meta-steps and final residuals next to each result.

Writes ``benchmarks/results/tune_<task>_<device>.md`` / ``.json`` (command, device, date, every trial, the chosen
settings, the table); run folders go to ``--runs-dir``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from lcp_meta.fewshot import FewShotConfig, run_fewshot
from lcp_meta.fewshot import report, stats
from lcp_meta.fewshot.defaults import method_defaults, task_defaults

ROOT = Path(__file__).resolve().parents[1]
SPREAD = 3.0
INT_CAP = 32  # inner_steps / cg_steps drawn above this are capped (the cost grows with them; CPU budget)

# the settings each method has (all passed as --set METHOD.KEY; outer_lr is the run's, per method)
SPACES: Dict[str, tuple] = {
    "lcp": ("lam", "beta", "outer_lr"),  # inner steps / step size: to its residual tolerance, automatic step
    "lcp-truncated": ("lam", "beta", "inner_lr", "inner_steps", "outer_lr"),
    "imaml": ("lam", "cg_steps", "inner_lr", "inner_steps", "outer_lr"),
    "maml": ("inner_lr", "inner_steps", "outer_lr"),
    "fomaml": ("inner_lr", "inner_steps", "outer_lr"),
    "reptile": ("inner_lr", "inner_steps", "outer_lr"),
    "cml": ("lam", "beta", "inner_lr", "inner_steps", "outer_lr"),
}
# published starting points where the paper covers the task (values not listed: the package's task defaults)
START: Dict[str, Dict[str, Dict[str, object]]] = {
    "sinusoid": {
        "maml": dict(inner_lr=0.01, inner_steps=1, outer_lr=1e-3),
        "fomaml": dict(inner_lr=0.01, inner_steps=1, outer_lr=1e-3),
        "imaml": dict(lam=2.0, cg_steps=5, inner_steps=16),
        "cml": dict(symmetric=True),
    },
    "omniglot": {
        "imaml": dict(lam=2.0, cg_steps=5, inner_steps=16),
        "cml": dict(symmetric=True),
    },
}
_INT = ("inner_steps", "cg_steps")


def start_setting(task: str, method: str) -> Dict[str, object]:
    """Every tuned setting of ``method`` at its published starting point (plus fixed published switches, e.g.
    symmetric nudging); settings the paper does not give come from the package's defaults."""
    return {**shared_setting(task, method), **START.get(task, {}).get(method, {})}


def draw(start: Dict[str, object], method: str, rng: np.random.Generator) -> Dict[str, object]:
    out = dict(start)
    for k in SPACES[method]:
        factor = math.exp(rng.uniform(-math.log(SPREAD), math.log(SPREAD)))
        out[k] = min(INT_CAP, max(1, round(start[k] * factor))) if k in _INT else float(f"{start[k] * factor:.3g}")
    return out


def shared_setting(task: str, method: str) -> Dict[str, object]:
    """The setting the runner gives ``method`` without tuning (shared budget + its per-method defaults)."""
    shared = task_defaults(task)
    base = {k: shared[k] for k in SPACES[method] if k in shared}
    if method in ("maml", "fomaml", "reptile"):
        base.pop("lam", None)
    return {**base, **method_defaults(task, method), **{k: v for k, v in START.get(task, {}).get(method, {}).items()
                                                        if k not in SPACES[method]}}


def trial_rng(method: str, tune_seed: int) -> np.random.Generator:
    return np.random.default_rng([tune_seed, zlib.crc32(method.encode())])


def setting_key(setting: Dict[str, object]) -> str:
    """A folder name for a setting (so that --resume reuses a trial only for the same setting)."""
    return f"{zlib.crc32(json.dumps(setting, sort_keys=True).encode()):08x}"


def config(task: str, method: str, setting: Dict[str, object], base: Dict[str, object], seed: int, out: Path,
           resume: bool) -> FewShotConfig:
    # every setting, outer_lr included, as per-method options: they take precedence over the package's
    # per-method defaults, as a trial must
    return FewShotConfig(task=task, methods=(method,), seed=seed, out=str(out), resume=resume,
                         overwrite=not resume, progress=False, plots=False, method_options={method: dict(setting)},
                         **base)


def run_one(cfg: FewShotConfig, seconds: Optional[float], chunk: int = 50) -> Optional[dict]:
    """Meta-train in chunks of ``chunk`` steps (resumable); None when stopped (too many skipped, or time)."""
    t0 = time.perf_counter()
    cfg.stop_after, first = chunk, True
    while True:
        summary = run_fewshot(cfg if first else _resumed(cfg))
        first = False
        if summary["results"]:
            r = summary["results"][0]
            return None if r["skipped_meta_steps"] > cfg.max_skipped * r["meta_steps"] else r
        ckpt = Path(summary["out"]) / "checkpoints" / f"{cfg.methods[0]}.pt"
        try:
            saved = torch.load(ckpt, weights_only=False, map_location="cpu")
            if len(saved["divergences"]) > cfg.max_skipped * cfg.resolved().meta_steps:
                return None
        except (OSError, KeyError, RuntimeError):
            pass
        if seconds is not None and time.perf_counter() - t0 > seconds:
            return None


def _resumed(cfg: FewShotConfig) -> FewShotConfig:
    import dataclasses
    return dataclasses.replace(cfg, resume=True, overwrite=False)


def interleaved_timing(task: str, base: Dict[str, object], finals: Dict[str, Path], kwargs: Dict[str, dict],
                       rounds: int) -> Dict[str, dict]:
    """Seconds per meta-step of every method at its chosen setting, from its meta-trained weights (the final
    run's checkpoint), on the same training batches, the methods interleaved in a rotating order (so that a
    change of machine load hits all of them alike).  Returns per method the median and quartiles of the
    seconds, the mean iterations of its dynamics and how many of the timed steps raised."""
    from lcp_meta.core.solvers import DivergenceError
    from lcp_meta.fewshot.tasks import SOURCES
    from lcp_meta.meta import make_method
    cfg = FewShotConfig(task=task, methods=tuple(finals), **base).validate()
    source = SOURCES[task].from_config(cfg, torch.device(cfg.device if cfg.device != "auto" else "cpu"),
                                       torch.float32 if cfg.dtype == "float32" else torch.float64)
    methods = {}
    for name, folder in finals.items():
        model = source.build_model()
        ckpt = torch.load(folder / "checkpoints" / f"{name}.pt", weights_only=False, map_location="cpu")
        model.load_state_dict(ckpt["model_state"])
        # outer_lr is recorded with the method's settings but is the run's Adam rate, not a method argument
        settings = {k: v for k, v in kwargs[name].items() if k != "outer_lr"}
        methods[name] = make_method(name, model, source.loss_fn, **settings)
        if "params" in ckpt:  # meta-parameters outside the model (e.g. a learned lam)
            with torch.no_grad():
                for p, saved in zip(methods[name].parameters(), ckpt["params"]):
                    p.copy_(saved)
    names = list(methods)
    times = {n: [] for n in names}
    iters = {n: [] for n in names}
    failed = {n: 0 for n in names}
    for r in range(rounds):
        batch = tuple(source.train_batch(10 ** 6 + r))  # steps no run trained on
        for n in names[r % len(names):] + names[:r % len(names)]:
            for p in methods[n].parameters():
                p.grad = None
            t0 = time.perf_counter()
            try:
                st = methods[n].meta_backward(batch)
                iters[n].append(float(getattr(st, "iterations", 0) or 0))
            except DivergenceError:
                failed[n] += 1
            times[n].append(time.perf_counter() - t0)
    return {n: {"median_s": float(np.median(times[n])), "q25_s": float(np.quantile(times[n], 0.25)),
                "q75_s": float(np.quantile(times[n], 0.75)), "mean_iterations": float(np.mean(iters[n]))
                if iters[n] else None, "failed": failed[n], "rounds": rounds} for n in names}


def _finished(folder: Path) -> Optional[dict]:
    """The result of a finished single-method run in ``folder`` (None when absent or cut off)."""
    try:
        results = json.loads((folder / "results.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        return None
    return results[0] if results else None


def _final_val(result: dict) -> Optional[float]:
    vals = [c["val_metric"] for c in result["curve"] if c.get("val_metric") is not None]
    return vals[-1] if vals else None


def _text(setting: Dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="sinusoid", choices=("sinusoid", "omniglot"))
    p.add_argument("--methods", default=",".join(SPACES))
    p.add_argument("--trials", type=int, default=4, help="trials per method (the same for every method)")
    p.add_argument("--tune-seed", type=int, default=100, help="seed of the tuning runs (validation episodes)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the final runs on the test episodes")
    p.add_argument("--meta-steps", type=int, help="meta-steps of every run (default: the task's)")
    p.add_argument("--meta-batch", type=int, help="tasks per meta-step of every run (default: the task's)")
    p.add_argument("--test-episodes", type=int, help="test episodes per seed (default: the task's)")
    p.add_argument("--val-episodes", type=int, help="validation episodes (default: the task's)")
    p.add_argument("--trial-seconds", type=float, help="stop a trial that runs longer (scores worst)")
    p.add_argument("--ways", type=int)
    p.add_argument("--data-root")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="keep finished trials and seed runs")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "tune_fewshot"))
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--timing-rounds", type=int, default=20,
                   help="interleaved timing of one meta-step per method, this many rounds (0: skip)")
    p.add_argument("--note", default="", help="text for the results file (e.g. that the machine was shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SPACES]
    if unknown:
        p.error(f"no search space for {', '.join(unknown)}; expected some of {', '.join(SPACES)}")
    if args.trials < 1:
        p.error(f"--trials must be >= 1, got {args.trials}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base = {k: v for k, v in dict(meta_steps=args.meta_steps, meta_batch=args.meta_batch,
                                  test_episodes=args.test_episodes,
                                  val_episodes=args.val_episodes, ways=args.ways, data_root=args.data_root,
                                  device=args.device).items() if v is not None}
    resolved = FewShotConfig(task=args.task, **base).resolved()
    lower = args.task == "sinusoid"
    runs = Path(args.runs_dir) / args.task
    record = {"task": args.task, "device": args.device, "torch": torch.__version__, "threads": args.threads,
              "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python benchmarks/tune_fewshot.py", *(sys.argv[1:] if argv is None else argv)]),
              "note": args.note, "trials_per_method": args.trials, "tune_seed": args.tune_seed, "seeds": seeds,
              "spread": SPREAD, "budget": {k: getattr(resolved, k) for k in
                                           ("meta_steps", "meta_batch", "shots", "activation", "hidden",
                                            "val_episodes", "test_episodes")},
              "trials": {}, "chosen": {}}

    for method in methods:  # 1-3: trials on validation episodes, choose
        rows, rng = [], trial_rng(method, args.tune_seed)
        starts = [start_setting(args.task, method), shared_setting(args.task, method)]
        for i in range(args.trials):
            # the published start, the package's setting, then draws around the best trial so far
            scored = [r for r in rows if r["val_metric"] is not None and math.isfinite(r["val_metric"])]
            if i < 2 and not any(r["setting"] == starts[i] for r in rows):
                setting = starts[i]
            else:
                centre = (min if lower else max)(scored, key=lambda r: r["val_metric"])["setting"] if scored \
                    else starts[0]
                setting = draw(centre, method, rng)
            out = runs / "trials" / method / setting_key(setting)
            t0 = time.perf_counter()
            result = _finished(out) if args.resume else None
            stopped = out / "stopped.json"  # a trial stopped early stays stopped when the tuning is resumed
            if result is None and not (args.resume and stopped.is_file()):
                cfg = config(args.task, method, setting,
                             {**base, "test_episodes": 1},  # trials never look at the test episodes
                             args.tune_seed, out, args.resume)
                result = run_one(cfg, args.trial_seconds)
                if result is None:
                    stopped.write_text(json.dumps({"setting": setting, "wall_s": time.perf_counter() - t0}))
            val = None if result is None else _final_val(result)
            rows.append({"trial": i, "setting": setting, "val_metric": val, "stopped": result is None,
                         "sec_per_step": None if result is None else result["sec_per_step"],
                         "skipped": None if result is None else result["skipped_meta_steps"],
                         "wall_s": time.perf_counter() - t0})
            print(f"{method} trial {i}: {_text(setting)} -> validation {val}", flush=True)
        scored = [r for r in rows if r["val_metric"] is not None and math.isfinite(r["val_metric"])]
        record["trials"][method] = rows
        if scored:
            best = (min if lower else max)(scored, key=lambda r: r["val_metric"])
            record["chosen"][method] = best["setting"]

    per_seed: Dict[str, list] = {}
    for method, setting in record["chosen"].items():  # 3: the chosen setting once per seed, on test
        for seed in seeds:
            out = runs / "final" / f"seed{seed}" / method
            result = _finished(out) if args.resume else None
            if result is None:  # a run that skipped meta-steps keeps its row: the table shows how many
                summary = run_fewshot(config(args.task, method, setting, base, seed, out, args.resume))
                result = summary["results"][0]
            per_seed.setdefault(method, []).append({k: v for k, v in result.items() if k != "curve"})
    complete = {m: r for m, r in per_seed.items() if len(r) == len(seeds)}
    if args.timing_rounds and complete:  # 5: cost per meta-step, interleaved, from the meta-trained weights
        record["timing"] = interleaved_timing(
            args.task, base, {m: runs / "final" / f"seed{seeds[0]}" / m for m in complete},
            {m: rs[0]["method_kwargs"] for m, rs in complete.items()}, args.timing_rounds)
    values, rows = report.seed_rows(complete, {m: _text(s) for m, s in record["chosen"].items()})
    comparison = stats.compare(values, lower_is_better=lower)
    metric = "mse" if lower else "accuracy"
    record["comparison"] = comparison
    record["per_seed"] = {m: [{k: r[k] for k in ("test_mean", "test_ci95", "sec_per_step", "skipped_meta_steps",
                                                   "meta_steps", "final_residuals", "method_kwargs")} for r in rs]
                          for m, rs in per_seed.items()}
    record["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record["table"] = report.seeds_table(comparison, rows, metric)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    stem = Path(args.results_dir) / f"tune_{args.task}_{torch.device(args.device).type}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    stem.with_suffix(".md").write_text(render_markdown(record))
    print(record["table"])
    print(f"wrote {stem}.md and {stem}.json")
    return 0


def render_markdown(r: dict) -> str:
    b = r["budget"]
    lines = [f"# Tuned few-shot comparison: {r['task']}", "",
             f"- command: `{r['command']}`",
             f"- device: {r['device']} ({r['cpu']}), {r['threads']} torch thread(s), torch {r['torch']}, python "
             f"{r['python']}", f"- date: {r['started']} to {r['finished']} (UTC)"]
    if r["note"]:
        lines.append(f"- note: {r['note']}")
    lines += [f"- budget of every run: {b['meta_steps']} meta-steps of meta-batch {b['meta_batch']}, {b['shots']}-shot;"
              f" learner hidden {b['hidden']} ({b['activation']}); validation {b['val_episodes']} episodes,"
              f" test {b['test_episodes']} episodes per seed",
              f"- protocol: {r['trials_per_method']} trials per method (the published start, the package's "
              f"setting, then draws around the best trial so far: factors log-uniform in "
              f"[1/{r['spread']:g}, {r['spread']:g}] on each of its settings), scored on the validation episodes of "
              f"tuning seed {r['tune_seed']}; the best trial run once per seed {r['seeds']} on that seed's fixed "
              f"test episodes (benchmarks/tune_fewshot.py docstring)",
              "- CI: Student t over the per-seed means (df = seeds - 1); p: two-sided Wilcoxon signed-rank over the "
              "shared (seed, episode) pairs against the best method, Holm-corrected; 'significant': p < "
              f"{r['comparison'].get('alpha', 0.05)} and the same sign of the mean difference in every seed", "",
              r["table"], ""]
    if r.get("timing"):
        first = next(iter(r["timing"].values()))
        lines += [f"## Cost per meta-step, interleaved ({first['rounds']} rounds, {r['threads']} thread(s))", "",
                  "Each method at its chosen setting from its meta-trained weights (seed "
                  f"{r['seeds'][0]}), the same training batches, methods interleaved in a rotating order; seconds "
                  "per meta-step (median and quartiles) and the mean iterations of its dynamics.", "",
                  "| method | median s/meta-step | quartiles | x fastest | mean iterations | raised |",
                  "|---|---|---|---|---|---|"]
        fastest = min(t["median_s"] for t in r["timing"].values())
        for m, t in sorted(r["timing"].items(), key=lambda kv: kv[1]["median_s"]):
            it = "-" if not t["mean_iterations"] else f"{t['mean_iterations']:.0f}"
            lines.append(f"| {m} | {t['median_s']:.4f} | {t['q25_s']:.4f}-{t['q75_s']:.4f} | "
                         f"{t['median_s'] / fastest:.1f} | {it} | {t['failed']}/{t['rounds']} |")
        lines.append("")
    lines += ["## Trials (validation metric of the tuning seed)", "",
              "| method | trial | setting | validation | sec/meta-step | skipped |", "|---|---|---|---|---|---|"]
    for m, rows in r["trials"].items():
        for t in rows:
            val = "stopped" if t["stopped"] else ("n/a" if t["val_metric"] is None else f"{t['val_metric']:.4g}")
            chosen = " (chosen)" if r["chosen"].get(m) == t["setting"] else ""
            sec = "-" if t["sec_per_step"] is None else f"{t['sec_per_step']:.3g}"
            lines.append(f"| {m} | {t['trial']}{chosen} | {_text(t['setting'])} | {val} | {sec} | "
                         f"{'-' if t['skipped'] is None else t['skipped']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
