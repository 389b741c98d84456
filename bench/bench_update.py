"""The fused update against the NumPy formula, the reference and the roofline.

``pytest bench --benchmark-only`` times every implementation at each size (``benchmark.group``
is one table per size, dtype and variant) and records bytes moved, GB/s and the fraction of the
roofline in ``extra_info``. The last test reads this session's timings and checks the speed
targets as ratios measured in this one process (the machines are noisy, so never absolute times).
With ``--benchmark-disable`` the same file is a quick smoke test: every implementation runs once.
"""
from __future__ import annotations

import numpy as np
import pytest

from implementations import IMPLEMENTATIONS, VARIANTS, bytes_moved, make

SIZES = [10**3, 10**5, 10**7]
LARGE_SIZES = [10**8]
DTYPES = [np.float32, np.float64]
_results: dict[tuple, float] = {}  # (impl, variant, dtype name, n) -> best seconds per step


def _sizes(config):
    return SIZES + (LARGE_SIZES if config.getoption("--bench-large") else [])


def pytest_generate_tests(metafunc):
    if "n" in metafunc.fixturenames:
        metafunc.parametrize("n", _sizes(metafunc.config), ids=lambda n: f"n=1e{len(str(n)) - 1}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_update(benchmark, name, variant, dtype, n):
    if n >= 10**7 and name in ("numpy-reference",) and np.dtype(dtype).itemsize == 8:
        pytest.skip("the multi-pass reference at this size adds minutes and no information")
    try:
        step = make(name, variant, dtype, n)
    except LookupError as exc:
        pytest.skip(str(exc))
    step()  # compile / warm up outside the timing
    dtype_name = np.dtype(dtype).name
    benchmark.group = f"{variant} {dtype_name} n={n:.0e}"
    benchmark.extra_info["bytes_moved"] = bytes_moved(variant, dtype, n)
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    best = stats.stats.min
    _results[(name, variant, dtype_name, n)] = best
    benchmark.extra_info["GB/s"] = round(bytes_moved(variant, dtype, n) / best / 1e9, 2)
    roof = _results.get(("roofline-c", variant, dtype_name, n))
    if roof:
        benchmark.extra_info["fraction_of_roofline"] = round(roof / best, 3)


# Speed targets (issue: core): (numerator impl, denominator impl, variant, n, minimum ratio).
# ratio = time(numerator) / time(denominator), on float32.
TARGETS = [(f"roofline-c", impl, variant, 10**7, 0.90)
           for impl in ("c", "numba") for variant in VARIANTS] + \
          [("numpy-formula", impl, variant, 10**7, 8.0) for impl in ("c", "numba") for variant in VARIANTS] + \
          [("numpy-formula", "auto", variant, 10**3, 3.0) for variant in VARIANTS]


def test_speed_targets(request):
    """Check the targets as ratios of this session's timings (runs last in this file)."""
    if request.config.getoption("benchmark_disable", False) or not _results:
        pytest.skip("needs timings: run with --benchmark-only")
    lines, missed = [], []
    for numerator, denominator, variant, n, minimum in TARGETS:
        top = _results.get((numerator, variant, "float32", n))
        bottom = _results.get((denominator, variant, "float32", n))
        if top is None or bottom is None:
            continue
        ratio = top / bottom
        verdict = "ok" if ratio >= minimum else "MISSED"
        line = f"{denominator:>8} {variant:>9} n={n:.0e}: {numerator}/{denominator} = {ratio:6.2f} (target >= {minimum})  {verdict}"
        lines.append(line)
        if ratio < minimum:
            missed.append(line)
    print("\n" + "\n".join(lines))
    if not lines:
        pytest.skip("the implementations the targets compare were not run")
    assert not missed, "speed targets missed:\n" + "\n".join(missed)
