"""``--benchmark-compare-fail`` on a vicuna-bench perf record, judged as the nightly and ``--perf-baseline`` judge.

pytest-benchmark checks each record against the compared saved run with the
checks the option parsed (``mean:10%``, ``median:0.001``).  On a perf record
of this plugin (its ``extra_info`` says what was ``measured``) each check is
judged by :func:`vicuna_bench.stats.judge_change` instead: slower only when
the field's level moved past the band *and*, where both runs kept enough
rounds for the rank test (``--benchmark-save-data``), the rounds moved that
way.  Other records keep pytest-benchmark's own rule.
"""

from __future__ import annotations

LOCATION_FIELDS = ("min", "max", "mean", "median")  # a rank test of the rounds speaks to these; spread fields: levels


class StatsJudgedCheck:
    """One parsed ``--benchmark-compare-fail`` check, with pytest-benchmark's ``fails(current, compared)`` call."""

    def __init__(self, check):
        self.check = check
        self.field = check.field
        self.threshold = check.threshold

    def band(self, level_a: float) -> float:
        """The check's threshold as a fraction of the compared level (``10%`` -> 0.10; ``0.001`` s -> 0.001 / A)."""
        from pytest_benchmark.utils import PercentageRegressionCheck

        if isinstance(self.check, PercentageRegressionCheck):
            return self.threshold / 100
        return self.threshold / level_a if level_a > 0 else float("inf")

    def fails(self, current, compared) -> str | None:
        """None when not slower; else one line: the field, both levels, the ratio and how it was judged."""
        if "measured" not in (getattr(current, "extra_info", None) or {}):
            return self.check.fails(current, compared)
        from ..stats import judge_change, min_p

        level_b, level_a = float(current[self.field]), float(compared[self.field])
        b, a = list(current.stats.data), list(compared.get("data") or [])
        alpha = 0.001
        sampled = self.field in LOCATION_FIELDS and a and b and min_p(len(b), len(a)) < alpha
        change = judge_change(b if sampled else None, a if sampled else None, self.band(level_a),
                              level_b=level_b, level_a=level_a, alpha=alpha)
        if change.word != "slower":
            return None
        how = f"rank test p={change.p_value:.2g}" if change.p_value is not None else "band alone (too few rounds kept)"
        return (f"{current.extra_info['measured']} {self.field} {level_b * 1e3:.3f} ms vs {level_a * 1e3:.3f} ms "
                f"({change.ratio:.2f}x, over the {self.band(level_a):.0%} band; {how})")


def judge_with_stats(config) -> None:
    """Route every parsed ``--benchmark-compare-fail`` check through :class:`StatsJudgedCheck` (before
    pytest-benchmark reads them in its own, last, ``pytest_configure``)."""
    checks = getattr(config.option, "benchmark_compare_fail", None)
    if checks:
        config.option.benchmark_compare_fail = [StatsJudgedCheck(c) for c in checks]
