"""The scripts in examples/ run to the end at a small budget (each skips when its optional library is absent).

They had drifted: since ``lcp`` stops only at its controlled equilibrium, all three raised DivergenceError with
their old settings (a ReLU learner, a fixed 20-100 step budget), and nothing ran them.
"""
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _need(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (bash scripts/install_adapters.sh)")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_higher_crosscheck_agrees_with_higher_and_runs_lcp_on_a_higher_model():
    _need("higher")
    errors = _load("higher_crosscheck").main(tasks=2, inner_steps=3)
    # MAML: lcp_meta's unrolled meta-gradient against higher's differentiable loop (float64), relative to its scale
    assert errors["maml, momentum 0.0"] < 1e-13 and errors["maml, momentum 0.9"] < 1e-13, errors
    # LCP at its equilibrium on a higher functional model: the plain module's meta-gradient, bit for bit
    assert errors["lcp, higher vs plain"] == 0.0, errors


def test_learn2learn_example_trains_with_lcp_at_its_equilibrium():
    _need("learn2learn")
    random.seed(0)  # learn2learn's NWays samples classes with Python's random
    accuracy = _load("learn2learn_maml_to_lcp").main(num_iterations=1, meta_batch_size=2)
    assert 0.0 <= accuracy <= 1.0


def test_torchmeta_example_runs_with_its_default_method(shared_data):
    _need("torchmeta")
    if not (shared_data / "omniglot" / "images_background_small1.zip").is_file():
        pytest.skip("omniglot/images_background_small1.zip not in the offline data")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(EXAMPLES / "torchmeta_omniglot_style.py"), "--data-root",
                          str(shared_data), "--steps", "1", "--meta-batch", "1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "meta-test accuracy on held-out characters" in out.stdout, out.stdout
