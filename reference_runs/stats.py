"""The statistics of reference_runs/README.md: Student's t, paired over seeds.

A comparison of two methods pairs their runs by seed (the same world sample, and for RIEL methods
the same SFT start). Its interval is the mean difference ± t(0.975, n − 1) · s / √n over the n
seeds' differences, the textbook paired t interval; its two-sided p-value comes from the same t.
No scipy: the t distribution's CDF is the regularized incomplete beta function, evaluated here by
its continued fraction (Lentz's method), and the quantile by bisection on the CDF.
"""
import math


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function I_x(a, b), modified Lentz."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for 0 <= x <= 1."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):  # where the fraction converges fast; else use the symmetry
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (bisection; p in (0, 1))."""
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_t(diffs: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, low, high, two-sided p) of the paired differences, t at len(diffs) − 1 degrees of
    freedom. With one difference the interval is undefined (nan). Differences that are all equal
    (to float noise: they are differences of k/n fractions) give the point interval and p = 0,
    or p = 1 when they are all 0."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd < 1e-12 * max(1.0, abs(mean)):
        return mean, mean, mean, (1.0 if mean == 0 else 0.0)
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    p = 2 * (1 - t_cdf(abs(mean) / se, n - 1))
    return mean, mean - half, mean + half, p
