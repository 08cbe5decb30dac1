"""lcp_meta.fewshot.stats against scipy.stats (float64): t distribution, intervals, paired tests, Holm."""
import math
from pathlib import Path

import numpy as np
import pytest

from lcp_meta.fewshot import stats
from lcp_meta.utils.errors import UserInputError

sps = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3.5, 9, 29, 299, 5000])
def test_t_cdf_and_ppf_match_scipy(df):
    for t in (-40.0, -3.1, -1.0, -0.2, 0.0, 0.7, 2.0, 12.0):
        assert stats.t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), rel=1e-10, abs=1e-14)
    for q in (0.001, 0.025, 0.3, 0.5, 0.9, 0.975, 0.9995):
        assert stats.t_ppf(q, df) == pytest.approx(sps.t.ppf(q, df), rel=1e-9, abs=1e-12)


def test_seed_ci95_is_the_t_interval_over_seed_means():
    rng = np.random.default_rng(0)
    values = [rng.gamma(2.0, 1.0 + s, size=50) for s in range(3)]
    got = stats.seed_ci95(values)
    means = np.array([v.mean() for v in values])
    lo, hi = sps.t.interval(0.95, len(means) - 1, loc=means.mean(), scale=sps.sem(means))
    assert got["mean"] == pytest.approx(means.mean(), rel=1e-14)
    assert got["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-9)
    assert (got["seeds"], got["episodes"], got["df"]) == (3, 150, 2)
    # one seed: the t-interval over its episodes
    one = stats.seed_ci95([values[0]])
    lo, hi = sps.t.interval(0.95, 49, loc=values[0].mean(), scale=sps.sem(values[0]))
    assert one["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-9)


@pytest.mark.parametrize("n, ties", [(30, False), (300, False), (200, True)])
def test_wilcoxon_matches_scipy_normal_approximation(n, ties):
    rng = np.random.default_rng(n)
    d = rng.standard_t(3, size=n) + 0.15
    if ties:  # rounded differences: tied |d| and exact zeros, as accuracies of few-query episodes give
        d = np.round(d, 1)
    got = stats.wilcoxon_signed_rank(d)
    ref = sps.wilcoxon(d, zero_method="wilcox", correction=False, method="approx")
    assert got["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert got["n"] == int((d != 0).sum())


def test_paired_t_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=12), rng.normal(0.4, size=12)
    got = stats.paired_t(a - b)
    ref = sps.ttest_rel(a, b)
    assert got["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # by hand: sorted 0.005 0.01 0.03 0.04 0.5, times 5 4 3 2 1 -> 0.025 0.04 0.09 0.08 0.5, running max
    assert stats.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5], rel=1e-14)


def test_paired_test_calls_a_clear_difference_and_not_a_one_seed_one():
    rng = np.random.default_rng(7)
    base = [rng.gamma(2.0, 1.0, size=200) for _ in range(3)]
    better = [b - 0.3 * b.mean() * rng.uniform(0.5, 1.5, size=b.size) for b in base]
    r = stats.paired_test(better, base, "lcp", "maml")
    d = np.concatenate([x - y for x, y in zip(better, base)])
    assert r.p == pytest.approx(sps.wilcoxon(d, correction=False, method="approx").pvalue, rel=1e-9)
    assert r.p_t == pytest.approx(sps.ttest_rel([x.mean() for x in better], [y.mean() for y in base]).pvalue,
                                  rel=1e-9)
    assert r.significant and r.same_sign and r.mean_diff < 0 and r.pairs == 600
    # a large gain on one seed, losses on the others: pooled Wilcoxon may be small, but not the same sign
    mixed = [base[0] - 2.0, base[1] + 0.05, base[2] + 0.05]
    r2 = stats.paired_test(mixed, base, "x", "maml")
    assert not r2.same_sign and not r2.significant


def test_compare_picks_best_and_applies_holm():
    rng = np.random.default_rng(11)
    base = [rng.gamma(2.0, 1.0, size=100) for _ in range(3)]
    values = {"a": base, "b": [x + 0.5 for x in base], "c": [x + rng.normal(0, 1e-3, x.size) for x in base]}
    out = stats.compare(values, lower_is_better=True)
    assert out["best"] == "a" or out["best"] == "c"
    tests = {t["a"]: t for t in out["tests"]}
    raw = [t["p"] for t in out["tests"]]
    for t, adj in zip(out["tests"], stats.holm(raw)):
        assert t["p_holm"] == pytest.approx(adj)
    assert tests["b"]["significant"] and tests["b"]["mean_diff"] == pytest.approx(0.5, rel=1e-12)


def test_bad_input_is_refused_with_the_value():
    with pytest.raises(UserInputError, match="non-finite"):
        stats.seed_ci95([[1.0, math.nan]])
    with pytest.raises(UserInputError, match="same episodes"):
        stats.paired_test([[1.0, 2.0]], [[1.0]])
    with pytest.raises(UserInputError, match="quantile"):
        stats.t_ppf(1.5, 3)
    out = stats.compare({"ok": [[1.0, 2.0]], "diverged": [[math.nan, 1.0]]}, lower_is_better=True)
    assert out["excluded"] == ["diverged"] and out["best"] == "ok"


def _tune_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tune_fewshot.py"
    spec = importlib.util.spec_from_file_location("tune_fewshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_draws_stay_in_the_protocols_range():
    tune = _tune_module()
    start = tune.start_setting("sinusoid", "imaml")
    assert start["lam"] == 2.0 and start["cg_steps"] == 5  # the published iMAML start
    rng = tune.trial_rng("imaml", 100)
    for _ in range(200):
        d = tune.draw(start, "imaml", rng)
        for k in tune.SPACES["imaml"]:
            if k in ("inner_steps", "cg_steps"):
                assert isinstance(d[k], int) and 1 <= d[k] <= tune.INT_CAP
                assert d[k] <= round(start[k] * tune.SPREAD) + 1 and d[k] >= max(1, round(start[k] / tune.SPREAD) - 1)
            else:  # 3 significant digits of start * factor, factor in [1/SPREAD, SPREAD]
                assert start[k] / tune.SPREAD * (1 - 1e-2) <= d[k] <= start[k] * tune.SPREAD * (1 + 1e-2)
    # the same (tune seed, method) gives the same draws: a resumed tuning run repeats its trials
    a, b = tune.trial_rng("maml", 100), tune.trial_rng("maml", 100)
    s = tune.start_setting("sinusoid", "maml")
    assert [tune.draw(s, "maml", a) for _ in range(3)] == [tune.draw(s, "maml", b) for _ in range(3)]


def test_tuning_trials_hold_their_settings_and_lcp_its_equilibrium():
    tune = _tune_module()
    cfg = tune.config("sinusoid", "lcp", {"lam": 7.0, "beta": 0.02, "outer_lr": 3e-3}, {"test_episodes": 1}, 100,
                      Path("/nonexistent"), resume=False)
    assert cfg.method_options == {"lcp": {"lam": 7.0, "beta": 0.02, "outer_lr": 3e-3}}
    from lcp_meta.fewshot.runner import outer_lr_of
    assert outer_lr_of("lcp", cfg) == 3e-3  # the trial's outer lr is the run's Adam rate for lcp
    maml = tune.config("sinusoid", "maml", {"outer_lr": 3e-3}, {}, 100, Path("/nonexistent"), resume=False)
    assert outer_lr_of("maml", maml) == 3e-3  # a trial's rate wins over maml's tuned per-method default
    assert cfg.test_episodes == 1 and cfg.seed == 100
    assert "inner_lr" not in tune.SPACES["lcp"]  # lcp keeps its automatic step and residual stop
