"""The statistics of groups that share their seeds, and of planning seeds: the paired t interval and test, the
exact Wilcoxon signed-rank test, the paired TOST, the power of a t test and the seeds it needs, and the nominal
levels of a group-sequential design with an O'Brien–Fleming-type boundary (Lan–DeMets spending).

Runs at one seed see the same data order and the same head initialisation in every group, so the difference
per seed removes what the seed alone does to the score: the paired tests work on those differences.
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Optional

import numpy as np

ALPHA = 0.05
TARGET_POWER = 0.8
MOST_SEEDS = 10_000  # seeds_needed looks no further
EXACT_SIGNS_UP_TO = 20  # the Wilcoxon test enumerates 2^n sign patterns up to this many pairs
TIE_DECIMALS = 12  # differences equal to this many decimals tie in the Wilcoxon ranks


@dataclass
class PairedDifference:
    """mean(a − b) over the shared seeds: the paired t interval, the p-values of the paired t test, the exact
    Wilcoxon signed-rank test and the paired TOST within ±margin (raw; `adjusted` after Holm over the planned
    comparisons), and the standard deviation of the differences."""
    delta: float
    low: float
    high: float
    p_t: float
    p_wilcoxon: float
    p_tost: float  # H0: |Δ| ≥ margin
    margin: float
    pairs: int
    sd: float
    bootstrap: Optional[tuple[float, float]] = None
    adjusted: Optional[tuple[float, float, float]] = None  # t, Wilcoxon, TOST after Holm

    @property
    def p_values(self) -> tuple[float, float, float]:
        return self.p_t, self.p_wilcoxon, self.p_tost


def paired_difference(a: list[float], b: list[float], margin: float,
                      confidence: float = 0.95) -> Optional[PairedDifference]:
    """a[i] and b[i] come from one seed. None with fewer than two pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one b per a (got {len(a)} and {len(b)})")
    if len(a) < 2:
        return None
    differences = [x - y for x, y in zip(a, b)]
    n, delta, sd = len(differences), statistics.mean(differences), statistics.stdev(differences)
    low, high, p_t, p_tost = t_statistics(delta, sd / math.sqrt(n), n - 1, margin, confidence)
    return PairedDifference(delta, low, high, p_t, wilcoxon_signed_rank(differences), p_tost, margin, n, sd)


def t_statistics(delta: float, error: float, degrees: float, margin: float,
                 confidence: float = 0.95) -> tuple[float, float, float, float]:
    """For a difference `delta` with standard error `error` on `degrees` degrees of freedom (paired or Welch):
    its t interval (low, high), the two-sided t test's p, and the TOST's p within ±margin (the larger of its two
    one-sided tests). A zero error makes the difference exact."""
    from scipy import stats

    if error == 0:
        return delta, delta, 1.0 if delta == 0 else 0.0, 0.0 if abs(delta) < margin else 1.0
    half_width = stats.t.ppf((1 + confidence) / 2, degrees) * error
    p = 2 * float(stats.t.sf(abs(delta) / error, degrees))
    p_tost = max(float(stats.t.sf((delta + margin) / error, degrees)),
                 float(stats.t.cdf((delta - margin) / error, degrees)))
    return delta - half_width, delta + half_width, p, p_tost


def wilcoxon_signed_rank(differences: list[float]) -> float:
    """Two-sided exact p of the Wilcoxon signed-rank test: zero differences are dropped, tied magnitudes share
    their mid-rank, and the null distribution is every pattern of signs over those ranks (exact with ties, where
    the tables' distribution is not). Above EXACT_SIGNS_UP_TO pairs, the normal approximation with the tie
    correction."""
    from scipy import stats

    # Scores are ratios of counts: differences that are equal on paper differ in their last bits once subtracted
    # (0.80 − 0.79 against 0.81 − 0.80). Rounded far below any real difference, they tie as they should.
    rounded = np.round(np.asarray(differences, dtype=float), TIE_DECIMALS)
    nonzero = rounded[rounded != 0]
    if len(nonzero) == 0:
        return 1.0
    ranks = stats.rankdata(np.abs(nonzero))
    observed = ranks[nonzero > 0].sum()
    centre = ranks.sum() / 2
    if len(ranks) <= EXACT_SIGNS_UP_TO:
        signs = np.array(list(itertools.product((0.0, 1.0), repeat=len(ranks))))
        sums = signs @ ranks
        # Ranks are halves at worst: a tolerance far below that keeps the tail's ties in the tail.
        return float(np.mean(np.abs(sums - centre) >= abs(observed - centre) - 1e-9))
    spread = math.sqrt((ranks ** 2).sum() / 4)
    return float(2 * stats.norm.sf(abs(observed - centre) / spread))


def t_test_power(n: int, effect: float, sd: float, alpha: float = ALPHA, paired: bool = True) -> float:
    """Power of the two-sided t test at level alpha to detect a true difference `effect` with n seeds (per group):
    paired, `sd` is the differences' standard deviation; unpaired (equal groups), each group's."""
    from scipy import integrate, stats

    if n < 2 or sd <= 0:
        return math.nan
    degrees = n - 1 if paired else 2 * n - 2
    noncentrality = effect * math.sqrt(n) / sd if paired else effect / (sd * math.sqrt(2 / n))
    critical = stats.t.ppf(1 - alpha / 2, degrees)

    # T = (Z + noncentrality) / √(V / degrees) with V ~ χ²(degrees): P(|T| > critical) given V, averaged over V's
    # quantiles u in (0, 1), where the integrand is smooth at any degrees of freedom. (scipy's noncentral t returns
    # nan for large noncentralities at few degrees of freedom.)
    def rejected_at(u: float) -> float:
        scale = critical * math.sqrt(stats.chi2.ppf(u, degrees) / degrees)
        return stats.norm.cdf(noncentrality - scale) + stats.norm.cdf(-noncentrality - scale)

    return float(min(1.0, integrate.quad(rejected_at, 0, 1, limit=200)[0]))


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = TARGET_POWER,
                 paired: bool = True) -> Optional[int]:
    """The fewest seeds (per group) at which the t test reaches `power`; None beyond MOST_SEEDS. The search starts
    from the normal approximation, which the t test never needs fewer seeds than (its tails are heavier)."""
    from scipy import stats

    if sd <= 0:
        return 2
    z = stats.norm.isf(alpha / 2) + stats.norm.isf(1 - power)
    approximate = (z * sd / abs(effect)) ** 2 * (1 if paired else 2) if effect else math.inf
    start = max(2, math.floor(approximate)) if approximate < MOST_SEEDS else MOST_SEEDS + 1
    return next((n for n in range(start, MOST_SEEDS + 1) if t_test_power(n, effect, sd, alpha, paired) >= power), None)


def obrien_fleming_spent(fraction: float, alpha: float = ALPHA) -> float:
    """Lan–DeMets' O'Brien–Fleming-type spending function: the two-sided α spent by information fraction t,
    2 − 2Φ(z_{1−α/2} / √t)."""
    from scipy import stats

    return float(2 * stats.norm.sf(stats.norm.isf(alpha / 2) / math.sqrt(fraction)))


def sequential_levels(looks: list[int], alpha: float = ALPHA) -> list[float]:
    """The nominal two-sided p-value at or below which each look rejects, for looks at these numbers of seeds (the
    last is the whole design): boundaries c_k on the z scale with P(reject by look k | H0) equal to the spending
    function at n_k / n_K, the looks' statistics correlated as √(n_j / n_k)."""
    from scipy import optimize, stats

    if sorted(set(looks)) != list(looks) or looks[0] < 2:
        raise ValueError(f"looks must grow and start at 2 seeds or more (got {looks})")
    fractions = [n / looks[-1] for n in looks]
    bounds: list[float] = []
    for k, fraction in enumerate(fractions):
        target = obrien_fleming_spent(fraction, alpha)
        if k == 0:
            bounds.append(float(stats.norm.isf(target / 2)))
            continue
        covariance = np.array([[math.sqrt(min(f, g) / max(f, g)) for g in fractions[:k + 1]]
                               for f in fractions[:k + 1]])

        def rejected_by_now(bound: float) -> float:
            inside = np.array(bounds + [bound])
            return 1 - float(stats.multivariate_normal(np.zeros(k + 1), covariance, seed=0).cdf(
                inside, lower_limit=-inside))

        bounds.append(float(optimize.brentq(lambda bound: rejected_by_now(bound) - target, 0.5, 10, xtol=1e-6)))
    return [float(2 * stats.norm.sf(bound)) for bound in bounds]


@dataclass(frozen=True)
class SequentialRule:
    """Looks at these numbers of seeds per group, an O'Brien–Fleming-type boundary for the overall alpha; at each
    look a comparison separates, is equivalent within ±margin, goes on to the next look, or (at the last) stays
    inconclusive."""
    looks: tuple[int, ...]
    alpha: float = ALPHA

    def levels(self) -> list[float]:
        return sequential_levels(list(self.looks), self.alpha)

    def verdict(self, difference: PairedDifference) -> str:
        """The rule's decision for a comparison's (Holm-adjusted) paired t and TOST p-values at its number of
        pairs."""
        if difference.pairs not in self.looks:
            return f"between looks ({difference.pairs} pairs; looks at {', '.join(map(str, self.looks))})"
        look = self.looks.index(difference.pairs)
        level = self.levels()[look]
        p_t, _, p_tost = difference.adjusted or difference.p_values
        if p_t <= level:
            return f"separates (look {look + 1}, p ≤ {level:.3g})"
        if p_tost <= level:
            return f"equivalent within ±{100 * difference.margin:g} (look {look + 1}, p ≤ {level:.3g})"
        if look + 1 < len(self.looks):
            return f"{self.looks[look + 1] - difference.pairs} more seeds in both groups (look {look + 1})"
        return f"inconclusive (last look, p > {level:.3g})"
