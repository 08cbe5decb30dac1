"""The ``paper`` preset: supervised LCP trained the way the authors' public code trains it (issue 12).

``preset_overrides(dataset, model, method, preset)`` returns the method settings, model settings and evaluation
options that differ from the library defaults; the trainer applies them before the user's own overrides.
What ``paper`` changes, and why (docs/fidelity.md has the full list, with what we keep different):

- ``max_residual=inf``: a controlled solve that stops at its iteration cap above the tolerance still gives its
  update, computed at the state reached, as the authors' code does (only NaN/inf is refused).  Every batch's
  final residual is recorded and summarised per epoch by the trainer (:func:`residual_summary`), so a run shows
  how many of its updates came from unsettled states, and how far from settled.
- ``stop_rule="batch"``: the whole batch iterates until its largest relative change is below ``tol`` (the
  authors' stop rule).  Required where the samples are coupled (batch norm in the conv-rnn decoder: a frozen
  sample would no longer be at the joint equilibrium); applied everywhere for the same stop rule.
- rbp: ``guard_growth=None``: the adjoint runs its 200 iterations however far it grows, as the authors' does
  (a non-finite result is still refused).  The library default stops a growing adjoint and refuses the batch;
  on the paper rnn that regime lasts for epochs, and refusing every such batch left training stuck (924 of 938
  batches refused in epoch 3, test accuracy 94.9 -> 70.1 %), where applying the solves' finite results recovers
  (benchmarks/results/rnn_short_cpu.md, rnn_rbp_first_epoch_cpu.md).
- rnn: ``recurrent_bias=True`` (the authors' recurrent layer has its own bias).
- lcp-di / lcp-di-kp on the rnn: ``solver="euler-flat"``, the authors' Euler simulation of the joint dynamics
  (leaky-integral output controller included) on one flat state per sample; with the batch-wide stop it gives
  the ``euler`` simulation's update (test to 1e-10).  The structured solvers of ``auto`` reach *an* equilibrium of
  the same equations, but at trained parameters several exist, and the reduced map (output controller settled
  instantly) fell into another basin than the authors' dynamics on 11 of 12 batches of an epoch-7 checkpoint,
  where ``euler-flat`` agreed on 11 of 12 and cost 0.89x (benchmarks/results/supervised_cpu.md, 2026-11-29).
- lcp-ebd on the rnn: the free-equilibrium start and the evaluation use the authors' solver settings
  (tol 1e-4, 200 iterations) instead of 1e-6 / 800.
- lcp-di-kp: ``kp_decay="before-batch"`` (every implicit-module, decoder and feedback parameter decays before
  each batch, not only the weight pairs after the step).
- conv-rnn: the authors' layer (``variant="authors"``: the state only enters additively) and their evaluation
  convention (no ``model.eval()``: batch norm uses each test batch's statistics, test batches of 64).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Sequence, Tuple

from ..utils.errors import UserInputError

__all__ = ["PRESETS", "preset_overrides", "residual_summary"]

PRESETS = ("default", "paper")


def preset_overrides(dataset: str, model: str, method: str, preset: str = "default"
                     ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """``(method kwargs, model kwargs, evaluation options)`` of ``preset`` for the run; all empty for 'default'.

    Evaluation options: ``batch_stats`` (evaluate in training mode, batch norm on each test batch's statistics)
    and ``eval_batch_size``."""
    if preset not in PRESETS:
        raise UserInputError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if preset == "default":
        return {}, {}, {}
    meth: Dict[str, Any] = {}
    if method != "bp":  # bp has no dynamics
        meth.update(max_residual=math.inf, stop_rule="batch")
    if method == "rbp":
        meth["guard_growth"] = None
    mod: Dict[str, Any] = {}
    ev: Dict[str, Any] = {}
    if model == "rnn":
        mod["recurrent_bias"] = True
        if method in ("lcp-di", "lcp-di-kp"):
            meth["solver"] = "euler-flat"
        if method == "lcp-ebd":
            meth.update(tol=1e-4, max_iter=200)
    if method == "lcp-di-kp":
        meth["kp_decay"] = "before-batch"
    if model == "conv-rnn":
        mod["variant"] = "authors"
        ev.update(batch_stats=True, eval_batch_size=64)
    return meth, mod, ev


def residual_summary(residuals: Sequence[float], converged: Sequence[bool], tol: float) -> Dict[str, Any]:
    """Per-epoch summary of the final relative residuals of the trained batches' solves.

    ``above_tol``: batches whose solve ended without meeting its stop rule (their update was applied from the
    state reached); ``share_above_tol`` their share; ``max``/``median`` over all batches and ``median_above_tol``
    over the unsettled ones (NaN-free: a NaN solve is never applied, it is counted as skipped)."""
    res: List[float] = [float(r) for r in residuals]
    above = [r for r, ok in zip(res, converged) if not ok]
    n = len(res)
    return {"batches": n, "tol": tol, "above_tol": len(above), "share_above_tol": len(above) / n if n else 0.0,
            "max": max(res) if res else 0.0, "median": statistics.median(res) if res else 0.0,
            "median_above_tol": statistics.median(above) if above else None}
