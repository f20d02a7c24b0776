"""Goodness-of-fit of sampled token sequences against an exact law (no scipy needed).

Pearson's chi-square statistic over the enumerated outcomes, with the outcomes whose
expected count is below 5 pooled into one cell (and that cell folded into the smallest
regular one if it is still below 5). The threshold is the (1 - alpha) quantile of the
chi-square law with (cells - 1) degrees of freedom, by the Wilson-Hilferty approximation

    q(k, 1 - alpha) ~= k * (1 - 2/(9k) + z * sqrt(2/(9k)))**3,   z = Phi^-1(1 - alpha),

which is accurate to well under 1 % for k >= 3 at these tail levels. An outcome with exact
probability 0 that shows up even once fails the check outright (statistic = inf).
The total-variation distance is reported too, as a readable effect size.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist

ALPHA = 1e-4  # false alarm rate of one check; seeds are fixed, so the verdicts are reproducible


@dataclass
class Fit:
    statistic: float
    dof: int
    threshold: float
    tv: float  # total-variation distance between the empirical and the exact law
    n: int

    @property
    def ok(self) -> bool:
        return self.statistic <= self.threshold

    def __str__(self) -> str:
        return (
            f"chi2 = {self.statistic:.1f} on {self.dof} dof (threshold {self.threshold:.1f} at alpha {ALPHA}), "
            f"TV = {self.tv:.4f}, n = {self.n}"
        )


def chi2_quantile(dof: int, alpha: float = ALPHA) -> float:
    """Wilson-Hilferty approximation of the (1 - alpha) quantile of chi-square(dof)."""
    z = NormalDist().inv_cdf(1 - alpha)
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def fit(samples, exact: dict, alpha: float = ALPHA) -> Fit:
    """Compare samples (an iterable of hashable outcomes) with `exact` (outcome -> probability)."""
    counts = Counter(samples)
    n = sum(counts.values())
    total = sum(exact.values())
    assert abs(total - 1) < 1e-4, f"the exact law sums to {total}"
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in set(counts) | set(exact))
    if any(exact.get(k, 0.0) <= 0 for k in counts):
        return Fit(statistic=math.inf, dof=1, threshold=chi2_quantile(1, alpha), tv=tv, n=n)
    cells = sorted(((n * p, counts.get(k, 0)) for k, p in exact.items() if p > 0), reverse=True)
    regular = [c for c in cells if c[0] >= 5]
    small = [c for c in cells if c[0] < 5]
    if small:
        pooled = (sum(e for e, _ in small), sum(o for _, o in small))
        if pooled[0] >= 5 or not regular:
            regular.append(pooled)
        else:
            e, o = regular.pop()
            regular.append((e + pooled[0], o + pooled[1]))
    assert len(regular) >= 2, "too few samples for a chi-square test"
    statistic = sum((o - e) ** 2 / e for e, o in regular)
    dof = len(regular) - 1
    return Fit(statistic=statistic, dof=dof, threshold=chi2_quantile(dof, alpha), tv=tv, n=n)
