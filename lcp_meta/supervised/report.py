"""PNG plots of supervised runs: one run's learning curves (written into its run folder after every epoch) and the
MNIST reproduction's curves beside the published numbers (``benchmarks/reproduce_mnist.py``)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

from ..utils.plots import figure, save

__all__ = ["train_loss_label", "run_figure", "plot_run", "reproduction_figure", "plot_reproduction", "verdict"]


def verdict(accs: Sequence[float], paper: Optional[Tuple[float, float]]) -> Tuple[str, str]:
    """Table cells ``(ours - paper, inside the paper's +- std?)`` for the test accuracies (%) of the finished seeds
    against the published ``(mean, std)``: inside when the mean over seeds lies within the published mean +- std;
    outside, it says on which side and whether the two +- std bars still overlap."""
    if not accs or not paper:
        return "-", "-"
    diff = statistics.fmean(accs) - paper[0]
    ours_std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    if abs(diff) <= paper[1]:
        inside = "yes"
    else:
        inside = ("no, above" if diff > 0 else "no, below") + (" (the two +- std bars overlap)"
                                                               if abs(diff) <= paper[1] + ours_std else "")
    seeds = f" ({len(accs)} seed{'s' if len(accs) > 1 else ''})" if len(accs) < 3 else ""
    return f"{diff:+.2f}", inside + seeds


def train_loss_label(result: Mapping) -> str:
    """What a run's "train loss" is: the free network's loss (BP, RBP), or, for an LCP method, the loss of its
    controlled output (driven towards the target, lower at a settled solve, and not comparable across methods)."""
    at = result.get("train_loss_at", "network output")
    return "train loss" if at == "network output" else f"train loss ({at})"


def plot_run(result: Mapping, path: "str | Path") -> Path:
    """Write :func:`run_figure` of ``result`` as PNG to ``path``."""
    return save(run_figure(result), path)


def run_figure(result: Mapping):
    """Test accuracy, training loss and the share of batches whose solve ended above its tolerance, per epoch, of
    one run (``result``: the ``result.json`` dict of :func:`~lcp_meta.supervised.train`)."""
    epochs = result["epochs"]
    x = [e["epoch"] for e in epochs]
    cfg = result.get("config", {})
    fig, (ax_acc, ax_loss, ax_res) = figure(3, width=4.2, height=3.3)
    ax_acc.plot(x, [100 * e["test_accuracy"] for e in epochs], marker="o", ms=3)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
               title=f"{cfg.get('dataset', '')} {cfg.get('model', '')} {cfg.get('method', '')} "
                     f"seed {cfg.get('seed', '')}".strip())
    ax_loss.plot(x, [e["train_loss"] for e in epochs], marker="o", ms=3)
    if all(e["train_loss"] > 0 for e in epochs):  # (a log axis needs positive values)
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="epoch", ylabel=f"{train_loss_label(result)}, mean over applied batches")
    # an update computed where the dynamics had not settled (or a skipped batch) is shown, not hidden
    share = [100 * e["residuals"]["share_above_tol"] if e.get("residuals") else 0.0 for e in epochs]
    skipped = [100 * e["skipped_batches"] / max(e["batches"] + e["skipped_batches"], 1) for e in epochs]
    ax_res.plot(x, share, marker="o", ms=3, label="solve ended above tol (update applied)")
    ax_res.plot(x, skipped, marker="x", ms=4, label="skipped (diverged)")
    ax_res.set(xlabel="epoch", ylabel="share of batches (%)", ylim=(-2, 102))
    ax_res.legend(fontsize=7)
    return fig


def _mean_curve(curves: Sequence[Sequence[float]]) -> Tuple[list, list]:
    """Epoch-wise mean over the seeds that reached that epoch."""
    longest = max(len(c) for c in curves)
    xs, ys = [], []
    for i in range(longest):
        vals = [c[i] for c in curves if len(c) > i]
        xs.append(i + 1)
        ys.append(statistics.fmean(vals))
    return xs, ys


def plot_reproduction(rows: Sequence[Mapping], path: "str | Path", epochs: Optional[int] = None) -> Path:
    """Write :func:`reproduction_figure` as PNG to ``path``."""
    return save(reproduction_figure(rows, epochs), path)


def reproduction_figure(rows: Sequence[Mapping], epochs: Optional[int] = None):
    """One panel per model: test accuracy (%) per epoch of every method, each seed thin and the mean over seeds
    bold, with the published mean +- std drawn as an error bar just right of the last epoch.

    ``rows``: one dict per (model, method) with ``model``, ``method``, ``curves`` ({seed: [accuracy % per epoch]}),
    ``paper`` ((mean, std) or None) and optionally ``rescored`` ([{seed, recorded, rescored}]: a final score taken
    again from the checkpoint with a later evaluation, drawn as a hollow circle at the last epoch where it differs)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = figure(len(models), width=5.5, height=4.0)
    for ax, model in zip(axes, models):
        lows, highs, last = [], [], epochs or 1
        for k, r in enumerate(r for r in rows if r["model"] == model):
            color = f"C{k}"
            curves = [c for c in r.get("curves", {}).values() if c]
            for c in curves:
                ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.3, lw=0.8)
            label = f"{r['method']} ({len(curves)} seed{'s' if len(curves) != 1 else ''})"
            if curves:
                xs, ys = _mean_curve(curves)
                ax.plot(xs, ys, color=color, lw=2, label=label)
                last = max(last, xs[-1])
                tail = [v for c in curves for v in c[min(4, len(c) - 1):]]  # the first epochs would squash the rest
                lows.append(min(tail))
                highs.append(max(tail))
            for x in r.get("rescored", []):  # a final score taken again with a later evaluation: marked apart
                curve = r.get("curves", {}).get(x["seed"]) or []
                if curve and x["rescored"] != x["recorded"]:
                    ax.plot([len(curve)], [x["rescored"]], linestyle="none", marker="o", ms=6, mfc="none",
                            color=color)
                    highs.append(x["rescored"])
            if r.get("paper"):
                mean, std = r["paper"]
                ax.errorbar([(epochs or last) + 0.7 + 0.25 * k], [mean], yerr=[std], color=color, marker="D",
                            ms=4, capsize=3, label=None if curves else label)
                lows.append(mean - std)
                highs.append(mean + std)
        if lows:
            ax.set_ylim(min(lows) - 0.3, max(highs) + 0.2)
        ax.set(xlabel="epoch (diamonds: the talk's mean +- std; circles: rescored final)",
               ylabel="test accuracy (%)", title=f"MNIST {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return fig
