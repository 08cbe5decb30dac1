"""``lcp-meta fewshot`` / ``lcp-meta demo`` end to end on tiny budgets, resume equivalence, bad input."""
import csv
import json
from pathlib import Path

import pytest
import torch

from lcp_meta.cli import main
from lcp_meta.fewshot import report

from conftest import SHARED_DATA as SHARED, one_error_line
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--meta-batch", "2", "--inner-steps", "3", "--test-episodes", "4", "--val-episodes", "2",
        "--val-every", "1000", "--device", "cpu", "--no-progress"]


def _valid_png(path: Path) -> bool:
    import matplotlib.image as mpimg
    return path.read_bytes()[:8] == PNG_MAGIC and mpimg.imread(path).ndim == 3


def test_sinusoid_run_folder(tmp_path, capsys):
    out = tmp_path / "sin"
    rc = main(["fewshot", "--task", "sinusoid", "--shots", "5", "--methods", "lcp-truncated,maml", "--meta-steps", "3",
               "--out", str(out), *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| lcp-truncated |" in printed and "results.md" in printed
    for name in ("config.json", "results.md", "results.json", "lcp-truncated.json", "maml.json", "lcp-truncated_curve.csv",
                 "maml_curve.csv", "checkpoints/lcp-truncated.pt", "checkpoints/maml.pt"):
        assert (out / name).is_file(), name
    for name in ("curves.png", "test_metric.png", "cost.png", "fits.png"):
        assert _valid_png(out / name), name
    rows = report.parse_results_table((out / "results.md").read_text())
    assert [r["method"] for r in rows] == ["lcp-truncated", "maml"]
    for row in rows:
        res = json.loads((out / f"{row['method']}.json").read_text())
        assert res["metric"] == "mse" and res["test_episodes"] == 4 and res["meta_steps"] == 3
        assert row["test MSE mean ± CI95"] == pytest.approx(res["test_mean"], rel=1e-3)
        assert row["sec/meta-step"] == pytest.approx(res["sec_per_step"], rel=1e-3) and res["sec_per_step"] > 0
        # the CPU proxy: autograd graph bytes at the meta-gradient, zero for LCP, positive for unrolled MAML
        mem = row["peak memory (MiB, CPU proxy: autograd graph)"]
        assert mem == pytest.approx(res["peak_memory_mib"], abs=0.06)
        assert (res["peak_memory_mib"] == 0) == (row["method"] == "lcp-truncated")
        curve = list(csv.DictReader(open(out / f"{row['method']}_curve.csv")))
        assert [int(c["step"]) for c in curve] == [1, 2, 3]
        assert all(float(c["query_loss"]) > 0 and float(c["time_s"]) > 0 for c in curve)
        assert curve[-1]["val_metric"] != ""
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"]["task"] == "sinusoid" and config["methods"] == ["lcp-truncated", "maml"]
    # the method-specific settings: LCP gets lam and beta, MAML neither (lam = 0)
    assert set(json.loads((out / "lcp-truncated.json").read_text())["method_kwargs"]) >= {"lam", "beta"}
    assert "lam" not in json.loads((out / "maml.json").read_text())["method_kwargs"]


def test_omniglot_20_way_with_the_official_runs(tmp_path, tmp_path_factory):
    if not (SHARED / "omniglot" / "all_runs.zip").is_file():
        pytest.skip(f"offline Omniglot data not found in {SHARED / 'omniglot'}")
    out = tmp_path / "omni"
    rc = main(["fewshot", "--task", "omniglot", "--ways", "20", "--shots", "1", "--queries", "1",
               "--methods", "fomaml", "--meta-steps", "2", "--hidden", "4", "--data-root", str(SHARED),
               "--cache-dir", str(tmp_path_factory.getbasetemp() / "omniglot_cache"), "--out", str(out), *TINY])
    assert rc == 0
    res = json.loads((out / "fomaml.json").read_text())
    assert res["metric"] == "accuracy" and 0.0 <= res["test_mean"] <= 1.0
    runs = res["one_shot_runs"]
    assert len(runs["per_run"]) == 20 and all(0.0 <= v <= 1.0 for v in runs["per_run"].values())
    row = report.parse_results_table((out / "results.md").read_text())[0]
    assert row["one-shot runs accuracy (%) mean ± CI95"] == pytest.approx(100 * runs["mean"], abs=0.01)
    assert row["test accuracy (%) mean ± CI95"] == pytest.approx(100 * res["test_mean"], abs=0.01)
    protocol = json.loads((out / "config.json").read_text())["protocol"]
    assert protocol["distinct_background_characters"] == 242 and protocol["ways"] == 20
    assert _valid_png(out / "test_metric.png") and not (out / "fits.png").exists()


def _final_state(out: Path, name: str):
    ckpt = torch.load(out / "checkpoints" / f"{name}.pt", weights_only=False)
    return ckpt


def test_resume_reaches_the_uninterrupted_result(tmp_path):
    # cml averages its meta-parameters from step 1 on (Polyak): the average is method state, not model state,
    # and a resumed run must carry it (it is what cml tests from)
    args = ["fewshot", "--task", "sinusoid", "--shots", "4", "--methods", "lcp-truncated,maml,cml", "--meta-steps", "6",
            "--set", "cml.polyak_start=1", "--dtype", "float64", "--checkpoint-every", "2", "--no-plots", *TINY]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    # interrupted after 3 steps (exit code 3 says so), then resumed
    assert main([*args, "--out", str(tmp_path / "resumed"), "--stop-after", "3"]) == 3
    assert _final_state(tmp_path / "resumed", "lcp-truncated")["step"] == 3
    assert not (tmp_path / "resumed" / "lcp-truncated.json").exists()
    assert main([*args, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    for name in ("lcp-truncated", "maml", "cml"):
        a, b = _final_state(tmp_path / "straight", name), _final_state(tmp_path / "resumed", name)
        assert a["step"] == b["step"] == 6
        for p, q in zip(a["params"], b["params"]):
            assert p.dtype == torch.float64 and torch.equal(p, q)
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
        ja = json.loads((tmp_path / "straight" / f"{name}.json").read_text())
        jb = json.loads((tmp_path / "resumed" / f"{name}.json").read_text())
        assert ja["test_mean"] == jb["test_mean"]
        assert [c["query_loss"] for c in ja["curve"]] == [c["query_loss"] for c in jb["curve"]]
    # resuming under other settings is refused, naming the setting
    assert main([*args, "--out", str(tmp_path / "resumed"), "--resume", "--lam", "3.0"]) == 2


def test_demo_command_runs(tmp_path, capsys):
    rc = main(["demo", "--methods", "lcp-truncated", "--meta-steps", "2", "--out", str(tmp_path / "demo"), "--no-plots",
               *TINY])
    assert rc == 0
    assert "| lcp-truncated |" in capsys.readouterr().out
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["task"] == "sinusoid" and config["meta_steps"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--methods", "lcp,bogus"], "unknown method(s) bogus; expected some of lcp, lcp-direct"),
    (["--methods", "lcp", "--set", "lcp.no_such_option=1"], "no_such_option"),
    (["--methods", "lcp", "--set", "lcp-beta"], "expected METHOD.OPTION=VALUE"),
    (["--methods", "lcp", "--set", "maml.inner_steps=1"], "options given for methods not in the run: maml"),
    (["--task", "cifar"], "unknown task 'cifar'"),
    (["--meta-steps", "0"], "meta_steps must be a positive integer"),
    (["--inner-lr", "-1"], "inner_lr must be a positive finite number"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    rc = main(["fewshot", "--out", str(tmp_path / "x"), "--no-progress", "--test-episodes", "2", "--meta-steps",
               "1", *argv] if "--meta-steps" not in argv else ["fewshot", "--out", str(tmp_path / "x"), *argv])
    assert rc == 2
    one_error_line(capsys, message, command="lcp-meta fewshot: error:")


def test_missing_data_root_names_the_expected_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LCP_META_DATA", raising=False)
    rc = main(["fewshot", "--task", "omniglot", "--methods", "maml", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "images_background.zip" in err and "images_background_small1.zip" in err
    monkeypatch.setenv("LCP_META_DATA", str(tmp_path))
    assert main(["fewshot", "--task", "omniglot", "--methods", "maml", "--out", str(tmp_path / "x")]) == 2
    assert f"no Omniglot data in {tmp_path / 'omniglot'}" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_fewshot_quick(tmp_path):
    """benchmarks/reproduce_fewshot.py --quick end to end (minutes on a CPU; LCP_META_SLOW=1)."""
    if not (SHARED / "omniglot" / "all_runs.zip").is_file():
        pytest.skip(f"offline Omniglot data not found in {SHARED / 'omniglot'}")
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "reproduce_fewshot", Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--quick", "--device", "cpu", "--data-root", str(SHARED), "--methods", "lcp-truncated,maml",
                      "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res"),
                      "--no-progress"])
    assert rc == 0
    saved = json.loads((tmp_path / "res" / "fewshot_cpu.json").read_text())
    assert set(saved["comparisons"]) == {"omniglot 5-way 1-shot", "omniglot 20-way 1-shot"}
    rows = saved["comparisons"]["omniglot 20-way 1-shot"]["rows"]
    assert [r["method"] for r in rows] == ["lcp-truncated", "maml"]
    assert all(r["one-shot runs accuracy (%) mean ± CI95"] is not None for r in rows)
    assert "Official one-shot runs" in (tmp_path / "res" / "fewshot_cpu.md").read_text()


def test_reproduce_fewshot_set_overrides_are_typed_and_checked():
    """--set KEY=VALUE keeps each protocol setting's type and refuses unknown keys and bad values."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "reproduce_fewshot", Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    template = module.FULL["5way"]
    got = module.parse_overrides(["meta_batch=4", "inner_lr=0.05", "test-episodes=300"], template)
    assert got == {"meta_batch": 4, "inner_lr": 0.05, "test_episodes": 300}
    assert type(got["meta_batch"]) is int and type(got["inner_lr"]) is float
    for bad, says in (("nope=1", "KEY one of"), ("meta_batch", "KEY one of"), ("meta_batch=x", "takes a int"),
                      ("meta_batch=2.5", "takes a int")):
        with pytest.raises(SystemExit, match=says):
            module.parse_overrides([bad], template)


def test_reproduce_fewshot_report_only_reads_finished_runs_and_refuses_other_settings(tmp_path):
    """--report-only rebuilds a table from a finished run folder (results.json + results.md) and refuses a run
    that was made with other settings than the ones asked for."""
    import importlib.util
    from lcp_meta.fewshot import FewShotConfig
    spec = importlib.util.spec_from_file_location(
        "reproduce_fewshot", Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = dict(module.FULL["5way"], meta_batch=4)
    cfg = FewShotConfig(task="omniglot", methods=("maml",), seed=1, out=str(tmp_path / "seed1"), **settings)
    with pytest.raises(SystemExit, match="no finished run"):
        module._saved_summary(cfg)
    (tmp_path / "seed1").mkdir()
    ran = {k: getattr(cfg.validate(), k) for k in ("ways", "shots", "queries", "meta_steps", "meta_batch",
                                                  "inner_steps", "inner_lr", "lam", "beta", "hidden",
                                                  "test_episodes", "seed")}
    (tmp_path / "seed1" / "results.json").write_text(json.dumps({"config": ran, "results": [], "unfinished": []}))
    (tmp_path / "seed1" / "results.md").write_text("| method |\n|---|\n| maml |\n")
    assert module._saved_summary(cfg)["table"].startswith("| method |")
    other = FewShotConfig(task="omniglot", methods=("maml",), seed=1, out=str(tmp_path / "seed1"),
                          **dict(settings, meta_batch=8))
    with pytest.raises(SystemExit, match=r"other settings \(meta_batch: meta_batch=4\)"):
        module._saved_summary(other)


def test_threads_option_is_restored_after_the_command(tmp_path):
    before = torch.get_num_threads()
    assert main(["fewshot", "--methods", "fomaml", "--meta-steps", "1", "--threads", "1", "--no-plots",
                 "--out", str(tmp_path / "t"), *TINY]) == 0
    assert torch.get_num_threads() == before
    assert main(["fewshot", "--threads", "0", "--out", str(tmp_path / "t")]) == 2


def test_comparison_without_matplotlib_keeps_its_results(tmp_path, monkeypatch):
    """The plots come last: without matplotlib the comparison warns and keeps its tables, not a traceback."""
    from lcp_meta.utils import plots
    monkeypatch.setattr(plots, "available", lambda: False)
    out = tmp_path / "t"
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        assert main(["fewshot", "--methods", "fomaml", "--meta-steps", "1", "--out", str(out), *TINY]) == 0
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    assert not list(out.glob("*.png"))
