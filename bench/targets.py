"""The speed-target check that ends a benchmark file: ratios measured in this one process.

The machines are shared and noisy: their speed drifts by up to 2x over seconds, so two minima
taken a few seconds apart (one pytest-benchmark test after another) can disagree by more than a
target's margin. The targets are therefore timed again here, :func:`interleaved_best`: every
implementation a ratio compares is timed in turn, batch by batch, so that each sees the same
phases of the machine, and the best batch of each counts.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

import pytest

#: (description, measured ratio, bound, True if the ratio must be at most the bound)
Ratio = tuple[str, float, float, bool]


def interleaved_best(steps: Mapping[str, Callable[[], object]], *, rounds: int = 30,
                     batch_seconds: float = 2e-3) -> dict[str, float]:
    """Best seconds per call of each step, timed round-robin.

    Each step runs in batches of about ``batch_seconds`` (at least one call), so that the timer's
    resolution and a call's fixed costs do not dominate small steps; each round times one batch
    of every step, in turn. Steps are called once first to warm them up.
    """
    batches = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        step()
        once = max(time.perf_counter() - start, 1e-9)
        batches[name] = max(1, int(batch_seconds / once))
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            calls = batches[name]
            start = time.perf_counter()
            for _ in range(calls):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def check_targets(benchmark, request, ratios: Callable[[], list[Ratio]]) -> None:
    """Compute the ratios, print them, record them in extra_info and fail on a missed target.

    The computation goes through the benchmark fixture (one round, no timing of interest) so
    that --benchmark-only, which skips tests without the fixture, runs it.
    """
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("needs timings: run with --benchmark-only")
    benchmark.group = "speed targets (ratios of interleaved timings)"
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
