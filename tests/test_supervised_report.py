"""Plots and verdicts of supervised runs: the figures draw the run's own numbers, the reproduction's mean is taken
over the seeds that reached each epoch, the verdict follows its stated rule, a run writes curves.png after every
epoch and goes on without matplotlib."""
import json

import numpy as np
import pytest

from lcp_meta.cli import main
from lcp_meta.supervised.report import reproduction_figure, run_figure, verdict

from conftest import SHARED_DATA as DATA

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"offline MNIST not found in {DATA}")
TINY = ["supervised", "--dataset", "mnist", "--model", "ff", "--model-set", "hidden=(16, 16)", "--max-batches", "3",
        "--test-subset", "300", "--device", "cpu", "--no-progress", "--data-root", str(DATA), "--method", "bp"]


def _epoch(i, acc, loss, share, skipped=0):
    return {"epoch": i, "test_accuracy": acc, "train_loss": loss, "batches": 10 - skipped, "skipped_batches": skipped,
            "residuals": {"share_above_tol": share}}


def test_run_figure_draws_the_result():
    result = {"config": {"dataset": "mnist", "model": "rnn", "method": "lcp-di", "seed": 3},
              "epochs": [_epoch(1, 0.9, 0.5, 0.25), _epoch(2, 0.95, 0.2, 0.0, skipped=2), _epoch(3, 0.97, 0.1, 0.1)]}
    fig = run_figure(result)
    acc, loss, res = fig.axes
    np.testing.assert_allclose(acc.lines[0].get_ydata(), [90, 95, 97])
    np.testing.assert_allclose(loss.lines[0].get_ydata(), [0.5, 0.2, 0.1])
    assert loss.get_yscale() == "log"
    np.testing.assert_allclose(res.lines[0].get_ydata(), [25, 0, 10])  # share of solves above tol (%)
    np.testing.assert_allclose(res.lines[1].get_ydata(), [0, 20, 0])  # skipped share of the epoch's batches (%)
    assert "rnn lcp-di seed 3" in acc.get_title()


def test_reproduction_figure_means_over_the_seeds_that_reached_each_epoch():
    rows = [{"model": "rnn", "method": "lcp-di", "curves": {0: [90.0, 92.0, 94.0], 1: [91.0, 93.0]},
             "paper": (97.58, 0.16), "rescored": [{"seed": 0, "recorded": 94.0, "rescored": 94.5},
                                                  {"seed": 1, "recorded": 93.0, "rescored": 93.0}]},
            {"model": "rnn", "method": "lcp-lf", "curves": {}, "paper": (97.70, 0.11)},  # not run: the diamond only
            {"model": "ff", "method": "bp", "curves": {0: [98.0]}, "paper": None}]
    fig = reproduction_figure(rows, epochs=30)
    rnn, ff = fig.axes
    thin = [ln for ln in rnn.lines if ln.get_linewidth() < 1]
    bold = [ln for ln in rnn.lines if ln.get_linewidth() == 2]
    assert len(thin) == 2 and len(bold) == 1
    np.testing.assert_allclose(bold[0].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(bold[0].get_ydata(), [90.5, 92.5, 94.0])
    circles = [ln for ln in rnn.lines if ln.get_marker() == "o"]  # only seed 0's score changed when rescored
    assert [(float(c.get_xdata()[0]), float(c.get_ydata()[0])) for c in circles] == [(3.0, 94.5)]
    diamonds = [ln for ln in rnn.lines if ln.get_marker() == "D"]
    assert [(float(d.get_xdata()[0]), float(d.get_ydata()[0])) for d in diamonds] == [(30.7, 97.58), (30.95, 97.70)]
    assert [t.get_text() for t in rnn.get_legend().get_texts()] == ["lcp-di (2 seeds)", "lcp-lf (0 seeds)"]
    assert [t.get_text() for t in ff.get_legend().get_texts()] == ["bp (1 seed)"]


@pytest.mark.parametrize("accs, paper, cells", [
    ([97.5, 97.7, 97.6], (97.58, 0.16), ("+0.02", "yes")),
    ([97.3, 97.4, 97.5], (97.58, 0.16), ("-0.18", "no, below (the two +- std bars overlap)")),
    ([98.33], (98.11, 0.07), ("+0.22", "no, above (1 seed)")),
    ([96.0, 96.2], (97.58, 0.16), ("-1.48", "no, below (2 seeds)")),
    ([], (97.58, 0.16), ("-", "-")),
    ([97.0], None, ("-", "-")),
])
def test_verdict_follows_its_rule(accs, paper, cells):
    assert verdict(accs, paper) == cells


@needs_mnist
def test_run_writes_its_curves_after_every_epoch(tmp_path, monkeypatch):
    import lcp_meta.supervised.report as report
    drawn, original = [], report.plot_run

    def spy(result, path):
        drawn.append([e["epoch"] for e in result["epochs"]])
        return original(result, path)

    monkeypatch.setattr(report, "plot_run", spy)
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    assert drawn == [[1], [1, 2]]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert main([*TINY, "--epochs", "1", "--out", str(tmp_path / "quiet"), "--no-plots"]) == 0
    assert not (tmp_path / "quiet" / "curves.png").exists()


@needs_mnist
def test_run_goes_on_without_matplotlib(tmp_path, monkeypatch, capsys):
    from lcp_meta.utils import plots
    monkeypatch.setattr(plots, "available", lambda: False)
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("matplotlib is not installed") == 1  # said once, not every epoch
    assert not (out / "curves.png").exists()
    assert json.loads((out / "result.json").read_text())["status"] == "finished"
