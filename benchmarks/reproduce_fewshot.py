"""Omniglot few-shot comparison of LCP and the baselines, and the 20 official one-shot runs.

    python benchmarks/reproduce_fewshot.py --data-root ../shared/data                 # full protocol (GPU)
    python benchmarks/reproduce_fewshot.py --data-root ../shared/data --quick         # tiny CPU check (minutes)
    python benchmarks/reproduce_fewshot.py --only 20way --resume                      # continue a cut-off run

Each comparison runs every seed of ``--seeds`` (default 0,1,2) and reports mean ± 95% CI over seeds and episodes
with a paired test of every method against the best one (``lcp_meta.fewshot.stats``).

Two comparisons on the offline Omniglot background subsets (242 distinct characters, each at 4 rotations;
seeded character split into train / validation / test): 5-way 1-shot and 20-way 1-shot, methods lcp, imaml,
maml, fomaml, reptile, cml, each meta-trained with the same budget on the same task stream and tested on the
same fixed episodes.  The 20-way models are also scored on the 20 official within-alphabet one-shot runs
(``all_runs.zip``, answers from ``class_labels.txt``).  With the full data set (``images_background.zip`` +
``images_evaluation.zip``) the test classes are the evaluation alphabets instead.

Writes ``benchmarks/results/fewshot_<device>.md`` and ``.json`` (device, torch version, date, command, the exact
protocol, tables); the run folders (checkpoints, curves, plots) go to ``runs/reproduce_fewshot/<device>/``.
Every method checkpoints as it goes: a run cut off by a time limit continues with ``--resume``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import torch

from lcp_meta.fewshot import FewShotConfig, run_fewshot, stats
from lcp_meta.fewshot.defaults import OMNIGLOT_PROTOCOLS, OMNIGLOT_QUICK
from lcp_meta.utils.tables import latex_table
from lcp_meta.fewshot.report import parse_results_table, seed_rows, seeds_table
from lcp_meta.utils import resolve_device

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lcp", "imaml", "maml", "fomaml", "reptile", "cml")

# The protocols (one budget for every method) live in the package's one source of few-shot defaults.
FULL, QUICK = OMNIGLOT_PROTOCOLS, OMNIGLOT_QUICK


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="folder holding omniglot/ (default: $LCP_META_DATA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny budget (checks the pipeline; CPU minutes)")
    p.add_argument("--only", choices=tuple(FULL), action="append", help="run only this comparison (repeatable)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--meta-steps", type=int, help="override the protocol's meta-steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one protocol setting for a stated smaller budget, e.g. --set meta_batch=4 "
                        "(repeatable; keys: " + ", ".join(sorted(FULL["5way"])) + ")")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the runs (at least 3 for a table with CIs and tests)")
    p.add_argument("--resume", action="store_true", help="continue each method from its checkpoint")
    p.add_argument("--stop-after", type=int, help="stop each method after N meta-steps (resume later)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "reproduce_fewshot"))
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the tables from the run folders' results.json without running anything (e.g. "
                        "after seeds ran as separate processes)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    tag = device.type
    protocol = QUICK if args.quick else FULL
    results = {"device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or "cpu", "torch": torch.__version__, "python": platform.python_version(),
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python benchmarks/reproduce_fewshot.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
               "quick": args.quick, "comparisons": {}}
    json_path = Path(args.results_dir) / f"fewshot_{tag}.json"
    if json_path.is_file():  # keep comparisons of earlier (sliced) invocations
        previous = json.loads(json_path.read_text())
        if previous.get("quick") == args.quick:
            results["comparisons"].update(previous.get("comparisons", {}))

    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    overrides = parse_overrides(args.set, FULL["5way"])
    for key in args.only or list(protocol):
        settings = dict(protocol[key])
        if args.meta_steps:
            settings["meta_steps"] = args.meta_steps
        settings.update(overrides)
        per_seed, entry = {}, {"settings": settings, "seeds": seeds, "runs": {}}
        for seed in seeds:
            cfg = FewShotConfig(task="omniglot", methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                                seed=seed, device=args.device, data_root=args.data_root,
                                out=str(Path(args.runs_dir) / tag / f"omniglot_{key}1shot" / f"seed{seed}"),
                                resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                                **settings)
            summary = _saved_summary(cfg) if args.report_only else run_fewshot(cfg)
            if summary.get("message"):
                print(summary["message"], file=sys.stderr)
            folder = Path(summary["out"]).resolve()
            folder = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
            entry["protocol"] = summary["config"]["protocol"]
            entry["runs"][seed] = {"run_folder": str(folder), "unfinished": summary["unfinished"],
                                   "table": summary.get("table"),
                                   "rows": parse_results_table(summary["table"]) if summary.get("table") else [],
                                   "results": [{k: v for k, v in r.items() if k != "curve"}
                                               for r in summary["results"]]}
            for r in summary["results"]:
                per_seed.setdefault(r["method"], []).append(r)
        entry["unfinished"] = sorted({m for run in entry["runs"].values() for m in run["unfinished"]})
        entry["rows"] = entry["runs"][seeds[0]]["rows"]  # the first seed's table (with the one-shot runs column)
        complete = {m: rs for m, rs in per_seed.items() if len(rs) == len(seeds)}
        entry["table"] = None
        if complete:  # mean ± CI over seeds and episodes, paired tests against the best method
            values, rows = seed_rows(complete, {m: ", ".join(f"{k}={v}" for k, v in rs[0]["method_kwargs"].items())
                                                for m, rs in complete.items()})
            entry["comparison"] = stats.compare(values, lower_is_better=False)
            entry["table"] = seeds_table(entry["comparison"], rows, "accuracy")
            print(f"\nOmniglot {settings['ways']}-way 1-shot, seeds {seeds}\n{entry['table']}")
            # the official one-shot runs: the same statistics over (seed, run) pairs (20 runs per seed)
            shots = {m: rs for m, rs in complete.items() if all(r.get("one_shot_runs") for r in rs)}
            if shots:
                values = {m: [list(r["one_shot_runs"]["per_run"].values()) for r in rs] for m, rs in shots.items()}
                entry["one_shot_comparison"] = stats.compare(values, lower_is_better=False)
                entry["one_shot_table"] = seeds_table(entry["one_shot_comparison"], {m: rows[m] for m in shots},
                                                      "accuracy")
        results["comparisons"][f"omniglot {settings['ways']}-way 1-shot"] = entry

    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    json_path.with_suffix(".md").write_text(render_markdown(results))
    tables = []  # the same tables for a paper (booktabs)
    for name, e in results["comparisons"].items():
        for key, what in (("table", "test episodes"), ("one_shot_table", "the 20 official one-shot runs")):
            if e.get(key):
                tables.append(latex_table(e[key], caption=f"{name}, {what}: accuracy (%) over seeds, mean ± 95% CI, "
                                          f"paired Wilcoxon tests against the best (Holm).",
                                          label=f"tab:{name.replace(' ', '-')}-{key.replace('_', '-')}"))
    tex = json_path.with_suffix(".tex")
    if tables:
        tex.write_text("\n".join(tables))
    elif tex.exists():  # (a table from an earlier run would no longer match the .md)
        tex.unlink()
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}" + (" (and .tex)" if tables else ""))
    return 0


def _saved_summary(cfg: FewShotConfig) -> dict:
    """The summary ``run_fewshot`` wrote to ``<out>/results.json``, checked against the settings asked for."""
    path = Path(cfg.out) / "results.json"
    if not path.is_file():
        raise SystemExit(f"--report-only: no finished run in {cfg.out} (expected {path})")
    summary = json.loads(path.read_text())
    table = Path(cfg.out) / "results.md"
    summary["table"] = table.read_text() if table.is_file() else None  # results.json leaves the table out
    ran, asked = summary["config"], cfg.validate()
    differ = [k for k in ("ways", "shots", "queries", "meta_steps", "meta_batch", "inner_steps", "inner_lr", "lam",
                          "beta", "hidden", "test_episodes", "seed") if ran.get(k) != getattr(asked, k)]
    if differ:
        raise SystemExit(f"--report-only: the run in {cfg.out} used other settings ({', '.join(differ)}: "
                         + ", ".join(f"{k}={ran.get(k)!r}" for k in differ) + "); pass the settings it ran with")
    return summary


def parse_overrides(items, template) -> dict:
    """``["meta_batch=4", "inner_lr=0.05"]`` -> typed values (each key must be a protocol setting)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in template:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(template))}")
        kind = type(template[key])
        try:
            out[key] = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {key} takes a {kind.__name__}, got {raw!r}") from None
    return out


def render_markdown(results) -> str:
    lines = [f"# Omniglot few-shot comparison ({results['device']})", ""]
    for k in ("device_name", "torch", "python", "date", "command", "quick"):
        lines.append(f"- {k}: {results[k]}")
    if results["quick"]:
        lines += ["", "**Quick run**: a tiny budget that checks the pipeline; the numbers mean nothing."]
    for name, entry in results["comparisons"].items():
        pr, st = entry["protocol"], entry["settings"]
        lines += ["", f"## {name}", "",
                  f"- data: {', '.join(pr['zips'])}; {pr['distinct_background_characters']} distinct background "
                  f"characters, split seed {pr['split_seed']}: characters train/val/test = "
                  f"{pr['characters']['train']}/{pr['characters']['val']}/{pr['characters']['test']}, rotations "
                  f"{pr['rotations']} -> classes "
                  f"{pr['classes']['train']}/{pr['classes']['val']}/{pr['classes']['test']}"
                  f" (test: {pr['test_source']})",
                  f"- images: {pr['image_size']}x{pr['image_size']}, {pr['preprocessing']}",
                  f"- model: {pr['model']}",
                  f"- episodes: {st['ways']}-way {st['shots']}-shot, {st['queries']} query images per class; "
                  f"{st['test_episodes']} fixed test episodes, {st['val_episodes']} validation episodes",
                  f"- budget (every method): {st['meta_steps']} meta-steps, meta-batch {st['meta_batch']}, outer "
                  f"Adam lr {st['outer_lr']}; inner {st['inner_steps']} steps of size {st['inner_lr']}; "
                  f"shared lam {st['lam']} (proximal methods; MAML/FOMAML/Reptile lam 0), beta {st['beta']}; a "
                  f"method's own settings (e.g. iMAML's published lam 2, 5 CG steps) are in the table's last column",
                  f"- seeds {entry['seeds']}; run folders: "
                  + ", ".join(run["run_folder"] for run in entry["runs"].values()),
                  "- CI: Student t over the per-seed means (df = seeds - 1); p: two-sided Wilcoxon signed-rank over "
                  "the shared (seed, episode) pairs against the best method, Holm-corrected; 'significant': p < 0.05 "
                  "and the same sign in every seed (lcp_meta.fewshot.stats)", ""]
        if entry["unfinished"]:
            lines.append(f"Unfinished (resume to complete): {', '.join(entry['unfinished'])}\n")
        if entry["table"]:
            lines.append(entry["table"])
        if entry.get("one_shot_table"):
            lines += ["", f"The same models on the 20 official one-shot runs (all_runs.zip), mean ± CI95 over seeds "
                          f"{entry['seeds']} and runs, paired tests over the shared (seed, run) pairs:", "",
                      entry["one_shot_table"]]
        for seed, run in entry["runs"].items():
            shots = [r for r in run["results"] if r.get("one_shot_runs")]
            if shots:
                lines += ["", f"Official one-shot runs, seed {seed} (accuracy % per run):", "",
                          "| method | " + " | ".join(shots[0]["one_shot_runs"]["per_run"]) + " |",
                          "|---|" + "---|" * len(shots[0]["one_shot_runs"]["per_run"])]
                for r in shots:
                    lines.append(f"| {r['method']} | " + " | ".join(f"{100 * v:.0f}" for v in
                                                                 r["one_shot_runs"]["per_run"].values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
