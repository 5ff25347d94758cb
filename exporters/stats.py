"""Statistics for gates judged on a sample: is an accuracy drop real, or a few noisy images?

Both models classify the same n labeled images, so the comparison is paired: only the images on
which exactly one of them is right carry information (b = reference right and artifact wrong,
c = the reverse). `paired_drop` reports, for the drop = reference accuracy - artifact accuracy
= (b - c) / n:

- its 95 % confidence interval, Newcombe's hybrid score interval for paired proportions
  (Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions
  based on paired data", Stat. Med. 17:2635, method 10, with his continuity-adjusted correlation
  phi*). It keeps near-nominal coverage at small n and at accuracies near 1, where the Wald
  interval collapses to zero width. Written here (15 lines) because no dependency we have
  offers it: scipy has none, statsmodels' released versions only the independent-samples one;
- the exact McNemar test (two-sided binomial test of b out of b + c at 1/2, scipy).

The judgement (`DropStats.exceeds`): a drop fails a budget only when the data show it is over
the budget, i.e. the interval's lower bound is above it. Why the interval and not McNemar alone:
McNemar tests "no drop at all", so with thousands of images it flags a true 0.3-point drop that a
1-point budget allows; the bound tests the budget itself (with a budget of 0 the two agree, at
the one-sided 2.5 % level). Why not the point estimate: one flipped image in 40 is a
2.5-point drop with an interval of about [-2, 11] points, which is noise, not evidence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest, norm


@dataclass(frozen=True)
class DropStats:
    """The paired comparison of two classifiers' correctness on the same n images."""

    n: int
    b: int  # reference right, artifact wrong
    c: int  # reference wrong, artifact right
    drop: float  # (b - c) / n, the point estimate (fraction; 0.01 = 1 point)
    low: float  # 95 % interval of the drop (Newcombe)
    high: float
    mcnemar_p: float  # exact McNemar, two-sided
    confidence: float = 0.95

    def exceeds(self, budget: float) -> bool:
        """True when the data show the drop is over `budget`: the interval's lower bound is above it."""
        return self.low > budget + 1e-12

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"drop {self.drop * 100:+.2f} points, 95% CI [{self.low * 100:+.2f}, {self.high * 100:+.2f}], "
                f"{self.b} lost / {self.c} gained of {self.n}, McNemar p={self.mcnemar_p:.3g}")


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def agreement_interval(agree: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of a top-1 agreement rate. A floor fails only when the upper bound is below it, so
    a floor of 1.0 still fails on any flip, and a broken artifact fails on a few dozen images."""
    return wilson(agree, n, float(norm.ppf(0.5 + confidence / 2)))


def paired_drop(reference_correct: np.ndarray, artifact_correct: np.ndarray, confidence: float = 0.95) -> DropStats:
    """Drop in accuracy from reference to artifact on the same images, with its interval and McNemar's p."""
    r = np.asarray(reference_correct, dtype=bool)
    a = np.asarray(artifact_correct, dtype=bool)
    n = int(r.size)
    both, b, c = int((r & a).sum()), int((r & ~a).sum()), int((~r & a).sum())
    neither = n - both - b - c
    if n == 0:
        return DropStats(0, 0, 0, 0.0, -1.0, 1.0, 1.0, confidence)
    z = float(norm.ppf(0.5 + confidence / 2))
    p1, p2 = (both + b) / n, (both + c) / n
    l1, u1 = wilson(both + b, n, z)
    l2, u2 = wilson(both + c, n, z)
    # phi*: the correlation of the two classifications, continuity-adjusted as Newcombe recommends.
    denom = (both + b) * (c + neither) * (both + c) * (b + neither)
    cross = both * neither - b * c
    adj = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = adj / math.sqrt(denom) if denom > 0 else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    p = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return DropStats(n, b, c, d, low, high, p, confidence)
