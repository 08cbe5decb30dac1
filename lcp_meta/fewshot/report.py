"""Result files of a few-shot comparison: the markdown table (and its parser), CSV curves, PNG plots.

Plots go through :mod:`lcp_meta.utils.plots` (the Agg canvas, no pyplot state).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..utils.errors import UserInputError
from ..utils.tables import markdown_table_cells
from ..utils.plots import figure, save

CURVE_FIELDS = ("step", "query_loss", "query_metric", "val_metric", "val_ci95", "time_s", "sec_per_step",
                "peak_memory_mib", "inner_residual", "control_residual", "converged")

_METRIC_LABEL = {"accuracy": "test accuracy (%)", "mse": "test MSE"}


def format_metric(metric: str, mean: float, ci: float) -> str:
    if metric == "accuracy":
        return f"{100 * mean:.2f} ± {100 * ci:.2f}"
    return f"{mean:.4g} ± {ci:.3g}"


def format_test(metric: str, result: Mapping) -> str:
    """The test cell: mean ± CI95, or, where adaptation failed (diverged, or refused at its cap) on some test
    tasks, how many: their NaN would otherwise show as an unexplained ``nan ± nan``."""
    values = result.get("test_values") or ()
    failed = sum(1 for v in values if not math.isfinite(v))
    if not failed:
        return format_metric(metric, result["test_mean"], result["test_ci95"])
    return f"n/a: adaptation failed on {failed} of {len(values)} test tasks"


def _fmt_memory(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def format_skipped(result: Mapping) -> str:
    """``skipped/meta-steps``: how many meta-steps diverged and were dropped (e.g. ``0/300``)."""
    skipped = result.get("skipped_meta_steps")
    if skipped is None:
        skipped = len(result.get("divergences") or ())
    steps = result.get("meta_steps")
    return f"{skipped}/{steps}" if steps is not None else str(skipped)


def final_residuals(curve: Sequence[Mapping]) -> Dict[str, object]:
    """The residuals of the last logged meta-step (``None`` where the method has none, e.g. MAML)."""
    last = curve[-1] if curve else {}
    return {k: last.get(k) for k in ("step", "inner_residual", "control_residual", "converged")}


def format_residuals(result: Mapping) -> str:
    """``inner / control`` residual of the last logged meta-step, ``(unconverged)`` for a fixed-budget run."""
    f = result.get("final_residuals") or {}
    cells = [("-" if f.get(k) is None else f"{f[k]:.1e}") for k in ("inner_residual", "control_residual")]
    if cells == ["-", "-"]:
        return "-"
    return " / ".join(cells) + ("" if f.get("converged") else " (unconverged)")


def format_settings(result: Mapping) -> str:
    """The settings the method ran with (``method_kwargs`` of its result), e.g. ``lam=10, beta=0.01``; settings
    left unset (``None``, e.g. no tolerance for a fixed budget) are not shown.  Numbers to 3 digits."""
    kw = result.get("method_kwargs") or {}
    shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items() if v is not None]
    return ", ".join(shown) or "-"


def results_table(results: Sequence[Mapping], memory_kind: str) -> str:
    """The markdown table: one row per method, ``method | metric mean ± CI95 | sec/meta-step | peak memory |
    skipped meta-steps | final residual (inner / control) | settings``.

    ``skipped meta-steps`` counts the meta-steps whose update was dropped because the method diverged (a method
    that skipped many shows a barely trained model); the residual column shows where the last logged meta-step
    stopped (see :func:`format_residuals`).  An extra column holds the accuracy on the 20 official one-shot
    runs when it was measured; the last column holds the settings the method ran with (:func:`format_settings`).
    """
    if not results:
        raise UserInputError("results_table needs at least one method's results")
    metric = results[0]["metric"]
    runs = any(r.get("one_shot_runs") for r in results)
    head = ["method", f"{_METRIC_LABEL[metric]} mean ± CI95", "sec/meta-step", f"peak memory (MiB, {memory_kind})",
            "skipped meta-steps", "final residual (inner / control)"]
    if runs:
        head.append("one-shot runs accuracy (%) mean ± CI95")
    head.append("settings")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        row = [r["method"], format_test(metric, r), f"{r['sec_per_step']:.4g}",
               _fmt_memory(r.get("peak_memory_mib")), format_skipped(r), format_residuals(r)]
        if runs:
            o = r.get("one_shot_runs")
            row.append(format_metric("accuracy", o["mean"], o["ci95"]) if o else "n/a")
        row.append(format_settings(r))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt_p(p: Optional[float]) -> str:
    return "-" if p is None else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def seeds_table(comparison: Mapping, rows: Mapping[str, Mapping], metric: str) -> str:
    """The multi-seed table: one row per method, ``method | metric mean ± CI95 over seeds and episodes |
    difference to the best ± CI95 | p (Wilcoxon, Holm) | significant | sec/meta-step | skipped | final residual
    (worst over seeds) | settings``.

    ``comparison`` is :func:`lcp_meta.fewshot.stats.compare`'s output; ``rows[method]`` holds ``sec_per_step``
    (mean over seeds), ``skipped`` (e.g. ``"0/900"``), ``residual`` (text) and ``settings`` (text)."""
    best, summary = comparison["best"], comparison["summary"]
    tests = {t["a"]: t for t in comparison["tests"]}
    scale = 100.0 if metric == "accuracy" else 1.0
    fmt = (lambda v: f"{scale * v:.2f}") if metric == "accuracy" else (lambda v: f"{v:.4g}")
    head = ["method", f"{_METRIC_LABEL[metric]} mean ± CI95", f"difference to {best} ± CI95",
            "p (Wilcoxon, Holm)", "significant", "sec/meta-step", "skipped meta-steps",
            "final residual (inner / control)", "settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    order = sorted(summary, key=lambda n: summary[n]["mean"], reverse=metric == "accuracy")
    for name in order + list(comparison.get("excluded", ())):
        r = rows.get(name, {})
        if name in summary:
            s = summary[name]
            cell = f"{fmt(s['mean'])} ± {fmt(s['ci95'])}"
            t = tests.get(name)
            diff = "(best)" if t is None else f"{'+' if t['mean_diff'] >= 0 else ''}{fmt(t['mean_diff'])} ± {fmt(t['ci95'])}"
            p = "-" if t is None else _fmt_p(t["p_holm"])
            sig = "-" if t is None else ("yes" if t["significant"] else "no")
        else:
            cell, diff, p, sig = "diverged", "-", "-", "-"
        lines.append("| " + " | ".join([name, cell, diff, p, sig, f"{r.get('sec_per_step', float('nan')):.4g}",
                                        str(r.get("skipped", "-")), str(r.get("residual", "-")),
                                        str(r.get("settings", "-"))]) + " |")
    return "\n".join(lines) + "\n"


def seed_rows(per_seed: Mapping[str, Sequence[Mapping]], settings: Optional[Mapping[str, str]] = None):
    """From ``per_seed[method] = [result of seed 0, result of seed 1, ...]`` (the runner's per-method result
    dicts, each with ``test_values``) to ``(values, rows)`` for :func:`lcp_meta.fewshot.stats.compare` and
    :func:`seeds_table`: ``values[method][s][e]``; ``rows[method]`` with the mean sec/meta-step, the skipped
    meta-steps summed over seeds, the worst final residuals over seeds and the settings text."""
    values, rows = {}, {}
    for name, results in per_seed.items():
        missing = [i for i, r in enumerate(results) if not r.get("test_values")]
        if missing:
            raise UserInputError(f"{name}: seed run(s) {missing} have no per-episode test values (test_values); "
                                 f"run them again with this version of the runner")
        values[name] = [r["test_values"] for r in results]
        worst = {}
        for key in ("inner_residual", "control_residual"):
            got = [(r.get("final_residuals") or {}).get(key) for r in results]
            got = [g for g in got if g is not None]
            worst[key] = max(got) if got else None
        converged = all((r.get("final_residuals") or {}).get("converged") for r in results)
        residual = format_residuals({"final_residuals": {**worst, "converged": converged}})
        rows[name] = {"sec_per_step": sum(r["sec_per_step"] for r in results) / len(results),
                      "skipped": f"{sum(r['skipped_meta_steps'] for r in results)}/"
                                 f"{sum(r['meta_steps'] for r in results)}",
                      "residual": residual, "settings": (settings or {}).get(name, "-")}
    return values, rows


def parse_results_table(text: str) -> List[Dict[str, object]]:
    """Read back the first table of a ``results.md``: a list of dicts, numbers as floats (None for 'n/a').

    ``±`` cells become two entries, ``<column>`` (the mean) and ``<column> CI95``.
    """
    head, rows = markdown_table_cells(text)
    out = []
    for values in rows:
        row: Dict[str, object] = {}
        for key, cell in zip(head, values):
            if "±" in cell:
                mean, ci = (float(v) for v in cell.split("±"))
                row[key], row[f"{key} CI95"] = mean, ci
            elif cell == "n/a":
                row[key] = None
            else:
                try:
                    row[key] = float(cell)
                except ValueError:
                    row[key] = cell
        out.append(row)
    return out


def write_curve_csv(curve: Sequence[Mapping], path: "str | Path") -> Path:
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CURVE_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for row in curve:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CURVE_FIELDS})
    return path


# ---------------------------------------------------------------------------------------------------------- plots
def _running_mean(values: Sequence[float], window: int = 10) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(results: Sequence[Mapping], path: "str | Path") -> Path:
    """Meta-training curves: query loss after adaptation (training tasks) and the validation metric."""
    metric = results[0]["metric"]
    fig, (ax_loss, ax_val) = figure(2)
    for r in results:
        pts = [(c["step"], c["query_loss"]) for c in r["curve"] if c.get("query_loss") is not None]
        # each point is one meta-batch: smooth with a running mean so that methods can be told apart
        ax_loss.plot([s for s, _ in pts], _running_mean([v for _, v in pts]), label=r["method"])
        val = [(c["step"], c["val_metric"]) for c in r["curve"] if c.get("val_metric") is not None]
        if val:
            scale = 100.0 if metric == "accuracy" else 1.0
            ax_val.plot([s for s, _ in val], [scale * v for _, v in val], marker="o", ms=3, label=r["method"])
    ax_loss.set(xlabel="meta-step", ylabel="query loss after adaptation",
                title="meta-training (running mean over 10 logged batches)")
    if metric == "mse":
        ax_loss.set_yscale("log")
    ax_val.set(xlabel="meta-step", title="validation",
               ylabel="accuracy (%)" if metric == "accuracy" else "MSE")
    ax_loss.legend(fontsize=8)
    return save(fig, path)


def plot_test_metric(results: Sequence[Mapping], path: "str | Path", episodes: int) -> Path:
    """Test metric per method with 95% confidence-interval bars."""
    metric = results[0]["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, (ax,) = figure(1, width=max(4.5, 0.9 * len(results) + 2))
    names = [r["method"] for r in results]
    ax.bar(names, [scale * r["test_mean"] for r in results], yerr=[scale * r["test_ci95"] for r in results],
           capsize=4, color="tab:blue", alpha=0.8)
    ax.set(ylabel=_METRIC_LABEL[metric], title=f"test ({episodes} fixed episodes, 95% CI)")
    if metric == "accuracy":
        lo = min(scale * (r["test_mean"] - r["test_ci95"]) for r in results)
        ax.set_ylim(max(0.0, lo - 5), 100)
    return save(fig, path)


def plot_cost(results: Sequence[Mapping], path: "str | Path", memory_kind: str) -> Path:
    """Wall-clock seconds and peak memory per meta-step."""
    fig, (ax_t, ax_m) = figure(2)
    names = [r["method"] for r in results]
    ax_t.bar(names, [r["sec_per_step"] for r in results], color="tab:orange")
    ax_t.set(ylabel="seconds / meta-step", title="wall-clock")
    mem = [r.get("peak_memory_mib") for r in results]
    ax_m.bar(names, [0.0 if m is None else m for m in mem], color="tab:green")
    if all(m is None for m in mem):
        ax_m.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_m.transAxes, fontsize=16)
    ax_m.set(ylabel="MiB", title=f"peak memory per meta-step\n({memory_kind})")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelrotation=30)
    return save(fig, path)


def plot_sinusoid_fits(fits: Mapping, path: "str | Path") -> Path:
    """Adapted fits on a few test tasks.

    ``fits``: {"x": grid (M,), "tasks": [{"amplitude", "phase", "x_support", "y_support", "pred": {method: (M,)}}]}.
    """
    import numpy as np

    tasks = fits["tasks"]
    fig, axes = figure(len(tasks), width=4.0, height=3.2)
    x = np.asarray(fits["x"])
    for ax, task in zip(axes, tasks):
        ax.plot(x, task["amplitude"] * np.sin(x - task["phase"]), "k-", lw=2, label="true")
        for name, pred in task["pred"].items():
            ax.plot(x, np.asarray(pred), lw=1.2, label=name)
        ax.plot(task["x_support"], task["y_support"], "k^", ms=6, label="support")
        ax.set(xlabel="x", title=f"A={task['amplitude']:.2f}, phase={task['phase']:.2f}")
    axes[0].legend(fontsize=7)
    return save(fig, path)
