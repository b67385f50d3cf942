"""Summaries of repeated measurements: mean, standard deviation and 95 % confidence intervals.

- seed_summary: over runs with different seeds (Student's t interval for the mean: mean +- t * s / sqrt(n),
  s the sample standard deviation with n - 1 in the denominator); it describes the spread that comes from
  the seed (initial weights, batch order, k-means start), not the sampling of the test images;
- wilson_interval: over the test images of one run (a binomial proportion), the uncertainty that comes
  from having only so many test images.
"""
import math

# two-sided 95 % quantiles of Student's t, t_{0.975}(df), for df = 1..30
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t975(df):
    """t_{0.975} with df degrees of freedom: a table up to 30, then the Cornish-Fisher expansion
    around the normal quantile (error below 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def seed_summary(values):
    """Values from n runs (one per seed) -> {n, mean, std, ci95: [low, high], values}. With one run the
    standard deviation and interval are None (nothing to estimate them from)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None, "values": values}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": values}


def wilson_interval(correct, total, z=_Z975):
    """95 % Wilson score interval for a proportion correct / total -> [low, high]."""
    if total <= 0:
        raise ValueError("no trials")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [centre - half, centre + half]
