"""``lcp-meta supervised`` end to end: files produced, resume equivalence with a real method, bad input."""
import json

import pytest
import torch

from lcp_meta.cli import main

from conftest import SHARED_DATA as DATA, one_error_line


needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"offline MNIST not found in {DATA}")

# a tiny ff so that runs take a second: 2 x 16 hidden units, 3 batches per epoch, 300 test images
TINY = ["--dataset", "mnist", "--model", "ff", "--model-set", "hidden=(16, 16)", "--max-batches", "3",
        "--test-subset", "300", "--device", "cpu", "--no-progress", "--data-root", str(DATA)]


@needs_mnist
def test_cli_run_writes_checkpoint_and_result(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["supervised", *TINY, "--method", "lcp-di", "--epochs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "test accuracy" in printed and "done:" in printed
    res = json.loads((out / "result.json").read_text())
    # LCP's training loss is that of the controlled output, and the log says so
    assert res["train_loss_at"] == "controlled output" and "train loss (controlled output)" in printed
    assert res["status"] == "finished" and [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert res["config"]["method"] == "lcp-di" and res["trainer"]["optimizer"] == "adam"
    assert res["method_kwargs"]["alpha"] == 0.1 and res["method_kwargs"]["max_iter"] == 800
    for e in res["epochs"]:
        assert 0.0 <= e["test_accuracy"] <= 1.0 and e["batches"] == 3 and e["mean_iterations"] > 2
        assert e["converged_fraction"] == 1.0 and e["train_seconds"] > 0
    assert res["skipped_batches"] == 0 and res["torch_version"] == torch.__version__ and res["device"] == "cpu"
    assert res["date_started"] <= res["date_finished"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and set(ckpt) >= {"model", "method", "optimizer", "scheduler", "rng"}
    # the printed final accuracy is the stored one
    assert f"{100 * res['final_test_accuracy']:.2f}%" in printed.splitlines()[-1]


@needs_mnist
def test_cli_resume_after_interrupt_matches_uninterrupted_run(tmp_path, monkeypatch):
    """LCP-LF draws noise while it learns its feedback: resuming restores RNG, optimizer, schedule, position."""
    args = [*TINY, "--method", "lcp-lf", "--epochs", "2", "--checkpoint-every", "2", "--set", "max_iter=200",
            "--set", "noise_steps=30"]
    assert main(["supervised", *args, "--out", str(tmp_path / "full")]) == 0
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)

    from lcp_meta.supervised import LinearFeedback
    original, calls = LinearFeedback.backward, {"n": 0}

    def interrupted(self, x, y):  # Ctrl-C during the 3rd (last) batch of epoch 2
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(LinearFeedback, "backward", interrupted)
    assert main(["supervised", *args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(LinearFeedback, "backward", original)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert (cut["epoch"], cut["batch"]) == (1, 2)  # the mid-epoch checkpoint after batch 2 of epoch 2
    assert main(["supervised", *args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert resumed["model"].keys() == full["model"].keys()
    for k in full["model"]:
        assert torch.equal(resumed["model"][k], full["model"][k]), k
    for a, b in zip(torch.utils._pytree.tree_leaves(resumed["method"]), torch.utils._pytree.tree_leaves(full["method"])):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    res_full = json.loads((tmp_path / "full" / "result.json").read_text())
    res_cut = json.loads((tmp_path / "cut" / "result.json").read_text())
    for key in ("test_accuracy", "train_loss", "mean_iterations", "batches"):
        assert [e[key] for e in res_cut["epochs"]] == [e[key] for e in res_full["epochs"]], key


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "svhn"], "unknown dataset 'svhn'; expected one of mnist, cifar10"),
    (["--model", "mlp"], "unknown model 'mlp'; expected one of ff, rnn, conv-ff, conv-rnn"),
    (["--method", "hebb"], "unknown method 'hebb'; expected one of"),
    (["--model", "rnn", "--method", "bp"], "method 'bp' is not available for model 'rnn'"),
    (["--method", "lcp-di", "--set", "gain=2"], "unknown setting"),
    (["--method", "bp", "--set", "2x=1"], "--set expects KEY=VALUE"),
    (["--method", "bp", "--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["--dataset", "cifar10", "--model", "conv-ff", "--method", "bp", "--data-root", "EMPTY"],
     "missing data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5"),
    (["--method", "bp", "--data-root", "EMPTY"], "missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"),
])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, extra, message):
    extra = [str(tmp_path) if a == "EMPTY" else a for a in extra]
    data = [] if "--data-root" in extra else ["--data-root", str(DATA)]
    rc = main(["supervised", "--device", "cpu", "--no-progress", "--max-batches", "1", "--out", str(tmp_path / "r"),
               *data, *extra])
    assert rc == 2
    one_error_line(capsys, message, command="lcp-meta supervised: error:")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@needs_mnist
def test_existing_run_needs_resume(tmp_path, capsys):
    args = ["supervised", *TINY, "--method", "bp", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert main(args) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(args + ["--resume", "--lr", "0.1"]) == 2
    assert "lr was None, now 0.1" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # finished: nothing left to train, the result is reported again
    assert "done: test accuracy" in capsys.readouterr().out


@needs_mnist
def test_ctrl_c_saves_the_batch_in_flight_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import os
    import signal
    import lcp_meta.supervised.trainer as trainer
    plain = trainer._try_batch

    def first_batch_interrupted(method, params, x, y):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the batch runs
        return plain(method, params, x, y)

    monkeypatch.setattr(trainer, "_try_batch", first_batch_interrupted)
    out = tmp_path / "run"
    assert main(["supervised", *TINY, "--method", "bp", "--epochs", "2", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted by Ctrl-C (SIGINT): stopped in epoch 1 after batch 1 of 3" in err and "--resume" in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1
