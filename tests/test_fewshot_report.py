"""The results table (and its parser), CSV curves and PNG plots of a few-shot comparison."""
import csv

import numpy as np
import pytest

from lcp_meta.fewshot import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(metric="accuracy", runs=False):
    out = []
    for i, name in enumerate(("lcp", "maml", "cml")):
        curve = [{"step": s, "query_loss": 1.0 / s + i, "query_metric": 0.5, "val_metric": 0.4 + 0.01 * s,
                  "val_ci95": 0.01, "time_s": 0.1 * s, "sec_per_step": 0.1, "peak_memory_mib": None}
                 for s in range(1, 6)]
        r = {"method": name, "metric": metric, "test_mean": 0.9 - 0.1 * i, "test_ci95": 0.0123 + i / 1000,
             "sec_per_step": 0.25 * (i + 1), "peak_memory_mib": None if i == 0 else 12.5 * i, "curve": curve}
        if runs:
            r["one_shot_runs"] = {"mean": 0.8 + 0.01 * i, "ci95": 0.05}
        out.append(r)
    return out


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img)) > 0.01  # something was drawn


@pytest.mark.parametrize("metric, runs", [("accuracy", False), ("accuracy", True), ("mse", False)])
def test_table_round_trip(metric, runs):
    results = _results(metric, runs)
    text = report.results_table(results, "CUDA max_memory_allocated")
    rows = report.parse_results_table("# title\n\n" + text + "\nfootnote\n")
    assert [r["method"] for r in rows] == ["lcp", "maml", "cml"]
    key = "test accuracy (%) mean ± CI95" if metric == "accuracy" else "test MSE mean ± CI95"
    scale = 100 if metric == "accuracy" else 1
    for row, res in zip(rows, results):
        assert row[key] == pytest.approx(scale * res["test_mean"], rel=1e-3)
        assert row[key + " CI95"] == pytest.approx(scale * res["test_ci95"], rel=1e-2)
        assert row["sec/meta-step"] == pytest.approx(res["sec_per_step"], rel=1e-3)
        mem = row["peak memory (MiB, CUDA max_memory_allocated)"]
        assert mem == (None if res["peak_memory_mib"] is None else pytest.approx(res["peak_memory_mib"]))
        if runs:
            assert row["one-shot runs accuracy (%) mean ± CI95"] == pytest.approx(100 * res["one_shot_runs"]["mean"])


def test_table_shows_each_methods_settings():
    results = _results("mse", False)
    results[0]["method_kwargs"] = {"inner_steps": 1000, "lam": 10.0, "beta": 0.01, "tol": None}
    results[1]["method_kwargs"] = {"inner_lr": 0.00837, "inner_steps": 19, "tol": None}
    results[2].pop("method_kwargs", None)
    rows = report.parse_results_table(report.results_table(results, "x"))
    assert [r["settings"] for r in rows] == ["inner_steps=1000, lam=10, beta=0.01", "inner_lr=0.00837, inner_steps=19",
                                             "-"]


def test_parse_rejects_non_tables():
    with pytest.raises(ValueError, match="no markdown table"):
        report.parse_results_table("just text\n")
    with pytest.raises(ValueError, match="cells"):
        report.parse_results_table("| a | b |\n|---|---|\n| 1 |\n")


def test_curve_csv(tmp_path):
    curve = _results()[0]["curve"]
    path = report.write_curve_csv(curve, tmp_path / "c.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 5 and list(rows[0]) == list(report.CURVE_FIELDS)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert float(rows[1]["query_loss"]) == pytest.approx(0.5) and rows[0]["peak_memory_mib"] == ""


def test_plots_are_valid_pngs(tmp_path):
    results = _results("accuracy")
    assert_png(report.plot_curves(results, tmp_path / "curves.png"))
    assert_png(report.plot_test_metric(results, tmp_path / "test.png", episodes=600))
    assert_png(report.plot_cost(results, tmp_path / "cost.png", "not measured on CPU"))
    x = np.linspace(-5, 5, 50)
    fits = {"x": x.tolist(), "tasks": [{"amplitude": 2.0, "phase": 1.0, "x_support": [0.0, 1.0],
                                        "y_support": [-1.7, 0.0], "pred": {"lcp": np.sin(x).tolist()}}] * 2}
    assert_png(report.plot_sinusoid_fits(fits, tmp_path / "fits.png"))


def _seed_results(rng, offset, seeds=3, episodes=40, skipped=0, residuals=(None, None)):
    out = []
    for s in range(seeds):
        values = (rng.gamma(2.0, 0.5, size=episodes) + offset).tolist()
        out.append({"test_values": values, "sec_per_step": 0.1 * (s + 1), "skipped_meta_steps": skipped,
                    "meta_steps": 100, "final_residuals": {"inner_residual": residuals[0],
                                                           "control_residual": residuals[1], "converged": True}})
    return out


def test_seeds_table_states_what_the_paired_tests_found():
    rng = np.random.default_rng(5)
    per_seed = {"maml": _seed_results(rng, 1.0), "lcp": _seed_results(rng, 0.0, skipped=1,
                                                                        residuals=(2e-5, 9e-5))}
    per_seed["lcp"][1]["final_residuals"]["control_residual"] = 1e-4  # the worst seed's residual is shown
    values, rows = report.seed_rows(per_seed, {"lcp": "lam=10.0", "maml": "inner_lr=0.01"})
    assert rows["lcp"]["skipped"] == "3/300" and rows["lcp"]["sec_per_step"] == pytest.approx(0.2)
    assert rows["lcp"]["residual"] == "2.0e-05 / 1.0e-04" and rows["maml"]["residual"] == "-"
    from lcp_meta.fewshot import stats
    comparison = stats.compare(values, lower_is_better=True)
    table = report.seeds_table(comparison, rows, "mse")
    parsed = report.parse_results_table(table)
    assert [r["method"] for r in parsed] == ["lcp", "maml"]  # best first
    lcp, maml = parsed
    assert lcp["test MSE mean ± CI95"] == pytest.approx(comparison["summary"]["lcp"]["mean"], rel=1e-3)
    assert lcp["significant"] == "-" and maml["significant"] == "yes"
    diff = np.mean([np.mean(a) - np.mean(b) for a, b in zip(values["maml"], values["lcp"])])
    assert maml["difference to lcp ± CI95"] == pytest.approx(diff, rel=1e-3)
    assert maml["settings"] == "inner_lr=0.01"


def test_seed_rows_refuses_runs_without_per_episode_values():
    with pytest.raises(ValueError, match="test_values"):
        report.seed_rows({"lcp": [{"sec_per_step": 1.0, "skipped_meta_steps": 0, "meta_steps": 1}]})


def test_table_says_on_how_many_test_tasks_adaptation_failed():
    """A method whose adaptation diverged (or was refused at its cap) on some test tasks showed 'nan ± nan', with
    nothing saying why: the cell must count the failed tasks; finite runs keep mean ± CI95."""
    results = _results("mse", False)
    results[0]["test_values"] = [0.5, float("nan"), 0.7, float("inf")]
    results[0]["test_mean"] = results[0]["test_ci95"] = float("nan")
    results[1]["test_values"] = [0.5, 0.6]
    rows = report.parse_results_table(report.results_table(results, "x"))
    key = "test MSE mean ± CI95"
    assert rows[0][key] == "n/a: adaptation failed on 2 of 4 test tasks"
    assert rows[1][key] == pytest.approx(results[1]["test_mean"], rel=1e-3)
