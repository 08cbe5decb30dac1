"""What a careless or hostile user can do (issue 7): each test here failed before its fix.

Rows of the issue: 1 crafted checkpoints, 2 a second run over a first one, 3 diverged meta-steps and ``--set``
values, 4 task batches that broadcast, 5 tracebacks instead of messages, 6 silently accepted settings,
8 torn temporary files and file modes.  Every user-facing error is one line, exit code 2, nothing changed.
"""
import gzip
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lcp_meta import TaskBatch, make_method
from lcp_meta.cli import main
from lcp_meta.fewshot import report
from lcp_meta.models import MetaMLP
from lcp_meta.utils import (CheckpointError, DataFormatError, atomic_save, atomic_write_text,
                            load_checkpoint)

from conftest import drawing_png, one_error_line, write_omniglot_zip

TINY = ["--task", "sinusoid", "--shots", "3", "--meta-batch", "2", "--inner-steps", "2", "--test-episodes", "2",
        "--val-episodes", "2", "--val-every", "1000", "--device", "cpu", "--no-progress", "--no-plots"]


def fewshot(out, *extra):
    return main(["fewshot", *TINY, "--meta-steps", "2", "--out", str(out), *extra])


class _FirstOrderStub(torch.nn.Module):
    """A method without inner loop (meta-gradient: the query-loss gradient at omega).

    The run-folder, checkpoint and exit-code logic of the runner is under test here, not the meta-gradients, so
    these runs must not depend on how well a real method converges in two inner steps.  ``inner_lr >= 1e6``
    makes every meta-step diverge, as an exploding inner loop does.
    """

    def __init__(self, model, loss_fn, **kwargs):
        super().__init__()
        self.model, self.loss_fn, self.diverge = model, loss_fn, kwargs.get("inner_lr", 0.0) >= 1e6

    def meta_backward(self, tasks):
        from lcp_meta.core.solvers import DivergenceError
        if self.diverge:
            raise DivergenceError("stub: inner dynamics turned NaN/inf")
        xs, ys, xq, yq = tasks
        loss = self.loss_fn(self.model(xq.flatten(0, 1)), yq.flatten(0, 1))
        loss.backward()
        return {"query_loss_after": float(loss)}

    def predict(self, tasks):
        from lcp_meta.core.solvers import DivergenceError
        if self.diverge:
            raise DivergenceError("stub: inner adaptation turned NaN/inf")
        xq = tasks[2]
        return self.model(xq.flatten(0, 1)).view(*xq.shape[:2], -1)


@pytest.fixture(autouse=True)
def stub_methods(monkeypatch):
    from lcp_meta.fewshot import runner
    monkeypatch.setattr(runner, "default_method_factory", lambda name, model, loss_fn, **kw:
                        _FirstOrderStub(model, loss_fn, **kw))


def snapshot(folder: Path):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


class _Payload:
    """Pickles to a call of ``Path.touch``: loading it with weights_only=False creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ------------------------------------------------------------------------------ 1: crafted checkpoints
def test_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load checkpoint .*evil.pt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and not marker.exists()


def test_crafted_checkpoint_on_resume_fewshot_and_supervised(tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    assert fewshot(out, "--methods", "fomaml") == 0
    torch.save({"method": "fomaml", "payload": _Payload(marker)}, out / "checkpoints" / "fomaml.pt")
    assert fewshot(out, "--methods", "fomaml", "--resume") == 2
    one_error_line(capsys, "refused to load checkpoint", str(out / "checkpoints" / "fomaml.pt"))
    assert not marker.exists()

    sup = tmp_path / "sup"
    sup.mkdir()
    torch.save({"model": _Payload(marker)}, sup / "checkpoint.pt")
    assert main(["supervised", "--method", "bp", "--device", "cpu", "--no-progress", "--out", str(sup),
                 "--resume"]) == 2
    one_error_line(capsys, "refused to load checkpoint", str(sup / "checkpoint.pt"))
    assert not marker.exists()


def test_checkpoint_of_plain_types_and_rng_states_loads(tmp_path):
    from lcp_meta.utils import rng_state, set_rng_state
    import numpy as np
    np.random.seed(3)
    path = atomic_save({"rng": rng_state(), "curve": [{"step": 1, "loss": 0.5, "note": None}],
                        "opt": torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]).state_dict()}, tmp_path / "c.pt")
    expected = np.random.rand()
    ck = load_checkpoint(path)
    set_rng_state(ck["rng"])
    assert np.random.rand() == expected and ck["curve"][0]["note"] is None


# -------------------------------------------------------------------------- 2: a run over another run
def test_second_run_into_the_same_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert fewshot(out, "--methods", "lcp,maml") == 0
    capsys.readouterr()
    before = snapshot(out)
    assert fewshot(out, "--methods", "lcp", "--lam", "2.0") == 2
    one_error_line(capsys, f"--out {out} already holds a run", "--resume", "--overwrite")
    assert snapshot(out) == before

    # --overwrite replaces the whole earlier run: no maml.json of the first run is left beside the new config
    assert fewshot(out, "--methods", "lcp", "--lam", "2.0", "--overwrite") == 0
    assert not (out / "maml.json").exists() and not (out / "checkpoints" / "maml.pt").exists()
    assert json.loads((out / "config.json").read_text())["methods"] == ["lcp"]
    assert fewshot(out, "--methods", "lcp", "--resume", "--overwrite") == 2


def test_supervised_overwrite_replaces_the_run(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "result.json").write_text("{}")  # a run that got as far as its result
    args = ["supervised", "--method", "bp", "--device", "cpu", "--no-progress", "--out", str(out),
            "--data-root", str(tmp_path / "nodata")]
    assert main(args) == 2
    one_error_line(capsys, "already holds a run (result.json)", "--overwrite")
    assert (out / "result.json").read_text() == "{}"


# ----------------------------------------------------------- 3: diverged meta-steps, strict --set values
@pytest.mark.parametrize("value", ["nan", "inf", "1e999", "-inf"])
def test_set_values_are_validated_like_flags(tmp_path, capsys, value):
    assert fewshot(tmp_path / "x", "--methods", "lcp", "--set", f"lcp.beta={value}") == 2
    one_error_line(capsys, "--set lcp.beta", value)
    assert not (tmp_path / "x").exists()


def test_set_value_checked_as_its_flag(tmp_path, capsys):
    assert fewshot(tmp_path / "x", "--methods", "lcp", "--set", "lcp.beta=-1") == 2
    one_error_line(capsys, "--set lcp.beta must be a positive finite number, got -1")
    assert fewshot(tmp_path / "x", "--methods", "lcp", "--set", "lcp.inner_steps=0.5") == 2
    one_error_line(capsys, "--set lcp.inner_steps must be a positive integer")


def test_supervised_set_and_tol_refuse_nan(tmp_path, capsys):
    base = ["supervised", "--method", "lcp-di", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(base + ["--set", "alpha=nan"]) == 2
    one_error_line(capsys, "--set alpha", "nan")
    assert main(base + ["--tol", "nan"]) == 2
    one_error_line(capsys, "tol must be a positive finite number")
    assert not (tmp_path / "r").exists()


def test_run_whose_meta_steps_all_diverge_fails_with_code_4(tmp_path, capsys):
    out = tmp_path / "div"
    # an inner step of 1e8 on the sinusoid MSE overflows: every meta-step diverges and is skipped
    with pytest.warns(UserWarning):
        rc = main(["fewshot", *TINY, "--meta-steps", "3", "--methods", "fomaml,reptile", "--out", str(out),
                   "--set", "fomaml.inner_lr=1e8"])
    assert rc == 4
    captured = capsys.readouterr()
    assert "fomaml skipped 3 of 3 meta-steps (more than the allowed share 0.1)" in captured.err
    assert "reptile skipped" not in captured.err
    rows = {r["method"]: r for r in report.parse_results_table((out / "results.md").read_text())}
    assert rows["fomaml"]["skipped meta-steps"] == "3/3" and rows["reptile"]["skipped meta-steps"] == "0/3"
    assert "skipped meta-steps" in captured.out  # the printed table too
    assert json.loads((out / "fomaml.json").read_text())["skipped_meta_steps"] == 3
    # a stated share: allowing every step to be skipped turns the failure off
    assert main(["fewshot", *TINY, "--meta-steps", "3", "--methods", "fomaml", "--out", str(tmp_path / "ok"),
                 "--set", "fomaml.inner_lr=1e8", "--max-skipped", "1"]) == 0


def test_a_method_that_cannot_adapt_still_gets_its_row_and_plots(tmp_path):
    """Test episodes score NaN and the fits plot leaves the method out, instead of a traceback after training."""
    out = tmp_path / "plots"
    argv = [a for a in TINY if a != "--no-plots"]
    with pytest.warns(UserWarning):
        rc = main(["fewshot", *argv, "--meta-steps", "2", "--methods", "fomaml,reptile", "--out", str(out),
                   "--set", "fomaml.inner_lr=1e8", "--max-skipped", "1"])
    assert rc == 0 and (out / "fits.png").is_file()
    assert json.loads((out / "fomaml.json").read_text())["test_mean"] != json.loads(
        (out / "fomaml.json").read_text())["test_mean"]  # NaN: every test batch diverged


def test_results_table_always_has_the_skipped_column():
    r = {"method": "lcp", "metric": "mse", "test_mean": 1.0, "test_ci95": 0.1, "sec_per_step": 0.1,
         "peak_memory_mib": 0.0, "meta_steps": 5, "divergences": [{"step": 1}, {"step": 3}]}
    row = report.parse_results_table(report.results_table([r], "x"))[0]
    assert row["skipped meta-steps"] == "2/5"


# ------------------------------------------------------------------------- 4: task batches that broadcast
def _lcp():
    torch.manual_seed(0)
    model = MetaMLP(1, (8,), 1).double()
    return make_method("lcp", model, F.mse_loss, lam=1.0, beta=0.1, inner_lr=0.1, inner_steps=3)


@pytest.mark.parametrize("y_shape", [(2, 5), (2, 5, 2)])
def test_targets_that_broadcast_against_predictions_are_refused(y_shape):
    method = _lcp()
    x = torch.randn(2, 5, 1, dtype=torch.float64)
    y = torch.randn(*y_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"do not match the model's predictions of shape \(5, 1\)"):
        method.meta_backward(TaskBatch(x, y, x, y))
    assert all(p.grad is None for p in method.parameters())  # nothing written into .grad


def test_matching_targets_pass_the_shape_check():
    from lcp_meta.meta.base import check_prediction_target, checked_loss
    pred = torch.zeros(5, 3)
    check_prediction_target(pred, torch.zeros(5, 3))                   # regression: the same shape
    check_prediction_target(pred, torch.zeros(5, dtype=torch.long))    # class labels: without the class dim
    with pytest.raises(ValueError, match="class labels"):
        check_prediction_target(pred, torch.zeros(5, 1, dtype=torch.long))
    assert checked_loss(F.mse_loss)(pred, torch.ones(5, 3)) == 1.0


@pytest.mark.parametrize("shapes, message", [
    (((2, 0, 1), (2, 0, 1), (2, 5, 1), (2, 5, 1)), "empty support set"),
    (((2, 5, 1), (2, 5, 1), (2, 0, 1), (2, 0, 1)), "empty query set"),
    (((0, 5, 1), (0, 5, 1), (0, 5, 1), (0, 5, 1)), "empty support set"),
])
def test_empty_sets_and_no_tasks_are_refused(shapes, message):
    with pytest.raises(ValueError, match=message):
        TaskBatch(*(torch.zeros(s) for s in shapes))


# ----------------------------------------------------------------- 5: messages instead of tracebacks
def _corrupt_gzip(path: Path, payload: bytes):
    blob = bytearray(gzip.compress(payload))
    blob[12:20] = b"\xff" * 8  # inside the deflate stream: zlib.error, not OSError
    path.write_bytes(bytes(blob))


def test_corrupt_gz_is_a_one_line_error(tmp_path, capsys):
    from lcp_meta.data.mnist import MNIST_FILES, read_idx
    bad = tmp_path / "mnist" / "x.gz"
    bad.parent.mkdir()
    _corrupt_gzip(bad, b"\x00\x00\x08\x03" + bytes(range(200)) * 50)
    with pytest.raises(DataFormatError, match="x.gz"):
        read_idx(bad, 0x803)
    for name in MNIST_FILES["train"] + MNIST_FILES["test"]:
        _corrupt_gzip(tmp_path / "mnist" / name, bytes(range(256)) * 40)
    assert main(["supervised", "--method", "bp", "--device", "cpu", "--no-progress", "--data-root",
                 str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "train-images-idx3-ubyte.gz")


def _omniglot_zip(path: Path, member_bytes=None):
    """Two characters of two grey 4x4 drawings; ``member_bytes`` replaces the last one (1001_02.png)."""
    write_omniglot_zip(path, alphabets=[("Alpha", 2)], drawings=2, image=lambda c, d: drawing_png(size=4, value=40 * c + d),
                       replace=None if member_bytes is None else {(1, 1): member_bytes})


def test_zip_member_with_bad_crc_is_a_one_line_error(tmp_path):
    from lcp_meta.data.omniglot import load_characters
    path = tmp_path / "images_background.zip"
    _omniglot_zip(path)
    raw = bytearray(path.read_bytes())
    # flip one byte of the last member's stored data: its CRC no longer matches (BadZipFile at read time)
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[-1]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match=r"member .*/1001_02.png cannot be read") as err:
        load_characters([path], image_size=4, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_non_png_member_is_a_one_line_error(tmp_path):
    from lcp_meta.data.omniglot import load_characters
    path = tmp_path / "images_background.zip"
    _omniglot_zip(path, member_bytes=b"this is not a png")
    with pytest.raises(DataFormatError, match=r"1001_02.png is not a readable PNG image"):
        load_characters([path], image_size=4, cache_dir=tmp_path / "cache")


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert fewshot(target, "--methods", "fomaml") == 2
    one_error_line(capsys, f"--out {target} is an existing file")
    assert main(["supervised", "--method", "bp", "--device", "cpu", "--no-progress", "--out", str(target)]) == 2
    one_error_line(capsys, f"--out {target} is an existing file")
    assert target.read_text() == "keep me"
    unwritable = Path("/sys/lcp_meta_test_out")  # refused even to root (the tests may run as root)
    try:
        unwritable.mkdir()
    except OSError:
        pass
    else:
        unwritable.rmdir()
        pytest.skip("/sys is writable here")
    assert fewshot(unwritable, "--methods", "fomaml") == 2
    one_error_line(capsys, f"cannot write to --out {unwritable}")
    # the supervised trainer finds out before reading data or training (no data root is even given)
    assert main(["supervised", "--method", "bp", "--device", "cpu", "--no-progress", "--out", str(unwritable),
                 "--data-root", str(tmp_path / "nodata")]) == 2
    one_error_line(capsys, f"cannot write to --out {unwritable}")


def test_truncated_checkpoint_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert fewshot(out, "--methods", "fomaml", "--stop-after", "1") == 3
    ck = out / "checkpoints" / "fomaml.pt"
    ck.write_bytes(ck.read_bytes()[:300])
    capsys.readouterr()
    assert fewshot(out, "--methods", "fomaml", "--resume") == 2
    one_error_line(capsys, f"cannot read checkpoint {ck}", "delete it")


@pytest.mark.parametrize("error", [ValueError, TypeError])
def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch, error):
    """Only the library's user-input errors become one-line messages; a ValueError or TypeError from a bug
    propagates (also from a --set run, where the runner turns only the method's refusal of the options into a
    user error)."""
    from lcp_meta.fewshot import runner

    def broken(self, batch):
        raise error("a bug, not bad input")
    monkeypatch.setattr(runner._MethodRun, "meta_step", broken)
    with pytest.raises(error, match="a bug"):
        fewshot(tmp_path / "x", "--methods", "fomaml")
    with pytest.raises(error, match="a bug"):
        fewshot(tmp_path / "y", "--methods", "fomaml", "--set", "fomaml.inner_lr=0.5")


# --------------------------------------------------------------------- 6: settings accepted silently
@pytest.mark.parametrize("argv, message", [
    (["--hidden", "0"], "hidden must be a positive integer, got 0"),
    (["--stop-after", "-1"], "stop_after must be a positive integer, got -1"),
    (["--checkpoint-every", "-2"], "checkpoint_every must be a non-negative integer"),
    (["--log-every", "-1"], "log_every must be a non-negative integer"),
    (["--val-every", "-5"], "val_every must be a non-negative integer"),
    (["--test-episodes", "0"], "test_episodes must be a positive integer, got 0"),
    (["--max-skipped", "1.5"], "max_skipped must be a share between 0 and 1"),
])
def test_silently_accepted_settings_are_refused(tmp_path, capsys, argv, message):
    assert fewshot(tmp_path / "x", "--methods", "fomaml", *argv) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "x").exists()


def test_one_way_omniglot_is_refused(tmp_path, capsys):
    assert main(["fewshot", "--task", "omniglot", "--ways", "1", "--methods", "maml", "--device", "cpu",
                 "--out", str(tmp_path / "x"), "--data-root", str(tmp_path)]) == 2
    one_error_line(capsys, "ways must be at least 2")


def test_hidden_width_is_the_one_trained(tmp_path):
    out = tmp_path / "h"
    assert fewshot(out, "--methods", "fomaml", "--hidden", "7") == 0
    ck = torch.load(out / "checkpoints" / "fomaml.pt", weights_only=True)
    assert ck["params"][0].shape[0] == 7


# --------------------------------------------------------------------------- 8: torn temporary files
def test_stale_tmp_files_are_removed_on_the_next_save_and_resume(tmp_path):
    out = tmp_path / "run"
    assert fewshot(out, "--methods", "fomaml", "--stop-after", "1") == 3
    ckdir = out / "checkpoints"
    dead = 2 ** 22 + 5  # above any pid_max: no such process
    torn = [ckdir / f"fomaml.pt.{dead}-0a1b2c3d.tmp", ckdir / "fomaml.pt.k2j4_9xq.tmp",  # the old mkstemp names
            out / f"fomaml.json.{dead}-00000000.tmp"]
    for p in torn:
        p.write_bytes(b"half a checkpoint")
    live = ckdir / f"fomaml.pt.{os.getpid()}-ffffffff.tmp"  # a writer that is still running is left alone
    live.write_bytes(b"")
    load_checkpoint(ckdir / "fomaml.pt")
    assert not torn[0].exists() and not torn[1].exists() and live.exists()
    live.unlink()
    assert fewshot(out, "--methods", "fomaml", "--resume") == 0
    assert sorted(p.name for p in out.rglob("*.tmp")) == []


def test_result_files_have_one_mode(tmp_path):
    out = tmp_path / "run"
    assert fewshot(out, "--methods", "fomaml") == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "fomaml.json", "fomaml_curve.csv", "results.md", "results.json", "fomaml.pt"} <= set(modes)
    assert len(set(modes.values())) == 1, modes  # JSON and checkpoints like CSV and MD
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}
    assert stat.S_IMODE(atomic_write_text("x", tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_the_first_hessian_product_raises_no_torch_internal_future_warning():
    """The first forward-over-reverse product made torch script its jvp decompositions, which warned
    'torch.jit.script is deprecated' in every run's output (a torch internal). In a fresh interpreter with
    FutureWarning as an error, grad_and_hvp must run, and equal the dense Hessian product (float64)."""
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from lcp_meta.meta.functional import grad_and_hvp\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(5, 3, generator=g, dtype=torch.float64)\n"
        "y = torch.randn(5, generator=g, dtype=torch.float64); w = torch.randn(3, generator=g, dtype=torch.float64)\n"
        "v = torch.randn(3, generator=g, dtype=torch.float64)\n"
        "loss = lambda p, x, y: ((torch.tanh(x @ p['w']) - y) ** 2).mean()\n"
        "gr, hv = grad_and_hvp(loss, {'w': w}, {'w': v}, x, y)\n"
        "H = torch.autograd.functional.hessian(lambda w_: loss({'w': w_}, x, y), w)\n"
        "assert torch.allclose(hv['w'], H @ v, rtol=1e-10, atol=1e-12), (hv, H @ v)\n"
    )
    res = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
