"""Statistics of a few-shot comparison over several seeds: confidence intervals and paired tests.

Layout of the data: for one method, ``values[s][e]`` is the test metric of seed ``s`` on test episode ``e``.
Every method of a seed is scored on the same fixed test episodes (the runner draws them from the seed), so two
methods' values pair up episode by episode; different seeds have different episodes and initial weights.

* :func:`seed_ci95` -- mean and 95% CI over seeds and episodes.  Seeds are the independent units (episodes of
  one seed share that seed's trained model), so the interval is Student's t over the per-seed means,
  ``t_{S-1} * sd(seed means) / sqrt(S)``: for equally many episodes per seed this is the unbiased variance of
  the grand mean under a two-level (seed, episode) model.  One seed: the t-interval over its episodes.
* :func:`paired_test` -- two methods on the shared episodes: Wilcoxon signed-rank test over all
  (seed, episode) pairs (the metric, e.g. an MSE, is far from normal), plus the per-seed mean differences; a
  difference is called significant only when the Holm-corrected p-value is below ``alpha`` AND the mean
  difference has the same sign in every seed (a difference carried by one seed's model is not a property of
  the method).
* :func:`compare` -- every method against the best one, Holm correction over the comparisons.

No scipy at run time (it is not a dependency): the t distribution and the normal tail are computed here;
``tests/test_fewshot_stats.py`` checks them against scipy in float64.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..utils.errors import UserInputError

__all__ = ["t_cdf", "t_ppf", "seed_ci95", "wilcoxon_signed_rank", "paired_t", "holm", "paired_test",
           "PairedResult", "compare"]


# ----------------------------------------------------------------------------------- distributions
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise UserInputError(f"degrees of freedom must be positive, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on :func:`t_cdf`, to float64 round-off)."""
    if not 0.0 < q < 1.0:
        raise UserInputError(f"quantile level must be in (0, 1), got {q!r}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


def _norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# ------------------------------------------------------------------------------------- intervals
def _as_seed_matrix(values, name: str = "values") -> List[np.ndarray]:
    """``values[s][e]`` -> a list of float64 arrays, one per seed (seeds may have different episode counts)."""
    rows = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    if not rows or any(r.size == 0 for r in rows):
        raise UserInputError(f"{name}: expected at least one seed with at least one episode, got "
                             f"{[r.size for r in rows]} episodes per seed")
    bad = [(s, float(r[~np.isfinite(r)][0])) for s, r in enumerate(rows) if not np.isfinite(r).all()]
    if bad:
        raise UserInputError(f"{name}: seed {bad[0][0]} has a non-finite episode value ({bad[0][1]}); a diverged "
                             f"method has no confidence interval")
    return rows


def _t_interval(x: np.ndarray, level: float) -> float:
    if x.size < 2:
        return 0.0
    return t_ppf(0.5 + level / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


def seed_ci95(values, level: float = 0.95) -> Dict[str, float]:
    """Mean over seeds and episodes and the half-width of its ``level`` confidence interval.

    Returns ``{"mean", "ci95", "seeds", "episodes", "df", "seed_means"}``: with two or more seeds the interval
    is Student's t over the per-seed means (df = seeds - 1), with one seed over its episodes."""
    rows = _as_seed_matrix(values)
    means = np.array([r.mean() for r in rows])
    if len(rows) == 1:
        return {"mean": float(means[0]), "ci95": _t_interval(rows[0], level), "seeds": 1,
                "episodes": int(rows[0].size), "df": int(rows[0].size - 1), "seed_means": means.tolist()}
    return {"mean": float(means.mean()), "ci95": _t_interval(means, level), "seeds": len(rows),
            "episodes": int(sum(r.size for r in rows)), "df": len(rows) - 1, "seed_means": means.tolist()}


# ---------------------------------------------------------------------------------------- tests
def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties getting the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or xs[end] != xs[start]:
            ranks[order[start:end]] = 0.5 * (start + 1 + end)
            start = end
    return ranks


def wilcoxon_signed_rank(d) -> Dict[str, float]:
    """Two-sided Wilcoxon signed-rank test that the differences ``d`` are symmetric about 0.

    Zero differences are dropped (Wilcoxon's convention), tied |d| get mean ranks; the p-value is the normal
    approximation with the tie-corrected variance and no continuity correction (n here is hundreds of
    episodes).  Returns ``{"statistic": min(W+, W-), "p": p, "n": pairs used}``."""
    d = np.asarray(d, dtype=np.float64).ravel()
    d = d[d != 0]
    n = d.size
    if n == 0:
        return {"statistic": 0.0, "p": 1.0, "n": 0}
    r = _ranks(np.abs(d))
    w_plus = float(r[d > 0].sum())
    w_minus = float(r[d < 0].sum())
    mean = n * (n + 1) / 4.0
    _, counts = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((counts ** 3 - counts).sum()) / 48.0
    if var <= 0:
        return {"statistic": min(w_plus, w_minus), "p": 1.0, "n": int(n)}
    z = (min(w_plus, w_minus) - mean) / math.sqrt(var)
    return {"statistic": min(w_plus, w_minus), "p": min(1.0, 2.0 * _norm_sf(abs(z))), "n": int(n)}


def paired_t(d) -> Dict[str, float]:
    """Two-sided one-sample t-test of mean(d) = 0 (the paired t-test on differences d)."""
    d = np.asarray(d, dtype=np.float64).ravel()
    n = d.size
    if n < 2:
        raise UserInputError(f"a paired t-test needs at least 2 pairs, got {n}")
    sd = float(d.std(ddof=1))
    if sd == 0:
        return {"statistic": 0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean()),
                "p": 1.0 if d.mean() == 0 else 0.0, "df": n - 1}
    t = float(d.mean()) / (sd / math.sqrt(n))
    return {"statistic": t, "p": min(1.0, 2.0 * t_cdf(-abs(t), n - 1)), "df": n - 1}


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="mergesort")
    adjusted = np.empty(m)
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        adjusted[k] = running
    return adjusted.tolist()


@dataclass
class PairedResult:
    """Method ``a`` against method ``b`` on the shared test episodes (differences a - b).

    mean_diff / ci95: the mean difference over seeds and episodes and its interval (as :func:`seed_ci95`);
    seed_diffs: the mean difference per seed; p: Wilcoxon signed-rank over all (seed, episode) pairs;
    p_t: paired t-test over the per-seed mean differences (None with one seed); p_holm: p after Holm's
    correction over the comparisons of one table (set by :func:`compare`); significant: p_holm < alpha and
    the same sign in every seed."""

    a: str
    b: str
    mean_diff: float
    ci95: float
    seed_diffs: List[float]
    pairs: int
    p: float
    p_t: Optional[float]
    p_holm: float
    same_sign: bool
    significant: bool

    def as_dict(self) -> dict:
        return asdict(self)


def paired_test(a, b, name_a: str = "a", name_b: str = "b", alpha: float = 0.05) -> PairedResult:
    """Compare two methods scored on the same episodes: ``a[s][e]`` and ``b[s][e]`` (see the module doc)."""
    ra, rb = _as_seed_matrix(a, name_a), _as_seed_matrix(b, name_b)
    shapes = ([r.size for r in ra], [r.size for r in rb])
    if shapes[0] != shapes[1]:
        raise UserInputError(f"{name_a} and {name_b} were not scored on the same episodes: episodes per seed "
                             f"{shapes[0]} against {shapes[1]}")
    diffs = [x - y for x, y in zip(ra, rb)]
    ci = seed_ci95(diffs)
    seed_diffs = [float(d.mean()) for d in diffs]
    w = wilcoxon_signed_rank(np.concatenate(diffs))
    p_t = paired_t(np.array(seed_diffs))["p"] if len(diffs) > 1 else None
    same = all(s > 0 for s in seed_diffs) or all(s < 0 for s in seed_diffs)
    return PairedResult(a=name_a, b=name_b, mean_diff=ci["mean"], ci95=ci["ci95"], seed_diffs=seed_diffs,
                        pairs=int(sum(d.size for d in diffs)), p=w["p"], p_t=p_t, p_holm=w["p"], same_sign=same,
                        significant=bool(w["p"] < alpha and same))


def compare(values: Mapping[str, Sequence[Sequence[float]]], lower_is_better: bool,
            alpha: float = 0.05) -> Dict[str, object]:
    """Every method against the best one (best mean over seeds and episodes), Holm-corrected.

    ``values``: method -> ``[s][e]`` test metric.  Methods whose values are not finite (a diverged run) are
    left out of the tests and listed under ``"excluded"``.  Returns ``{"best", "summary": {method:
    seed_ci95(...)}, "tests": [PairedResult as dict, ...] (method - best), "excluded": [...]}``."""
    if not values:
        raise UserInputError("compare needs at least one method's values")
    summary, excluded = {}, []
    for name, v in values.items():
        try:
            summary[name] = seed_ci95(v)
        except UserInputError:
            excluded.append(name)
    if not summary:
        return {"best": None, "summary": {}, "tests": [], "excluded": excluded}
    pick = min if lower_is_better else max
    best = pick(summary, key=lambda n: summary[n]["mean"])
    tests = [paired_test(values[n], values[best], n, best, alpha) for n in summary if n != best]
    for t, p in zip(tests, holm([t.p for t in tests])):
        t.p_holm = p
        t.significant = bool(p < alpha and t.same_sign)
    return {"best": best, "summary": summary, "tests": [t.as_dict() for t in tests], "excluded": excluded,
            "alpha": alpha, "lower_is_better": lower_is_better}
