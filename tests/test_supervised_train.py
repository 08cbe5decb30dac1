"""The supervised trainer: exactness of its optimizer loop, resume equivalence, skipped divergent batches,
and short MNIST runs of every method (those need the real models and the offline data).
"""
import json
import os
import signal
import time
import warnings

import pytest
import torch
from torch import nn

from lcp_meta.core import DivergenceError, SolverStats
from lcp_meta.data.mnist import TensorBatches
from lcp_meta.supervised.trainer import RunConfig, SkippedBatchWarning, train
from lcp_meta.utils.interrupt import DeferredInterrupts, Interrupted

from conftest import SHARED_DATA as DATA




# ---------------------------------------------------------------- stand-ins (trainer mechanics only)
class TinyNet(nn.Module):
    """A 2-layer tanh net with the ``predict`` interface of an EquilibriumModel (its 'equilibrium' is one pass)."""

    def __init__(self, d_in=6, hidden=8, classes=3):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d_in, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.flatten(1))))

    def predict(self, x, solver="euler", tol=1e-6, max_iter=800):
        with torch.no_grad():
            return self(x), SolverStats(iterations=1, residual=0.0, converged=True)


class BackpropMethod:
    """Plain backprop with the method interface; ``fail`` maps a call number to an exception or 'nan'."""

    def __init__(self, model, fail=None):
        self.model, self.fail, self.calls, self.after = model, dict(fail or {}), 0, 0

    def parameters(self):
        return self.model.parameters()

    def backward(self, x, y):
        self.calls += 1
        what = self.fail.get(self.calls)
        if isinstance(what, BaseException):
            raise what
        if callable(what):  # e.g. a signal arriving while this batch runs
            what()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        if what == "nan":
            next(self.model.parameters()).grad.fill_(float("nan"))
        return {"loss": loss.item(), "iterations": 1, "residual": 0.0, "converged": True}

    def after_step(self):
        self.after += 1

    def state_dict(self):
        return {"calls": self.calls, "after": self.after}

    def load_state_dict(self, sd):
        self.calls, self.after = sd["calls"], sd["after"]


def _blobs(n=96, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y, x[:48], y[:48]


def _cfg(tmp_path, name, **kw):
    base = dict(dataset="mnist", model="ff", method="bp", epochs=3, batch_size=16, seed=3, device="cpu",
                out=str(tmp_path / name), progress=False)
    base.update(kw)
    return RunConfig(**base)


def _run(cfg, fail=None, data=None):
    torch.manual_seed(cfg.seed)
    model = TinyNet()
    method = BackpropMethod(model, fail)
    res = train(cfg, model=model, method=method, data=data or _blobs(), log=lambda s: None)
    return model, method, res


def test_trainer_matches_a_hand_written_adam_cosine_loop(tmp_path):
    """Adam 1e-3 -> 1e-4 cosine per batch over the same shuffles: parameters equal a plain torch loop."""
    cfg = _cfg(tmp_path, "a", epochs=2, lr=1e-2, lr_final=1e-3, max_batches=5)
    model, _, res = _run(cfg)
    torch.manual_seed(cfg.seed)
    ref = TinyNet()
    xtr, ytr, _, _ = _blobs()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    total = 2 * 5
    batches = TensorBatches(xtr, ytr, 16, seed=cfg.seed)
    for step in range(total):
        x, y = list(batches.batches(step // 5))[step % 5]
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        for group in opt.param_groups:  # closed-form cosine annealing to the final rate
            group["lr"] = 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + torch.cos(torch.tensor((step + 1) / total * torch.pi)).item())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert res["batches_per_epoch"] == 5 and len(res["epochs"]) == 2
    assert res["epochs"][-1]["lr"] == pytest.approx(1e-3)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    full_model, full_method, _ = _run(_cfg(tmp_path, "full", checkpoint_every=2))
    cfg = _cfg(tmp_path, "cut", checkpoint_every=2)
    # interrupted in epoch 2 (6 batches per epoch): the last checkpoint is at epoch 2, batch 4
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, fail={11: KeyboardInterrupt()})
    cfg.resume = True
    model, method, res = _run(cfg)
    for p, q in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(p, q)
    assert method.after == full_method.after == 18
    saved = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert saved["status"] == "finished" and [e["epoch"] for e in saved["epochs"]] == [1, 2, 3]


def _kill_self(sig):
    return lambda: os.kill(os.getpid(), sig)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("call,where", [(11, (1, 5)), (12, (2, 0))])
def test_signal_stops_at_the_batch_boundary_and_the_resumed_run_loses_nothing(tmp_path, sig, code, call, where):
    """Ctrl-C or SIGTERM during a batch: the batch finishes, the checkpoint is written right after it (mid-epoch, or
    at the epoch end for the epoch's last batch), the run stops, and --resume reaches the uninterrupted parameters."""
    full_model, full_method, _ = _run(_cfg(tmp_path, "full"))
    cfg = _cfg(tmp_path, "cut")  # no periodic checkpoints: only the signal's
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as info:
        _run(cfg, fail={call: _kill_self(sig)})
    assert info.value.exit_code == code and "continue with --resume" in str(info.value)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (*where, call)  # nothing after the last finished batch lost
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(sig) is before  # the handlers are put back
    cfg.resume = True
    model, method, _ = _run(cfg)
    for p, q in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(p, q)
    assert method.after == full_method.after == 18


def test_a_run_killed_outright_resumes_from_its_last_timed_checkpoint(tmp_path):
    """A run killed without a chance to save (SIGKILL) loses only what came after its last timed checkpoint; with a
    tiny checkpoint_minutes that is every batch."""
    full_model, _, _ = _run(_cfg(tmp_path, "full"))
    cfg = _cfg(tmp_path, "cut", checkpoint_minutes=1e-9)
    with pytest.raises(KeyboardInterrupt):  # raised inside batch 11: the state after batch 10 is the last saved
        _run(cfg, fail={11: KeyboardInterrupt()})
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 4, 10)
    cfg.resume = True
    model, _, _ = _run(cfg)
    for p, q in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(p, q)


def test_a_signal_in_the_last_batch_lets_the_run_finish_and_still_stops_the_caller(tmp_path):
    """A signal during the last batch (or the final evaluation) is not dropped: the run finishes, writes its results,
    and raises Interrupted so that a script looping over runs stops."""
    full_model, _, _ = _run(_cfg(tmp_path, "full"))
    with pytest.raises(Interrupted, match="during the last epoch: the run finished"):
        _run(_cfg(tmp_path, "cut"), fail={18: _kill_self(signal.SIGINT)})
    saved = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert saved["status"] == "finished" and len(saved["epochs"]) == 3
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for p, q in zip(ckpt["model"].values(), full_model.state_dict().values()):
        assert torch.equal(p, q)


def test_deferred_interrupts_deliver_a_pending_signal_at_the_end_and_leave_ignored_ones_ignored():
    with pytest.raises(KeyboardInterrupt):
        with DeferredInterrupts() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested  # deferred inside ...
        time.sleep(1)  # (... delivered on leaving the block)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with DeferredInterrupts() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert not stop.requested  # an ignored signal stays ignored
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert Interrupted("x", None).exit_code == 143  # the signal reached another rank (torchrun sends SIGTERM)


def test_a_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with DeferredInterrupts() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "Ctrl-C (SIGINT)"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs at the next bytecode)
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_refuses_changed_settings_and_overwrite(tmp_path):
    _run(_cfg(tmp_path, "r", epochs=1))
    with pytest.raises(ValueError, match="--resume"):
        _run(_cfg(tmp_path, "r", epochs=1))
    with pytest.raises(ValueError, match="lr was None, now 0.5"):
        _run(_cfg(tmp_path, "r", epochs=1, lr=0.5, resume=True))


@pytest.mark.parametrize("failure", ["diverge", "nan"])
def test_divergent_batch_is_skipped_and_leaves_parameters_alone(tmp_path, failure):
    stats = SolverStats(iterations=800, residual=3.5e2, converged=False, diverged=True)
    what = DivergenceError("controller turned NaN/inf", stats) if failure == "diverge" else "nan"
    cfg = _cfg(tmp_path, failure, epochs=1, max_batches=4)
    torch.manual_seed(cfg.seed)
    model = TinyNet()
    method = BackpropMethod(model, {3: what})
    snapshots = []
    original = method.backward

    def spy(x, y):  # record the parameters before each call
        snapshots.append([p.detach().clone() for p in model.parameters()])
        return original(x, y)

    method.backward = spy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(cfg, model=model, method=method, data=_blobs(), log=lambda s: None)
    # batch 3 failed: the parameters before batch 4 are those before batch 3
    for a, b in zip(snapshots[2], snapshots[3]):
        assert torch.equal(a, b)
    for a, b in zip(snapshots[1], snapshots[2]):
        assert not torch.equal(a, b)
    msgs = [str(w.message) for w in caught if issubclass(w.category, SkippedBatchWarning)]
    assert len(msgs) == 1 and ("residual 3.500e+02" in msgs[0] if failure == "diverge" else "non-finite" in msgs[0])
    saved = json.loads((tmp_path / failure / "result.json").read_text())
    assert saved["skipped_batches"] == 1 and saved["epochs"][0]["batches"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- short MNIST runs of the real methods
# 200 batches of 64 (1/5 of an epoch) at Adam 3e-3 -> 3e-4 (the published 1e-3 needs more batches to pass 90%),
# evaluated on the full 10k test set.  To fit the CPU budget the controllers stop at a relative change of
# 1e-4 instead of 1e-6, LCP-LF learns Q for 50 noisy steps per batch instead of max_iter, and LCP-EBD takes
# 60 Adam steps of 0.01 on the states from the free equilibrium instead of 800 from zero (gradient cosine
# 0.995 to LCP-DI on a fresh net); every solve must still converge.
SHORT_RUN = dict(epochs=1, max_batches=200, lr=3e-3, device="cpu", progress=False, seed=0)
FF_SETTINGS = {
    "bp": {}, "rbp": {},
    "lcp-di": dict(tol=1e-4), "lcp-di-kp": dict(tol=1e-4),
    "lcp-lf": dict(tol=1e-4, method_kwargs=dict(noise_steps=50)),
    "lcp-ebd": dict(method_kwargs=dict(ebd_steps=60, ebd_lr=0.01, ebd_init="free")),
}
# the rnn at the published Adam 1e-3 and solver settings, 400 batches.  Many rnn LCP-DI solves end at 800
# iterations with a relative change near 1e-2 (so do the official ones, which use that state regardless);
# max_residual=1e9 accepts such states, as the official code does, instead of skipping the batch.
RNN_SETTINGS = {"rbp": dict(lr=1e-3, max_batches=400),
                "lcp-di": dict(lr=1e-3, max_batches=400, method_kwargs=dict(max_residual=1e9))}


@pytest.fixture(scope="module")
def mnist():
    if not (DATA / "mnist").is_dir():
        pytest.skip(f"offline MNIST not found in {DATA}")
    from lcp_meta.data.mnist import load_mnist
    return (*load_mnist(str(DATA), "train"), *load_mnist(str(DATA), "test"))


def _short_run(tmp_path, mnist, model, method, settings, min_converged=1.0):
    pytest.importorskip("lcp_meta.models.supervised")
    cfg = RunConfig(dataset="mnist", model=model, method=method, out=str(tmp_path / method),
                    **{**SHORT_RUN, **settings})
    res = train(cfg, data=mnist, log=lambda s: None)
    e = res["epochs"][0]
    assert res["skipped_batches"] == 0 and e["batches"] == cfg.max_batches
    assert e["converged_fraction"] >= min_converged, \
        f"{method}: {100 * (1 - e['converged_fraction']):.2f}% of solves hit max_iter (max residual {e['max_residual']:.2e})"
    assert e["max_residual"] < 1.0, f"{model}/{method}: a solve ended far from equilibrium ({e['max_residual']:.2e})"
    assert e["test_accuracy"] > 0.90, f"{model}/{method}: test accuracy {e['test_accuracy']:.4f}"
    return res


@pytest.mark.parametrize("method", list(FF_SETTINGS))
def test_short_mnist_run_of_each_method_on_ff_beats_90_percent(tmp_path, mnist, method):
    _short_run(tmp_path, mnist, "ff", method, FF_SETTINGS[method])


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RNN_SETTINGS))
def test_short_mnist_run_on_rnn_beats_90_percent(tmp_path, mnist, method):
    # RBP's published cap of 200 iterations leaves a rare solve just above its 1e-4 tolerance (measured: 1 of
    # 400 at 2e-4); the rnn LCP-DI solves often end at max_iter (see RNN_SETTINGS)
    res = _short_run(tmp_path, mnist, "rnn", method, RNN_SETTINGS[method], min_converged=0.99 if method == "rbp" else 0.0)
    assert res["epochs"][0]["mean_iterations"] > 10  # a genuinely recurrent equilibrium, not one pass


# Spec section 3 (lines 79-84), written out here as the reference: (optimizer, lr, lr_final, weight decay, clip, epochs)
SPEC_TRAINER = {"ff": ("adam", 1e-3, 1e-4, 0.0, None, 30), "rnn": ("adam", 1e-3, 1e-4, 0.0, 10.0, 30),
                "conv-ff": ("sgd", 0.1, 0.01, 1e-3, None, 30), "conv-rnn": ("sgd", 0.05, 0.005, 0.0, 10.0, 75)}


def test_published_trainer_settings_are_the_spec_s():
    """One table states the published optimizer settings; the trainer and default_hparams both read it, and it
    says what spec section 3 says (batch 64, no momentum; RBP on the conv-rnn: lr 0.03)."""
    from lcp_meta.supervised.config import SUPPORTED, TRAINER_KEYS, default_hparams
    from lcp_meta.supervised.trainer import trainer_defaults
    keys = ("optimizer", "lr", "lr_final", "weight_decay", "grad_clip", "epochs")
    for model, methods in SUPPORTED.items():
        dataset = "mnist" if model in ("ff", "rnn") else "cifar10"
        for method in methods:
            want = dict(zip(keys, SPEC_TRAINER[model]), batch_size=64, momentum=0.0)
            if (model, method) == ("conv-rnn", "rbp"):
                want.update(lr=0.03, lr_final=0.003)
            assert trainer_defaults(dataset, model, method) == want, (model, method)
            assert {k: v for k, v in default_hparams(model, method).items() if k in TRAINER_KEYS} == want
    # a model on the other data set keeps its own settings
    assert trainer_defaults("cifar10", "ff", "bp") == trainer_defaults("mnist", "ff", "bp")


@pytest.mark.parametrize("method_name", ["bp", "lcp-di"])
def test_distributed_wrapper_accumulates_like_the_method(method_name):
    """DistributedSupervised.backward adds to .grad as the method's own backward does (one process here: the
    shard is the batch); what was in .grad before is added once, and a second call doubles the gradient."""
    from lcp_meta.distributed import DistributedSupervised
    from lcp_meta.models.supervised import build_model
    from lcp_meta.supervised import default_hparams, make_method
    x, y, _, _ = _blobs(n=12)

    def fresh():
        torch.manual_seed(0)
        model = build_model("ff", in_shape=(6,), num_classes=3, hidden=(5,)).double()
        return make_method(method_name, model, **{**default_hparams("ff", method_name), "tol": 1e-10})

    plain, wrapped = fresh(), DistributedSupervised(fresh(), broadcast=False)
    for method in (plain, wrapped):
        for p in method.parameters():
            p.grad = torch.full_like(p, 0.5)
        method.backward(x.double(), y)
        method.backward(x.double(), y)
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    ref = fresh()
    ref.backward(x.double(), y)
    for p, r in zip(wrapped.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, 0.5 + 2 * r.grad, rtol=1e-10, atol=1e-12)

    # two ranks that both hold the whole batch (the all-reduce sums two equal shards): the gradient counts twice,
    # what was in .grad before the call only once
    import lcp_meta.distributed as D
    mp = pytest.MonkeyPatch()
    mp.setattr(D, "all_reduce_sum", lambda t: t.mul_(2))
    mp.setattr(D, "_gather", lambda info: [info, info])
    try:
        twice = DistributedSupervised(fresh(), broadcast=False)
        for p in twice.parameters():
            p.grad = torch.full_like(p, 0.5)
        twice.backward(x.double(), y)
    finally:
        mp.undo()
    for p, r in zip(twice.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, 0.5 + 2 * r.grad, rtol=1e-10, atol=1e-12)
