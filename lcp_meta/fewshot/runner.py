"""The few-shot comparison: meta-train each method on the same task stream, test on the same episodes.

``run_fewshot(config)`` writes a run folder::

    config.json                    the full configuration and data protocol
    <method>.json / _curve.csv     meta-training curve (step, query loss/metric after adaptation, validation
                                   metric, time, peak memory) and test results
    results.md / results.json      the comparison table (see ``report.results_table``)
    results.tex                    the same table as LaTeX (booktabs) for a paper
    curves.png test_metric.png cost.png (fits.png for sinusoid)
    checkpoints/<method>.pt        meta-parameters, optimizer state, RNG states, step, curve so far

Every method starts from the same initial weights (``torch.manual_seed(seed)`` before the model is built) and
gets the same meta-steps, meta-batch and outer optimizer (Adam).  Checkpoints are written atomically; a run
started again with ``resume=True`` continues each method from its checkpoint and reaches the same parameters as
an uninterrupted run (the task of each step depends only on the seed and the step number).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from ..utils.progress import progress as progress_bar

from .. import distributed
from ..core.method import grads_finite
from ..core.solvers import DivergenceError
from ..data.episodes import mean_ci95
from ..data.omniglot import score_one_shot_runs
from ..utils import atomic_write_text, harness, resolve_device
from ..utils.errors import UserInputError
from ..utils.interrupt import CheckpointClock, DeferredInterrupts, Interrupted
from ..utils.tables import latex_table
from ..utils import plots as figures
from . import report
from .config import DTYPES, FewShotConfig, jsonable
from .defaults import EQUILIBRIUM_CAP, EQUILIBRIUM_METHODS, method_defaults
from .tasks import SOURCES

def method_names() -> Tuple[str, ...]:
    from ..meta import METHOD_NAMES
    return tuple(METHOD_NAMES)


def method_kwargs_of(name: str) -> Tuple[str, ...]:
    from ..meta import method_kwargs
    return tuple(method_kwargs(name))


def default_method_factory(name: str, model: torch.nn.Module, loss_fn: Callable, **kwargs):
    from ..meta import make_method
    return make_method(name, model, loss_fn, **kwargs)


def common_kwargs(name: str, cfg: FewShotConfig, factory: Callable) -> Dict[str, object]:
    """The keyword arguments a method gets before its ``--set`` options: the shared budget (inner_lr,
    inner_steps), lam and beta where the method has them, then its own defaults (``defaults.METHODS``).

    ``lcp`` exists only at its controlled equilibrium (``defaults.EQUILIBRIUM_METHODS``): it runs to its residual
    tolerance (at most ``EQUILIBRIUM_CAP`` steps per phase, automatic safe step; --set lcp.inner_lr=... still fixes
    a step) and a meta-step that does not get there is skipped and counted.  The other methods that have a
    tolerance get the shared fixed budget with ``tol=None``: they are then reported as unconverged with their
    final residuals, never as converged.  Why not everything at equilibrium: on the sinusoid's ReLU learner the
    inner problem has kinks where the gradient never vanishes, so no residual tolerance is ever met; see
    docs/results.md."""
    cfg = cfg.resolved()
    kwargs: Dict[str, object] = dict(inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps)
    if factory is not default_method_factory:
        return {**kwargs, "lam": cfg.lam, "beta": cfg.beta}
    from ..meta import is_proximal
    accepted = method_kwargs_of(name)
    if is_proximal(name):  # lam/2 |phi - omega|^2 in the inner problem (MAML, FOMAML, Reptile keep lam = 0)
        kwargs["lam"] = cfg.lam
    if name in EQUILIBRIUM_METHODS:
        kwargs = {"inner_steps": max(cfg.inner_steps, EQUILIBRIUM_CAP), "lam": cfg.lam}
    elif "tol" in accepted:
        kwargs["tol"] = None
    if "beta" in accepted:
        kwargs["beta"] = cfg.beta
    kwargs.update({k: v for k, v in method_defaults(cfg.task, name).items() if k != "outer_lr"})
    return kwargs


SHARED_SETTINGS = ("inner_lr", "inner_steps", "lam", "beta")


def replaced_settings(name: str, given: Dict[str, object], kwargs: Dict[str, object],
                      options: Dict[str, object]) -> list:
    """What of the shared settings the user gave (``given``: --inner-lr, --inner-steps, --lam, --beta) method
    ``name`` does not run with, its ``kwargs`` having taken its tuned per-task default or its equilibrium rule
    instead: one line each, naming the value it runs with and the ``--set`` that would choose the given one.
    ``options``: the method's own --set options (those are the user's choice, never reported)."""
    accepted = method_kwargs_of(name)
    notes = []
    for key, value in given.items():
        if key in options or key not in accepted or kwargs.get(key, None) == value:
            continue
        if key in kwargs and kwargs[key] is not None:
            why = f"runs with {key}={kwargs[key]}" + (" (its cap: it stops at its residual tolerance)"
                                                      if name in EQUILIBRIUM_METHODS and key == "inner_steps"
                                                      else " (its tuned default, lcp_meta/fewshot/defaults.py)")
        elif key == "inner_lr":
            why = "runs with its automatic inner step"
        else:  # (lam of MAML / FOMAML / Reptile: no proximal term, nothing was replaced)
            continue
        notes.append(f"{name} {why}, not the given {key}={value}; --set {name}.{key}={value} chooses it")
    return notes


def outer_lr_of(name: str, cfg: FewShotConfig) -> float:
    """The Adam rate of ``name``'s meta-parameters: ``--set NAME.outer_lr``, else the task's per-method default
    (``defaults.METHODS``), else the shared ``outer_lr``.  It belongs to the run, not to the method."""
    cfg = cfg.resolved()
    chosen = cfg.method_options.get(name, {}).get("outer_lr", method_defaults(cfg.task, name).get("outer_lr"))
    return float(cfg.outer_lr if chosen is None else chosen)


# -------------------------------------------------------------------------------------------- run folder
_RUN_FILES = ("config.json", "results.json", "results.md", "results.tex", "curves.png", "test_metric.png", "cost.png",
              "fits.png")


def run_files(out: Path) -> list:
    """The files of a comparison run in ``out`` (what ``overwrite`` deletes; nothing else there is touched)."""
    if not out.is_dir():
        return []
    stems = set(method_names())
    try:  # the methods of the run recorded there, whatever their names
        stems.update(json.loads((out / "config.json").read_text()).get("methods", []))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    stems.update(p.name[:-len("_curve.csv")] for p in out.glob("*_curve.csv"))
    stems.update(p.stem for p in (out / "checkpoints").glob("*.pt"))
    files = [out / n for n in _RUN_FILES]
    for stem in stems:
        files += [out / f"{stem}.json", out / f"{stem}_curve.csv", out / "checkpoints" / f"{stem}.pt"]
    files = [p for p in files if p.is_file()]
    files += [p for p in list(out.glob("*.tmp")) + list((out / "checkpoints").glob("*.tmp")) if p.is_file()]
    return files


def prepare_run_folder(out: Path, *, resume: bool, overwrite: bool) -> Path:
    """Check that ``out`` can take this run, before anything is written (``utils.harness.prepare_run_folder``
    with the files of a comparison run: ``overwrite`` deletes those and nothing else)."""
    return harness.prepare_run_folder(out, run_files(out), resume=resume, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_kind(device: torch.device) -> str:
    """What the peak-memory column measures.  On a GPU: the CUDA allocator's peak during the meta-step.  On
    the CPU torch keeps no allocator statistics, so the proxy is the bytes of the autograd graph held when
    the meta-gradient is taken (``MetaStats.extra["graph_bytes"]``): the part that grows with unrolled steps."""
    return "CUDA max_memory_allocated" if device.type == "cuda" else "CPU proxy: autograd graph"


def _predict(method, batch) -> torch.Tensor:
    # the 4-tuple form: what every method (and a stand-in in the tests) accepts
    return method.predict(tuple(batch)).detach()


def _evaluate(method, batches, score, desc: str, progress: bool, total: Optional[int] = None) -> torch.Tensor:
    """Per-task metric over the given batches; a batch whose adaptation diverges scores NaN (reported, so a
    diverging method shows as NaN in the table instead of stopping the comparison)."""
    values = []
    for batch in progress_bar(batches, desc=desc, total=total, disable=not progress, leave=False):
        try:
            values.append(score(_predict(method, batch), batch.y_query).cpu())
        except DivergenceError as exc:
            warnings.warn(f"{desc}: adaptation diverged on a batch of {batch.x_support.shape[0]} tasks ({exc})")
            values.append(torch.full((batch.x_support.shape[0],), float("nan"), dtype=torch.float64))
    return torch.cat(values)


# -------------------------------------------------------------------------------------------- one method
class _MethodRun:
    """Meta-training of one method, with its checkpoint."""

    def __init__(self, name: str, cfg: FewShotConfig, source, device: torch.device, out: Path,
                 factory: Callable):
        self.name, self.cfg, self.source, self.device, self.out = name, cfg, source, device, out
        dtype = DTYPES[cfg.dtype]
        torch.manual_seed(cfg.seed)  # same initial meta-parameters for every method
        self.model = source.build_model().to(device=device, dtype=dtype)
        kwargs = common_kwargs(name, cfg, factory)
        kwargs.update({k: v for k, v in cfg.method_options.get(name, {}).items() if k != "outer_lr"})
        outer_lr = outer_lr_of(name, cfg)
        self.kwargs = {**kwargs, "outer_lr": outer_lr}  # shown with the method's settings in every table
        with harness.settings_refused(bool(cfg.method_options.get(name)),
                                      f"--set {name}.*: the method refused its settings {jsonable(kwargs)}"):
            self.method = factory(name, self.model, source.loss_fn, **kwargs)
        self.method = distributed.wrap_meta(self.method)  # under torchrun: this rank's slice, all-reduced
        self.params = list(self.method.parameters())
        self.opt = torch.optim.Adam(self.params, lr=outer_lr)
        self.step, self.curve, self.step_times, self.peak_mib, self.divergences = 0, [], [], None, []
        self.ckpt_path = out / "checkpoints" / f"{name}.pt"

    # ---- checkpoints
    _STATE = ("method", "config", "step", "params", "model_state", "optimizer", "curve", "step_times", "peak_mib",
              "divergences")

    def save(self) -> None:
        harness.save_checkpoint({
            "method": self.name, "config": self.cfg.training_dict(), "step": self.step,
            "params": [p.detach().cpu() for p in self.params], "model_state": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "curve": self.curve, "step_times": self.step_times,
            "peak_mib": self.peak_mib, "divergences": self.divergences,
            # a method's own state beyond the model (e.g. CML's Polyak average of the meta-parameters)
            "method_buffers": {k: b.detach().cpu() for k, b in self._method_buffers().items()}}, self.ckpt_path)

    def _method_buffers(self) -> dict:
        """The method's own buffers (not the model's), by name: saved with and restored from the checkpoint."""
        if not isinstance(self.method, torch.nn.Module):
            return {}
        inside = {id(b) for b in self.model.buffers()}
        return {k: b for k, b in self.method.named_buffers() if id(b) not in inside}

    def restore(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        ckpt = harness.load_run_checkpoint(
            self.ckpt_path, self._STATE, "lcp-meta fewshot", settings={"method": self.name, **self.cfg.training_dict()},
            stored_settings=lambda ck: {"method": ck["method"], **ck["config"]})
        self.model.load_state_dict(ckpt["model_state"])
        with torch.no_grad():
            for p, saved in zip(self.params, ckpt["params"]):
                p.copy_(saved.to(p.device))
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step, self.curve, self.step_times = ckpt["step"], ckpt["curve"], ckpt["step_times"]
        self.peak_mib, self.divergences = ckpt["peak_mib"], ckpt["divergences"]
        buffers = self._method_buffers()
        with torch.no_grad():
            for k, saved in ckpt.get("method_buffers", {}).items():  # absent in checkpoints before 2026-11-28
                buffers[k].copy_(saved.to(buffers[k].device))
        return True

    # ---- one meta-step
    def meta_step(self, batch) -> Tuple[Optional[dict], float]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        try:
            stats = self.method.meta_backward(tuple(batch))
        except DivergenceError as exc:
            # the method leaves .grad untouched on divergence; skip the update so parameters stay intact
            residual = getattr(getattr(exc, "stats", None), "residual", float("nan"))
            self.divergences.append({"step": self.step, "residual": residual, "message": str(exc)})
            self.opt.zero_grad(set_to_none=True)
            return None, time.perf_counter() - t0
        if all(p.grad is None for p in self.params):
            # nothing accumulated without an error: the method warned (on_divergence="warn") and left .grad alone
            residual = getattr(stats, "residual", None)
            residual = float("nan") if residual is None else float(residual)
            self.divergences.append({"step": self.step, "residual": residual,
                                     "message": "the method accumulated no meta-gradient (it warned); update skipped"})
            return None, time.perf_counter() - t0
        if not grads_finite([p.grad for p in self.params if p.grad is not None]):
            self.divergences.append({"step": self.step, "residual": float("nan"),
                                     "message": "non-finite meta-gradient; update skipped"})
            self.opt.zero_grad(set_to_none=True)
            return None, time.perf_counter() - t0
        self.opt.step()
        _sync(self.device)
        dt = time.perf_counter() - t0
        stats = stats.as_dict() if hasattr(stats, "as_dict") else dict(stats)
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            peak = stats.get("graph_bytes")
            peak = None if peak is None else peak / 2 ** 20
        if peak is not None:
            self.peak_mib = peak if self.peak_mib is None else max(self.peak_mib, peak)
        return stats, dt

    def validate(self) -> Tuple[float, float]:
        values = _evaluate(self.method, self.source.val_batches(self.cfg.meta_batch), self.source.score,
                           f"{self.name} validation", False)
        return mean_ci95(values)

    def train(self) -> bool:
        """Meta-train up to ``meta_steps`` (or ``stop_after`` more steps); True when finished."""
        cfg = self.cfg
        restored = cfg.resume and self.restore()
        distributed.check_agreement({"method": self.name, "step": self.step}, "resume point (every rank must read "
                                    "the same checkpoint: put --out on a shared file system)")
        if restored and self.step >= cfg.meta_steps:
            return True
        log_every = cfg.log_every or max(1, cfg.meta_steps // 100)
        val_every = cfg.val_every or max(1, cfg.meta_steps // 10)
        stop = cfg.meta_steps if cfg.stop_after is None else min(cfg.meta_steps, self.step + cfg.stop_after)
        bar = progress_bar(total=cfg.meta_steps, initial=self.step, desc=f"{self.name} meta-training",
                   disable=not cfg.progress, dynamic_ncols=True)
        clock = CheckpointClock(cfg.checkpoint_minutes, cfg.checkpoint_every)
        with DeferredInterrupts() as signals:
            while self.step < stop:
                batch = self.source.train_batch(self.step)
                # the metric after adaptation, on this step's tasks, before the update (the same tasks and parameters
                # as the query loss the meta-step reports)
                logging = (self.step + 1) % log_every == 0 or self.step + 1 == cfg.meta_steps
                query_metric = float(_evaluate(self.method, [batch], self.source.score, f"{self.name} step",
                                               False).mean()) if logging else None
                stats, dt = self.meta_step(batch)
                self.step += 1
                self.step_times.append(dt)
                if logging and stats is not None:
                    row = {"step": self.step, "query_loss": stats.get("query_loss_after"),
                           "time_s": sum(self.step_times), "sec_per_step": dt, "peak_memory_mib": self.peak_mib,
                           "val_metric": None, "val_ci95": None,
                           # where the method stopped: an equilibrium result is only as good as its residuals
                           "inner_residual": stats.get("inner_residual"), "control_residual": stats.get("control_residual"),
                           "converged": stats.get("converged")}
                    row["query_metric"] = query_metric
                    if self.step % val_every == 0 or self.step == cfg.meta_steps:
                        row["val_metric"], row["val_ci95"] = self.validate()
                    self.curve.append(row)
                    bar.set_postfix(loss=f"{row['query_loss']:.4g}" if row["query_loss"] is not None else "n/a")
                bar.update(1)
                halt = distributed.any_rank(signals.requested)  # (every rank stops at the same step)
                if clock.tick(self.step, force=halt):
                    self.save()
                if halt:
                    bar.close()
                    distributed.any_rank(False)  # (a barrier: no rank exits before rank 0 has saved)
                    raise Interrupted(f"{signals.name}: stopped {self.name} after meta-step {self.step} of "
                                      f"{cfg.meta_steps}; checkpoint saved in {self.ckpt_path}; continue with "
                                      f"--resume", signals.signum)
        bar.close()
        self.save()
        if self.divergences:
            warnings.warn(f"{self.name}: {len(self.divergences)} meta-step(s) diverged and were skipped "
                          f"(first: {self.divergences[0]['message']})")
        return self.step >= cfg.meta_steps

    def sec_per_step(self) -> float:
        # the first step pays one-off costs (kernel selection, allocator warm-up); leave it out when we can
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return float(sum(times) / len(times)) if times else float("nan")


# ------------------------------------------------------------------------------------------------ the run
def _sinusoid_fits(runs: Sequence[_MethodRun], source, count: int = 3) -> dict:
    sampled = source.fit_tasks(count)
    tasks, count = sampled.tasks, sampled.tasks.num_tasks
    grid = torch.linspace(*source.tasks.x_range, 200, device=source.device, dtype=source.dtype)
    x_grid = grid.view(1, -1, 1).expand(count, -1, -1).contiguous()
    fits = {"x": grid.cpu().tolist(), "tasks": []}
    preds = {}
    for run in runs:
        try:
            preds[run.name] = _predict(run.method, (tasks.x_support, tasks.y_support, x_grid,
                                                    torch.zeros_like(x_grid))).cpu()
        except DivergenceError as exc:  # a diverging method gets no curve in the plot; the run still finishes
            warnings.warn(f"{run.name}: adaptation for the fits plot diverged ({exc})")
    for i in range(count):
        fits["tasks"].append({
            "amplitude": float(sampled.amplitude[i]), "phase": float(sampled.phase[i]),
            "x_support": tasks.x_support[i, :, 0].cpu().tolist(), "y_support": tasks.y_support[i, :, 0].cpu().tolist(),
            "pred": {name: p[i, :, 0].tolist() for name, p in preds.items()}})
    return fits


def run_fewshot(cfg: FewShotConfig, method_factory: Optional[Callable] = None) -> Dict[str, object]:
    """Run the comparison described by ``cfg``; returns a summary (also written to ``<out>/results.json``).

    ``method_factory(name, model, loss_fn, **kwargs)`` builds a method (default: ``lcp_meta.meta.make_method``).
    """
    given = {k: getattr(cfg, k) for k in SHARED_SETTINGS if getattr(cfg, k, None) is not None}
    cfg = cfg.validate()
    factory = method_factory or default_method_factory
    if method_factory is None:
        known = method_names()
        unknown = [m for m in cfg.methods if m not in known]
        if unknown:
            raise UserInputError(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
        for name, options in cfg.method_options.items():  # refused before anything is written
            accepted = (*method_kwargs_of(name), "outer_lr")  # outer_lr: the run's, per method
            wrong = sorted(set(options) - set(accepted))
            if wrong:
                raise UserInputError(f"--set {name}.{wrong[0]}: {name} has no option {wrong[0]!r}; it accepts "
                                     f"{', '.join(sorted(accepted))}")
    device = distributed.setup(resolve_device(cfg.device))  # under torchrun: join the group (gloo/nccl)
    distributed.check_agreement(jsonable(dataclasses.asdict(cfg)), "configuration")
    dtype = DTYPES[cfg.dtype]
    out = distributed.on_main(lambda: prepare_run_folder(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite),
                              Path(cfg.out))
    source = SOURCES[cfg.task].from_config(cfg, device, dtype)
    where = harness.provenance(device)
    config_record = {**{k: jsonable(v) for k, v in dataclasses.asdict(cfg).items()},
                     "resolved_device": where.pop("device"), **where, "protocol": source.protocol}
    distributed.check_agreement({"protocol": source.protocol}, "data protocol (same data on every rank)")
    harness.write_json(config_record, out / "config.json")

    runs, results, unfinished = [], [], []
    one_shot = source.one_shot_runs() if hasattr(source, "one_shot_runs") else None
    for name in cfg.methods:
        run = _MethodRun(name, cfg, source, device, out, factory)
        if factory is default_method_factory and distributed.is_main():
            # a shared flag that a method's tuned setting replaces is said, not silently dropped
            for note in replaced_settings(name, given, run.kwargs, cfg.method_options.get(name, {})):
                warnings.warn(note)
        if not run.train():
            unfinished.append(name)
            continue
        values = _evaluate(run.method, source.test_batches(cfg.meta_batch), source.score, f"{name} test",
                           cfg.progress, total=math.ceil(source.num_test() / cfg.meta_batch))
        mean, ci = mean_ci95(values)
        result = {"method": name, "metric": source.metric, "test_mean": mean, "test_ci95": ci,
                  "test_episodes": int(values.numel()), "sec_per_step": run.sec_per_step(),
                  "peak_memory_mib": run.peak_mib, "memory_kind": memory_kind(device),
                  "meta_steps": run.step, "skipped_meta_steps": len(run.divergences),
                  "method_kwargs": jsonable(run.kwargs), "divergences": run.divergences, "curve": run.curve,
                  "final_residuals": report.final_residuals(run.curve),
                  # per test episode, in episode order (the same episodes for every method of this seed): what
                  # the paired tests over seeds and episodes need (fewshot.stats)
                  "test_values": [float(v) for v in values]}
        if one_shot:
            scores = score_one_shot_runs(
                _predict(run.method, source.one_shot_batch(one_shot)).argmax(-1).cpu(), one_shot)
            m, c = mean_ci95(scores)
            result["one_shot_runs"] = {"mean": m, "ci95": c, "per_run": dict(zip([r.name for r in one_shot],
                                                                                 scores))}
        harness.write_json(result, out / f"{name}.json")
        if distributed.is_main():
            report.write_curve_csv(run.curve, out / f"{name}_curve.csv")
        runs.append(run)
        results.append(result)

    summary: Dict[str, object] = {"out": str(out), "results": results, "unfinished": unfinished,
                                  "memory_kind": memory_kind(device), "config": config_record}
    too_many = [r["method"] for r in results if r["skipped_meta_steps"] > cfg.max_skipped * r["meta_steps"]]
    if too_many:
        summary["too_many_skipped"] = too_many
        summary["skipped_message"] = (
            "; ".join(f"{r['method']} skipped {r['skipped_meta_steps']} of {r['meta_steps']} meta-steps"
                      for r in results if r["method"] in too_many)
            + f" (more than the allowed share {cfg.max_skipped:g}): their meta-gradients diverged, so their rows "
              f"show a barely trained model; see 'divergences' in <method>.json, then lower beta, lam or "
              f"inner_lr, or check the data")
    if unfinished:
        summary["message"] = (f"stopped before meta-step {cfg.meta_steps} for {', '.join(unfinished)}; "
                              f"run again with --resume to continue")
    if not distributed.is_main():  # the other ranks computed the same numbers; rank 0 writes them
        return summary
    if results:
        mk = memory_kind(device)
        table = report.results_table(results, mk)
        summary["table"] = table
        atomic_write_text(
            f"# Few-shot comparison: {cfg.task}\n\n{table}\n"
            f"{cfg.test_episodes} fixed test episodes (seed {cfg.seed}), 95% CI = 1.96 std / sqrt(n); "
            f"sec/meta-step: mean wall-clock of a meta-step after the first on {config_record['device_name']}; "
            f"skipped: meta-steps whose update was dropped because the method diverged.\n", out / "results.md")
        # the same table for a paper (booktabs), derived from the markdown so that the two never disagree
        atomic_write_text(latex_table(table, caption=f"Few-shot comparison: {cfg.task}, {cfg.test_episodes} test "
                                      f"episodes (seed {cfg.seed}), mean ± 95% CI.", label=f"tab:{cfg.task}"),
                          out / "results.tex")
    if results and cfg.plots and not figures.available():  # the tables and JSON above are the results
        warnings.warn(figures.MISSING, RuntimeWarning)
    elif results and cfg.plots:
        plots = [report.plot_curves(results, out / "curves.png"),
                 report.plot_test_metric(results, out / "test_metric.png", cfg.test_episodes),
                 report.plot_cost(results, out / "cost.png", mk)]
        if cfg.task == "sinusoid":
            plots.append(report.plot_sinusoid_fits(_sinusoid_fits(runs, source), out / "fits.png"))
        summary["plots"] = [str(p) for p in plots]
    harness.write_json({k: v for k, v in summary.items() if k != "table"}, out / "results.json")
    return summary
