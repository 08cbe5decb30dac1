"""Data-parallel meta-training and supervised training with ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the full parameters and its own optimizer.  At each step every rank builds the SAME global
batch (the few-shot task stream depends only on the seed and the step; the supervised shuffle only on the seed
and the epoch), takes a contiguous slice of it, and computes the gradient of its slice.  The gradients are
all-reduced as SUMS over tasks (samples) and divided by the global count, so the result is the single-process
mean also when the slices have unequal sizes.  With identical gradients every rank's optimizer takes the
identical step: parameters stay equal without being sent again.

    with distributed.session(device) as device:          # no-op without torchrun
        method = DistributedMeta(make_method("lcp", model, loss_fn, ...))   # broadcasts rank 0's parameters
        stats = method.meta_backward(global_tasks)       # this rank's slice, then all-reduce
        opt.step()                                       # on every rank
        if distributed.is_main(): save(...)

Agreement: a step that fails on any rank (divergence, non-finite gradient, an exception) fails on every rank
together: the failure flag travels in the same all-reduce as the gradients, so no rank waits alone in a
collective.  :func:`check_agreement` compares configurations across ranks and raises the same clear error
everywhere.  Gloo is used on the CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``).

What stays exact: a task's (sample's) gradient must not depend on which other tasks share its slice.  It
holds for every meta-learning method with a fixed number of inner steps or the Euler solver (which freezes
each task at its own stop rule); Anderson stops when the whole slice has converged, so with ``tol`` its
results match a single process to about ``tol`` only (a warning says so).  See docs/distributed.md.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .core.solvers import DivergenceError, SolverStats

__all__ = ["launched", "setup", "shutdown", "session", "is_initialized", "world_size", "rank", "is_main",
           "on_main", "shard_bounds", "broadcast_parameters", "all_reduce_sum", "any_rank", "check_agreement",
           "DistributedMeta", "DistributedSupervised", "wrap_meta", "wrap_supervised"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# --------------------------------------------------------------------------------- process group
def launched() -> bool:
    """True when this process was started by torchrun (or anything that sets RANK/WORLD_SIZE/LOCAL_RANK)."""
    return all(k in os.environ for k in _ENV)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def launched_rank() -> int:
    """This process's rank as torchrun announced it (0 in a plain run); valid after the group has been left, for
    the command line's closing lines."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Only rank 0 writes results, plots and checkpoints (always True in a plain run)."""
    return rank() == 0


def setup(device: torch.device, timeout_s: Optional[float] = None) -> torch.device:
    """Join the process group when launched by torchrun; return the device this rank should use.

    The backend follows the device: NCCL on CUDA (this rank takes ``cuda:LOCAL_RANK``), gloo on the CPU.
    Without torchrun, or when the group already exists, nothing is initialised (a plain run is unchanged).
    """
    device = torch.device(device)
    if not launched():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) on this node; "
                             f"expected --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, **kw)
        atexit.register(shutdown)  # leave the group however the run ends (entry points other than -m lcp_meta)
    return device


def shutdown() -> None:
    """Leave the process group (no-op when there is none)."""
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device, timeout_s: Optional[float] = None):
    """``with session(device) as device:`` joins the group (under torchrun) and always leaves it."""
    owned = launched() and not is_initialized()
    try:
        yield setup(device, timeout_s)
    finally:
        if owned:
            shutdown()


# --------------------------------------------------------------------------------- collectives
def shard_bounds(n: int, world: Optional[int] = None, r: Optional[int] = None) -> Tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` items that rank ``r`` of ``world`` takes.

    Sizes differ by at most one (the first ``n % world`` ranks take one more); a rank may get none.
    """
    world = world_size() if world is None else int(world)
    r = rank() if r is None else int(r)
    base, extra = divmod(int(n), world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def broadcast_parameters(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank's tensors (parameters and buffers), in place."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when ``flag`` is True on any rank (a collective: every rank must call it)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or _comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def on_main(fn, default=None):
    """Run ``fn()`` on rank 0 only (e.g. preparing the run folder); other ranks get ``default``.

    A collective: when ``fn`` raises on rank 0, every rank raises an error of the same type and message, so
    the others do not go on alone."""
    if world_size() == 1:
        return fn()
    result, failure, local = default, None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks below
            local, failure = exc, (type(exc), str(exc))
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        if local is not None:
            raise local
        cls, msg = box[0]
        try:
            err = cls(msg)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments
            err = RuntimeError(msg)
        raise err
    return result


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(obj) -> List[object]:
    if world_size() == 1:
        return [obj]
    out: List[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_agreement(record: Dict[str, object], what: str = "configuration") -> None:
    """Raise the same ValueError on every rank when ranks hold different ``record`` values.

    A collective: every rank must call it with a dict of the same keys (a missing key counts as different).
    Use it for the settings that must agree (config, data root, resume step) before the first step.
    """
    records = _gather(dict(record))
    ref = records[0]
    diffs = []
    for r, rec in enumerate(records[1:], start=1):
        for k in sorted(set(ref) | set(rec)):
            if ref.get(k, "<missing>") != rec.get(k, "<missing>"):
                diffs.append(f"{k}: rank 0 has {ref.get(k, '<missing>')!r}, rank {r} has {rec.get(k, '<missing>')!r}")
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; ... ({len(diffs) - 5} more)" if len(diffs) > 5 else "")
        raise ValueError(f"ranks disagree on the {what}: {shown}; expected every rank to be launched with the "
                         f"same command, data and run folder")


def _fingerprint(tensors: Sequence[torch.Tensor]) -> List[float]:
    with torch.no_grad():
        if not tensors:
            return [0.0, 0.0]
        s = sum(t.detach().double().sum() for t in tensors)
        q = sum(t.detach().double().pow(2).sum() for t in tensors)
        return [float(s), float(q)]


def _grads_flat(params: Sequence[torch.Tensor], dtype, device) -> torch.Tensor:
    return torch.cat([(p.grad.detach().reshape(-1).to(dtype) if p.grad is not None
                       else torch.zeros(p.numel(), dtype=dtype, device=device)) for p in params]) \
        if params else torch.zeros(0, dtype=dtype, device=device)


def _reduce_step(params: Sequence[torch.Tensor], local: torch.Tensor, failed: bool, info: dict):
    """One all-reduce of [local gradient sum, failure flag], one gather of the per-rank ``info``.

    Every rank calls it exactly once per step whatever happened locally, so none is left waiting."""
    flat = torch.cat([local, local.new_tensor([1.0 if failed else 0.0])])
    all_reduce_sum(flat)
    infos = _gather(info)
    return flat[:-1], bool(flat[-1].item() > 0), infos


def _check_fingerprints(infos: List[dict]) -> None:
    ref = infos[0]["fingerprint"]
    for r, inf in enumerate(infos[1:], start=1):
        fp = inf["fingerprint"]
        if any(not math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) for a, b in zip(ref, fp)):
            raise RuntimeError(f"ranks hold different parameters before this step (rank 0 sum/sumsq {ref}, "
                               f"rank {r} {fp}); a rank resumed from another checkpoint or was started "
                               f"differently; expected identical parameters on every rank")


def _exchange(params: Sequence[torch.Tensor], local: torch.Tensor, failed: bool, info: dict, saved: list,
              local_exc: Optional[BaseException]):
    """The step's one collective, after this rank's work whatever happened: ``(summed gradient, per-rank infos,
    failure)``.  A non-finite local gradient counts as a failure.  When any rank failed, ``.grad`` is put back as it
    was (``saved``) on every rank, an error other than a divergence is raised on every rank, and ``failure`` is
    ``(failed ranks with their infos, worst finite residual)``; otherwise it is None."""
    if failed or not bool(torch.isfinite(local).all()):
        failed, local = True, torch.zeros_like(local)
    total, any_failed, infos = _reduce_step(params, local, failed, {**info, "failed": failed})
    if not any_failed:
        _check_fingerprints(infos)
        return total, infos, None
    for p, g in zip(params, saved):
        p.grad = g
    _raise_remote(infos, local_exc)
    bad = [(r, inf) for r, inf in enumerate(infos) if inf["failed"]]
    res = max((inf["residual"] for _, inf in bad if math.isfinite(inf["residual"])), default=float("nan"))
    return total, infos, (bad, res)


def _add_to_grads(params: Sequence[torch.Tensor], saved: list, flat: torch.Tensor) -> None:
    """``p.grad = saved + this step's gradient`` (``flat`` in parameter order), as autograd accumulates."""
    with torch.no_grad():
        i = 0
        for p, g in zip(params, saved):
            n = p.numel()
            add = flat[i:i + n].view_as(p).to(p.dtype)
            p.grad = add.clone() if g is None else g + add
            i += n


def _raise_remote(infos: List[dict], local_exc: Optional[BaseException]) -> None:
    """A rank raised something other than a divergence: every rank raises (the failing one its own error)."""
    errors = [(r, inf["error"]) for r, inf in enumerate(infos) if inf.get("error")]
    if not errors:
        return
    if local_exc is not None:
        raise local_exc
    r, msg = errors[0]
    raise RuntimeError(f"rank {r} failed in this step, so every rank stops: {msg}")


def _params_of(obj) -> List[nn.Parameter]:
    return [p for p in obj.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------ meta-learning
_MAX_KEYS = ("iterations", "residual", "bytes")  # statistics combined by maximum; others by task-weighted mean


def _combine(values: List[Tuple[int, object]], key: str):
    """Combine one statistic over ranks from (task count, value) pairs."""
    vals = [(n, v) for n, v in values if n > 0 and v is not None]
    if not vals:
        return None
    if isinstance(vals[0][1], bool):  # converged: every rank; diverged: any rank
        return any(bool(v) for _, v in vals) if "diverged" in key else all(bool(v) for _, v in vals)
    if not all(isinstance(v, (int, float)) for _, v in vals):
        return vals[0][1]
    if all(v == vals[0][1] for _, v in vals):
        return vals[0][1]
    if any(k in key for k in _MAX_KEYS):
        return max(v for _, v in vals)
    total = sum(n for n, _ in vals)
    return sum(n * float(v) for n, v in vals) / total


def _merge_meta_stats(infos: List[dict]):
    """MetaStats over the global batch from each rank's (count, stats dict)."""
    from .meta.base import MetaStats
    keys = [f.name for f in MetaStats.__dataclass_fields__.values() if f.name != "extra"]
    stats = MetaStats()
    for k in keys:
        v = _combine([(inf["count"], (inf["stats"] or {}).get(k)) for inf in infos], k)
        if v is not None:
            default = getattr(stats, k)
            setattr(stats, k, v if default is None else type(default)(v))
    extra_keys = []
    for inf in infos:
        for k in (inf["stats"] or {}).get("extra", {}):
            if k not in extra_keys:
                extra_keys.append(k)
    for k in extra_keys:
        v = _combine([(inf["count"], (inf["stats"] or {}).get("extra", {}).get(k)) for inf in infos], k)
        if v is not None:
            stats.extra[k] = v
    return stats


def _stats_dict(stats) -> Optional[dict]:
    if stats is None:
        return None
    from dataclasses import asdict, is_dataclass
    return asdict(stats) if is_dataclass(stats) else dict(stats)


def _inner_method(obj):
    """The MetaMethod behind ``obj`` (itself, or the one an adapter such as LCPLearner holds)."""
    return getattr(obj, "method", obj)


class DistributedMeta(nn.Module):
    """Data-parallel ``meta_backward`` for a meta-learning method (or learn2learn's ``LCPLearner``).

    ``meta_backward(tasks)`` takes the GLOBAL meta-batch (the same on every rank), computes the meta-gradient
    of this rank's contiguous slice, and all-reduces ``sum over tasks``; ``.grad`` then holds the mean over
    all tasks, as one process would accumulate.  Statistics are combined over ranks (means weighted by the
    task counts; iterations and residuals by maximum).  Building it broadcasts rank 0's parameters and
    buffers.  Every other attribute (``predict``, ``adapt``, ``model``, ...) is the wrapped method's.

    When the slice of any rank diverges (or its gradient is not finite), EVERY rank leaves ``.grad`` as it
    was and raises :class:`DivergenceError` (or warns and returns stats with ``converged=False`` when the
    method has ``on_divergence="warn"``), so the ranks skip the step together.

    Own loop with per-task learners (learn2learn style ``clone``/``adapt``/``query_loss``): iterate over
    ``wrapper.task_range(meta_batch)``, divide each task's loss by the GLOBAL meta-batch size, then call
    :meth:`sum_grads` before the optimizer step.
    """

    def __init__(self, method: nn.Module, broadcast: bool = True):
        super().__init__()
        if not hasattr(method, "meta_backward") or not isinstance(method, nn.Module):
            raise TypeError(f"DistributedMeta wraps a meta-learning method (an nn.Module with meta_backward), "
                            f"got {type(method).__name__}")
        self.method = method
        inner = _inner_method(method)
        if world_size() > 1 and getattr(inner, "tol", None) is not None and getattr(inner, "solver", None) == "anderson":
            warnings.warn(f"{getattr(inner, 'name', type(inner).__name__)}: solver {inner.solver!r} with tol "
                          f"stops when a whole slice has converged, so each task's result depends on its slice; "
                          f"results match one process to about tol={inner.tol}, not exactly (use solver='euler', "
                          f"'auto' or tol=None for exact equality)", RuntimeWarning, stacklevel=2)
        if broadcast:
            self.broadcast()

    def broadcast(self) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        broadcast_parameters(list(self.method.parameters()) + list(self.method.buffers()))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["method"], name)

    def task_range(self, num_tasks: int) -> range:
        """The indices of the global meta-batch this rank handles."""
        return range(*shard_bounds(num_tasks))

    def forward(self, *args, **kwargs):
        return self.method(*args, **kwargs)

    def meta_backward(self, tasks):
        from .data.tasks import TaskBatch
        tb = TaskBatch.coerce(tasks)
        total = tb.num_tasks
        start, stop = shard_bounds(total)
        count = stop - start
        params = _params_of(self.method)
        fingerprint = _fingerprint(params)
        saved = [p.grad for p in params]
        for p in params:  # compute this slice's mean into fresh .grad; the caller's .grad is restored below
            p.grad = None
        stats, failed, error, local_exc, residual, local_div = None, False, None, None, float("nan"), None
        try:
            if count > 0:
                stats = self.method.meta_backward(tb.slice(start, stop))
                # nothing accumulated without an error: the method warned (on_divergence="warn") and skipped.
                # (``converged=False`` alone is no failure: fixed-step runs report it and do accumulate.)
                failed = all(p.grad is None for p in params)
                r = getattr(stats, "residual", None)
                residual = float("nan") if r is None else float(r)
        except DivergenceError as exc:
            failed, local_div, stats = True, str(exc), None
            residual = float(getattr(getattr(exc, "stats", None), "residual", float("nan")))
        except Exception as exc:  # noqa: BLE001 - must reach the collective before re-raising
            failed, error, local_exc = True, f"{type(exc).__name__}: {exc}", exc
        p0 = params[0] if params else torch.zeros(())
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else p0.dtype
        local = _grads_flat(params, dtype, p0.device) * count  # mean over the slice -> sum over its tasks
        info = {"count": count, "stats": _stats_dict(stats), "error": error, "divergence": local_div,
                "residual": residual, "fingerprint": fingerprint}
        total_grad, infos, failure = _exchange(params, local, failed, info, saved, local_exc)
        if failure is not None:
            bad, res = failure
            msg = (f"meta-step skipped on every rank: rank(s) {', '.join(str(r) for r, _ in bad)} diverged "
                   f"(relative residual {res:.3e}); .grad was left untouched. "
                   + (bad[0][1]["divergence"] or "non-finite meta-gradient"))
            merged = _merge_meta_stats(infos)
            merged.converged = False
            merged.residual = res
            if getattr(_inner_method(self.method), "on_divergence", "raise") == "warn":
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                return merged
            raise DivergenceError(msg, SolverStats(iterations=int(merged.iterations), residual=res,
                                                   converged=False, diverged=True))
        mean = total_grad / total
        _add_to_grads(params, saved, mean)
        merged = _merge_meta_stats(infos)
        inner = _inner_method(self.method)
        model_ids = {id(p) for p in inner.model.parameters()} if hasattr(inner, "model") else None
        sq, i = 0.0, 0
        for p in params:
            n = p.numel()
            if model_ids is None or id(p) in model_ids:
                sq += float(mean[i:i + n].double().pow(2).sum())
            i += n
        merged.meta_grad_norm = math.sqrt(sq)
        merged.extra["world_size"] = world_size()
        return merged

    def sum_grads(self, failed: bool = False) -> bool:
        """For your own per-task loop: all-reduce ``.grad`` as a SUM over ranks (each task's loss divided by
        the global meta-batch size gives the mean).  ``failed=True`` on any rank clears ``.grad`` on every
        rank and returns False (skip the optimizer step); True otherwise."""
        params = _params_of(self.method)
        p0 = params[0]
        local = _grads_flat(params, p0.dtype, p0.device)
        cleared = [None] * len(params)
        info = {"residual": float("nan"), "error": None, "fingerprint": _fingerprint(params)}
        total, _, failure = _exchange(params, local, failed, info, cleared, None)
        if failure is not None:
            return False
        _add_to_grads(params, cleared, total)
        return True


def wrap_meta(method):
    """``DistributedMeta(method)`` inside a process group of more than one rank, else ``method`` itself."""
    return DistributedMeta(method) if world_size() > 1 else method


# ------------------------------------------------------------------------------------------ supervised
def _shard_rule(method):
    """How a supervised method's shard gradient combines into the full batch's, exactly.

    Returns ``(context(scale), weighted)`` where ``scale = shard / batch``.  BP and RBP differentiate the
    batch-MEAN loss: the shard's gradient times ``scale`` sums to the batch's (weighted=True).  The LCP-DI controllers feed
    ``grad_y`` of the batch-mean loss into their dynamics, so the shard size enters the controlled
    equilibrium itself (not linearly); multiplying the controller gains ``k_i, k_p`` by ``scale`` makes the
    shard's dynamics (v, y, e, u) exactly the full batch's (the integral state is rescaled by 1/scale, which
    never leaves the solver), and the local update then already sums per-sample terms: weight 1.
    """
    from .supervised.di import DynamicInversion
    from .supervised.methods import Backprop, RecurrentBackprop
    if isinstance(method, DynamicInversion):
        # the method's gains are its output controller's (core.controllers.OutputGain): one copy to scale
        holders = [method]

        @contextlib.contextmanager
        def gains(scale):
            saved = [(h, h.k_i, h.k_p) for h in holders]
            for h, k_i, k_p in saved:
                h.k_i, h.k_p = k_i * scale, k_p * scale
            try:
                yield
            finally:
                for h, k_i, k_p in saved:
                    h.k_i, h.k_p = k_i, k_p
        return gains, False
    if isinstance(method, RecurrentBackprop):
        warnings.warn("rbp stops its dynamics when the whole batch has converged (the authors' rule), so a shard "
                      "stops at another iteration than the full batch: results match one process to about tol, "
                      "not exactly", RuntimeWarning, stacklevel=3)
        return (lambda scale: contextlib.nullcontext()), True
    if isinstance(method, Backprop):
        return (lambda scale: contextlib.nullcontext()), True
    raise ValueError(f"supervised method {getattr(method, 'name', type(method).__name__)!r} has no exact "
                     f"data-parallel rule yet (its dynamics or feedback learning couple the samples of a "
                     f"batch); expected one of bp, rbp, lcp-di, lcp-di-kp, or run it as one process")


class DistributedSupervised:
    """Data-parallel ``backward(x, y)`` for a supervised method of :mod:`lcp_meta.supervised`.

    Takes the GLOBAL batch, computes this rank's contiguous shard, and all-reduces the local-rule
    gradients so that ``.grad`` equals what one process computes on the whole batch (exact also for
    unequal shards, see :func:`_shard_rule`).  A failure on any rank raises DivergenceError on every rank
    with ``.grad`` untouched.  Other attributes are the wrapped method's.
    """

    def __init__(self, method, broadcast: bool = True):
        self.method = method
        self._context, self._weighted = _shard_rule(method)
        self._params = list(method.parameters())
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.model.modules()):
            warnings.warn("the model uses batch statistics; each rank normalises over its own shard (as DDP "
                          "without SyncBatchNorm), so results differ from one process", RuntimeWarning)
        if broadcast:
            broadcast_parameters(self._params + list(method.model.buffers()))

    def __getattr__(self, name):
        return getattr(self.__dict__["method"], name)

    def parameters(self):
        return self.method.parameters()

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        total = int(x.shape[0])
        start, stop = shard_bounds(total)
        count = stop - start
        scale = count / total
        params = [p for p in self._params if p.requires_grad]
        fingerprint = _fingerprint(params)
        # backward accumulates into .grad (like loss.backward()): start the shard from zero, so that what was
        # there before is added once after the all-reduce, not once per rank
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        stats, failed, error, local_exc, residual, div = None, False, None, None, float("nan"), None
        try:
            if count > 0:
                with self._context(scale):
                    stats = dict(self.method.backward(x[start:stop], y[start:stop]))
        except DivergenceError as exc:
            failed, div = True, str(exc)
            residual = float(getattr(getattr(exc, "stats", None), "residual", float("nan")))
        except Exception as exc:  # noqa: BLE001 - must reach the collective before re-raising
            failed, error, local_exc = True, f"{type(exc).__name__}: {exc}", exc
        p0 = params[0]
        local = _grads_flat(params, p0.dtype, p0.device) if count > 0 and not failed else \
            torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype, device=p0.device)
        if self._weighted:
            local = local * scale
        info = {"count": count, "stats": stats, "error": error, "divergence": div, "residual": residual,
                "fingerprint": fingerprint}
        total_grad, infos, failure = _exchange(params, local, failed, info, saved, local_exc)
        if failure is not None:
            bad, res = failure
            raise DivergenceError(f"batch skipped on every rank: rank(s) {', '.join(str(r) for r, _ in bad)} "
                                  f"failed (relative residual {res:.3e}): "
                                  f"{bad[0][1]['divergence'] or 'non-finite gradient'}",
                                  SolverStats(iterations=0, residual=res, converged=False, diverged=True))
        _add_to_grads(params, saved, total_grad)
        return self._merge(infos)

    def _merge(self, infos: List[dict]) -> Dict[str, float]:
        keys: List[str] = []
        for inf in infos:
            for k in inf["stats"] or {}:
                if k not in keys:
                    keys.append(k)
        out: Dict[str, float] = {}
        for k in keys:
            vals = [(inf["count"], (inf["stats"] or {}).get(k)) for inf in infos]
            if k == "control_norm":  # a norm over the batch: root of the summed squares
                out[k] = math.sqrt(sum(float(v) ** 2 for n, v in vals if n > 0 and v is not None))
            elif k == "beta":  # the shard ran with scaled gains; report the method's own
                out[k] = getattr(self.method, "beta", vals[0][1])
            else:
                out[k] = _combine(vals, k)
        out["world_size"] = world_size()
        return out


def wrap_supervised(method):
    """``DistributedSupervised(method)`` inside a process group of more than one rank, else ``method``."""
    return DistributedSupervised(method) if world_size() > 1 else method
