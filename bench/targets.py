"""The speed-target check that ends a benchmark file: ratios of this session's best timings."""
from __future__ import annotations

from typing import Callable

import pytest

#: (description, measured ratio, bound, True if the ratio must be at most the bound)
Ratio = tuple[str, float, float, bool]


def check_targets(benchmark, request, ratios: Callable[[], list[Ratio]]) -> None:
    """Compute the ratios, print them, record them in extra_info and fail on a missed target.

    The computation goes through the benchmark fixture (one round, no timing of interest) so
    that --benchmark-only, which skips tests without the fixture, runs it.
    """
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("needs timings: run with --benchmark-only")
    benchmark.group = "speed targets (ratios of the timings above)"
    measured = benchmark.pedantic(ratios, rounds=1, iterations=1)
    if not measured:
        pytest.skip("the implementations the targets compare were not run")
    lines = []
    for what, ratio, bound, at_most in measured:
        met = ratio <= bound if at_most else ratio >= bound
        lines.append(f"{what} = {ratio:6.2f} (target {'<=' if at_most else '>='} {bound})  "
                     f"{'ok' if met else 'MISSED'}")
    benchmark.extra_info["ratios"] = {what: round(ratio, 3) for what, ratio, _, _ in measured}
    print("\n" + "\n".join(lines))
    missed = [line for line in lines if line.endswith("MISSED")]
    assert not missed, "speed targets missed:\n" + "\n".join(missed)
