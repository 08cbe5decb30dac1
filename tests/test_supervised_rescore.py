"""Rescoring a finished run from its checkpoint rebuilds the trained model exactly: with the evaluation unchanged it
gives the run's own recorded final test accuracy and loss."""
import json

import pytest

from lcp_meta.cli import main
from lcp_meta.supervised.rescore import rescore
from lcp_meta.utils.errors import UserInputError

from conftest import SHARED_DATA as DATA

needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"offline MNIST not found in {DATA}")
COMMON = ["supervised", "--dataset", "mnist", "--max-batches", "2", "--test-subset", "200", "--device", "cpu",
          "--no-progress", "--no-plots", "--data-root", str(DATA), "--epochs", "2"]


@needs_mnist
@pytest.mark.parametrize("extra", [
    ["--model", "ff", "--model-set", "hidden=(16, 16)", "--method", "bp"],
    # the paper preset's rnn DI: recurrent bias, euler-flat training, the free equilibrium iterated at test time
    ["--model", "rnn", "--model-set", "hidden=12", "--method", "lcp-di", "--preset", "paper", "--set", "max_iter=60"],
])
def test_rescore_reproduces_the_recorded_final_score(tmp_path, extra):
    out = tmp_path / "run"
    assert main([*COMMON, *extra, "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    again = rescore(out, data_root=str(DATA))
    assert again["epoch"] == 2
    assert again["test_accuracy"] == res["final_test_accuracy"]
    assert again["test_loss"] == pytest.approx(res["epochs"][-1]["test_loss"], rel=1e-6)
    assert again["eval"]["solver"] == "euler"


def test_rescore_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(UserInputError, match="no checkpoint to rescore"):
        rescore(tmp_path)
