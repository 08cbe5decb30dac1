"""The comparison runner with stand-in methods: shared task stream and initialisation, divergence handling.

The stand-in is a first-order MAML written here with a plain per-task loop, independent of lcp_meta.meta, so
these tests pin down the runner's own contract.
"""
import json
import os
import signal

import pytest
import torch
from torch.func import functional_call, grad

from lcp_meta.core.solvers import DivergenceError, SolverStats
from lcp_meta.fewshot import FewShotConfig, run_fewshot
from lcp_meta.fewshot.tasks import SinusoidSource, derive_seed
from lcp_meta.utils.interrupt import Interrupted


class StandIn(torch.nn.Module):
    """First-order MAML, task by task; records what it was given."""

    def __init__(self, model, loss_fn, inner_lr, inner_steps, fail=None, log=None, **unused):
        super().__init__()
        self.model, self.loss_fn, self.lr, self.steps = model, loss_fn, inner_lr, inner_steps
        self.fail, self.log, self.calls = fail, log if log is not None else [], 0

    def _adapt(self, x, y):
        phi = {k: v.detach() for k, v in self.model.named_parameters()}
        loss = lambda p: self.loss_fn(functional_call(self.model, p, (x,)), y)  # noqa: E731
        for _ in range(self.steps):
            g = grad(loss)(phi)
            phi = {k: phi[k] - self.lr * g[k] for k in phi}
        return phi

    def meta_backward(self, tasks):
        xs, ys, xq, yq = tasks
        self.calls += 1
        self.log.append(("train", xs.clone()))
        if self.fail == "raise":
            raise DivergenceError("stand-in diverged (relative residual 3.0e+05)",
                                  SolverStats(iterations=3, residual=3e5, converged=False, diverged=True))
        losses = []
        for t in range(xs.shape[0]):
            phi = self._adapt(xs[t], ys[t])
            lq = lambda p: self.loss_fn(functional_call(self.model, p, (xq[t],)), yq[t])  # noqa: E731
            g = grad(lq)(phi)
            losses.append(float(lq(phi)))
            for k, p in self.model.named_parameters():
                gk = g[k] / xs.shape[0] * (float("nan") if self.fail == "nan" else 1.0)
                p.grad = gk.clone() if p.grad is None else p.grad + gk
        return {"query_loss_after": sum(losses) / len(losses)}

    def predict(self, tasks):
        xs, ys, xq = tasks[:3]
        self.log.append(("predict", xq.clone()))
        return torch.stack([functional_call(self.model, self._adapt(xs[t], ys[t]), (xq[t],)).detach()
                            for t in range(xs.shape[0])])


def _cfg(tmp_path, **kw):
    base = dict(task="sinusoid", methods=("a", "b"), shots=5, meta_steps=3, meta_batch=2, inner_steps=2,
                inner_lr=0.05, test_episodes=4, val_episodes=2, dtype="float64", device="cpu",
                out=str(tmp_path / "run"), progress=False, checkpoint_every=2, plots=False)
    base.update(kw)
    return FewShotConfig(**base)


def test_every_method_gets_the_same_stream_init_and_test_set(tmp_path):
    logs, inits = {}, {}

    def factory(name, model, loss_fn, **kw):
        inits[name] = [p.detach().clone() for p in model.parameters()]
        logs[name] = []
        return StandIn(model, loss_fn, log=logs[name], **kw)

    summary = run_fewshot(_cfg(tmp_path), method_factory=factory)
    assert all(torch.equal(p, q) for p, q in zip(inits["a"], inits["b"]))
    assert len(logs["a"]) == len(logs["b"]) and len(logs["a"]) > 3
    for (kind_a, xa), (kind_b, xb) in zip(logs["a"], logs["b"]):
        assert kind_a == kind_b and torch.equal(xa, xb)
    # the training batch of step s is the source's batch for s, whatever ran before
    train = [x for kind, x in logs["a"] if kind == "train"]
    source = SinusoidSource(5, None, 2, 0, 2, 4, torch.device("cpu"), torch.float64)
    assert all(torch.equal(x, source.train_batch(s).x_support) for s, x in enumerate(train))
    assert derive_seed(0, 0, 1) != derive_seed(0, 0, 2) != derive_seed(0, 1, 1)
    out = tmp_path / "run"
    for name in ("a", "b"):
        res = json.loads((out / f"{name}.json").read_text())
        assert res["meta_steps"] == 3 and res["test_episodes"] == 4 and res["divergences"] == []
        assert res["metric"] == "mse" and res["test_mean"] > 0
    assert summary["unfinished"] == [] and (out / "results.md").is_file()
    # the LaTeX table is the markdown one: one row per method, the same cells
    tex = (out / "results.tex").read_text()
    rows = [ln for ln in tex.splitlines() if ln.endswith(r"\\") and not ln.startswith("method")]
    assert [r.split(" & ")[0] for r in rows] == ["a", "b"]
    a = json.loads((out / "a.json").read_text())
    assert rows[0].split(" & ")[1] == f"{a['test_mean']:.4g} $\\pm$ {a['test_ci95']:.3g}"


def test_diverging_steps_are_skipped_and_leave_parameters_intact(tmp_path):
    for mode in ("raise", "nan"):
        initial = {}

        def factory(name, model, loss_fn, **kw):
            initial[name] = [p.detach().clone() for p in model.parameters()]
            return StandIn(model, loss_fn, fail=mode, **kw)

        cfg = _cfg(tmp_path, methods=("a",), out=str(tmp_path / mode))
        run_fewshot(cfg, method_factory=factory)
        ckpt = torch.load(tmp_path / mode / "checkpoints" / "a.pt", weights_only=False)
        # no update was applied: parameters are the initial ones, finite, and the optimizer never stepped
        assert all(torch.equal(p, q) for p, q in zip(ckpt["params"], initial["a"]))
        assert ckpt["optimizer"]["state"] == {}
        assert len(ckpt["divergences"]) == 3
        if mode == "raise":
            assert ckpt["divergences"][0]["residual"] == 3e5 and "3.0e+05" in ckpt["divergences"][0]["message"]
        else:
            assert "non-finite" in ckpt["divergences"][0]["message"]


def test_final_residuals_reach_the_json_and_the_table(tmp_path):
    """The residuals a method reports at its last meta-step are what the JSON and results.md show."""
    from lcp_meta.fewshot import report
    from lcp_meta.fewshot.runner import common_kwargs, default_method_factory
    last = {}

    def factory(name, model, loss_fn, **kw):
        # a custom factory receives lam and beta for every method: keep what this one takes, as the runner does
        method = default_method_factory(name, model, loss_fn, **common_kwargs(name, cfg, default_method_factory))
        inner = method.meta_backward

        def recording(tasks):
            last[name] = inner(tasks).as_dict()
            return last[name]
        method.meta_backward = recording
        return method

    cfg = _cfg(tmp_path, methods=("lcp-truncated", "maml"), log_every=1)
    run_fewshot(cfg, method_factory=factory)
    out = tmp_path / "run"
    res = json.loads((out / "lcp-truncated.json").read_text())
    final = res["final_residuals"]
    assert final["step"] == cfg.meta_steps and final["converged"] is False  # a fixed budget is never "converged"
    for key in ("inner_residual", "control_residual"):
        assert isinstance(final[key], float) and final[key] > 0 and final[key] == last["lcp-truncated"][key]
    rows = {r["method"]: r for r in report.parse_results_table((out / "results.md").read_text())}
    cell = rows["lcp-truncated"]["final residual (inner / control)"]
    assert cell == f"{final['inner_residual']:.1e} / {final['control_residual']:.1e} (unconverged)"
    maml = json.loads((out / "maml.json").read_text())["final_residuals"]
    assert rows["maml"]["final residual (inner / control)"] == report.format_residuals({"final_residuals": maml})


def test_a_per_method_outer_lr_drives_that_methods_adam_only(tmp_path):
    """--set METHOD.outer_lr is the Adam rate of that method's meta-parameters (the others keep --outer-lr).
    Undoing each method's single Adam step with the rate it should have used must give back one and the same
    initial point (every method starts from the same meta-parameters); a wrong rate would not."""
    cfg = _cfg(tmp_path, methods=("maml", "fomaml"), meta_steps=1, outer_lr=1e-3,
               method_options={"maml": {"outer_lr": 0.25}})
    run_fewshot(cfg)
    out, starts = tmp_path / "run", {}
    for name, lr in (("maml", 0.25), ("fomaml", 1e-3)):
        ckpt = torch.load(out / "checkpoints" / f"{name}.pt", weights_only=False)
        group = ckpt["optimizer"]["param_groups"][0]
        assert group["lr"] == lr
        b1, b2 = group["betas"]
        starts[name] = []
        for i, p in enumerate(ckpt["params"]):
            st = ckpt["optimizer"]["state"][i]
            step = st["exp_avg"] / (1 - b1) / ((st["exp_avg_sq"] / (1 - b2)).sqrt() + group["eps"])
            starts[name].append(p + lr * step)
        assert json.loads((out / f"{name}.json").read_text())["method_kwargs"]["outer_lr"] == lr
    for p, q in zip(starts["maml"], starts["fomaml"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    # and the step taken was of the size of each rate (maml's parameters moved far more than fomaml's)
    ckpts = {n: torch.load(out / "checkpoints" / f"{n}.pt", weights_only=False)["params"] for n in starts}
    far = max(float((p - q).abs().max()) for p, q in zip(ckpts["maml"], starts["maml"]))
    near = max(float((p - q).abs().max()) for p, q in zip(ckpts["fomaml"], starts["fomaml"]))
    assert 0.2 < far <= 0.25 + 1e-9 and 0.5e-3 < near <= 1e-3 + 1e-9


def test_a_given_shared_setting_that_a_tuned_default_replaces_is_said(tmp_path):
    """--lam / --inner-lr / --inner-steps given on the command line were silently replaced by a method's tuned
    per-task setting (sinusoid: iMAML lam 2, MAML inner_lr 0.00837): the run must say so for exactly the settings
    it did not use, and run with what it says; --set METHOD.KEY=VALUE then chooses the given value."""
    import warnings

    from lcp_meta.fewshot.runner import common_kwargs, default_method_factory, replaced_settings
    notes = {}
    for options in ({}, {"imaml": {"lam": 1.0}}):
        cfg = _cfg(tmp_path, methods=("imaml", "reptile"), meta_steps=1, lam=1.0, inner_lr=0.05, inner_steps=2,
                   out=str(tmp_path / f"run{len(options)}"), method_options=options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_fewshot(cfg)
        notes[len(options)] = [str(w.message) for w in caught if " not the given " in str(w.message)]
        kw = json.loads((tmp_path / f"run{len(options)}" / "imaml.json").read_text())["method_kwargs"]
        assert kw["lam"] == (1.0 if options else 2.0) and kw["inner_lr"] == 0.05
    assert sorted(notes[0]) == sorted([
        "imaml runs with lam=2.0 (its tuned default, lcp_meta/fewshot/defaults.py), not the given lam=1.0; "
        "--set imaml.lam=1.0 chooses it",
        "imaml runs with inner_steps=16 (its tuned default, lcp_meta/fewshot/defaults.py), not the given "
        "inner_steps=2; --set imaml.inner_steps=2 chooses it"])  # reptile: nothing replaced (and no lam)
    assert notes[1] == [n for n in notes[0] if "inner_steps" in n]
    # lcp at its equilibrium: its automatic step and its cap are named as such
    cfg = FewShotConfig(task="sinusoid", methods=("lcp",), lam=10.0, inner_lr=0.05, inner_steps=50)
    lcp = replaced_settings("lcp", {"lam": 10.0, "inner_lr": 0.05, "inner_steps": 50},
                            common_kwargs("lcp", cfg, default_method_factory), {})
    assert lcp == ["lcp runs with its automatic inner step, not the given inner_lr=0.05; --set lcp.inner_lr=0.05 "
                   "chooses it", "lcp runs with inner_steps=1000 (its cap: it stops at its residual tolerance), "
                   "not the given inner_steps=50; --set lcp.inner_steps=50 chooses it"]


def test_a_signal_stops_after_the_meta_step_in_flight_and_resume_loses_nothing(tmp_path):
    """SIGTERM during meta-step 3 of method a: that step finishes, is checkpointed (checkpoint_every=0 would save only
    at the end), the run stops with Interrupted, and --resume reaches the uninterrupted parameters of both methods."""
    def factory(signal_at=None):
        def make(name, model, loss_fn, **kw):
            method = StandIn(model, loss_fn, **kw)
            if name == "a" and signal_at is not None:
                plain = method.meta_backward

                def meta_backward(tasks):
                    if method.calls + 1 == signal_at:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return plain(tasks)
                method.meta_backward = meta_backward
            return method
        return make

    straight = _cfg(tmp_path, meta_steps=5, checkpoint_every=0, out=str(tmp_path / "straight"))
    run_fewshot(straight, method_factory=factory())
    cut = _cfg(tmp_path, meta_steps=5, checkpoint_every=0, out=str(tmp_path / "cut"))
    with pytest.raises(Interrupted) as info:
        run_fewshot(cut, method_factory=factory(signal_at=3))
    assert info.value.exit_code == 143 and "after meta-step 3 of 5" in str(info.value)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "a.pt", weights_only=False)["step"] == 3
    cut.resume = True
    run_fewshot(cut, method_factory=factory())
    for name in ("a", "b"):
        a = torch.load(tmp_path / "straight" / "checkpoints" / f"{name}.pt", weights_only=False)
        b = torch.load(tmp_path / "cut" / "checkpoints" / f"{name}.pt", weights_only=False)
        assert a["step"] == b["step"] == 5 and all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
