"""A policy-gradient loop written entirely in Numba, calling ``fastrms.rmsprop_update`` each
step, against the same loop run by Python (bench/embedding_example.py): steps per second.

``pytest bench/bench_embedding.py --benchmark-only`` times both loops on both problems
(``benchmark.group``: one table per problem; ``extra_info``: steps per second), then
``test_speed_targets`` times them again interleaved (bench/targets.py) and prints the
steps per second side by side. With ``--benchmark-disable`` the file is a correctness test:
``test_loops_agree`` checks that the two loops give identical parameters.

``python bench/bench_embedding.py`` prints the same table, and the compile time of a first
call of ``fastrms.rmsprop_update`` from @njit code in fresh processes (Numba's cache empty,
then warm).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import embedding_example as example  # noqa: E402
from targets import check_targets, interleaved_best  # noqa: E402

#: Steps each timed call runs, from the same initial state (so both loops do identical work).
STEPS = {"bandit": 2000, "cartpole": 100}
LOOPS = {"compiled": example.compiled_loop, "python": example.python_loop}
_best: dict[tuple[str, str], float] = {}


def make_run(problem: str, loop: str):
    """A zero-argument callable running STEPS[problem] steps of one loop from a fresh copy of
    the initial state."""
    train = LOOPS[loop][problem]
    theta0, square0, rng0 = example.initial_state(problem)

    def run():
        return train(theta0.copy(), square0.copy(), rng0.copy(), STEPS[problem])
    return run


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("problem", list(STEPS))
def test_loop(benchmark, problem, loop):
    run = make_run(problem, loop)
    run()  # compile outside the timing
    benchmark.group = f"REINFORCE {problem}: {STEPS[problem]} steps, " \
                      f"{example.SIZES[problem]} float32 parameters"
    benchmark(run)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    _best[(problem, loop)] = stats.stats.min
    benchmark.extra_info["steps_per_second"] = round(STEPS[problem] / stats.stats.min)


def test_loops_agree():
    """The compiled loop and the Python loop give the same parameters, bit for bit."""
    for problem in STEPS:
        results = {}
        for loop in LOOPS:
            theta, square, rng = example.initial_state(problem)
            LOOPS[loop][problem](theta, square, rng, 50 if problem == "bandit" else 10)
            results[loop] = theta.tobytes() + square.tobytes() + rng.tobytes()
        assert results["compiled"] == results["python"], problem


def steps_per_second(rounds: int = 15) -> dict[str, dict[str, float]]:
    """Steps per second of each loop on each problem, timed interleaved."""
    table = {}
    for problem in STEPS:
        runs = {loop: make_run(problem, loop) for loop in LOOPS}
        best = interleaved_best(runs, rounds=rounds, batch_seconds=0.05)
        table[problem] = {loop: STEPS[problem] / seconds for loop, seconds in best.items()}
    return table


def _ratios():
    if not _best:
        return []
    table = steps_per_second()
    lines = [f"{problem:>8}: compiled {row['compiled']:10.0f} steps/s, python "
             f"{row['python']:10.0f} steps/s" for problem, row in table.items()]
    print("\n" + "\n".join(lines))
    # The loop in Numba must not lose to the same loop in Python.
    return [(f"{problem}: compiled / python steps per second", row["compiled"] / row["python"],
             1.0, False) for problem, row in table.items()]


def test_speed_targets(benchmark, request):
    """Steps per second side by side, timed interleaved (runs last in this file)."""
    check_targets(benchmark, request, _ratios)


FIRST_CALL = r"""
import json, time
t0, c0 = time.perf_counter(), time.process_time()
import numba, numpy as np
import fastrms
from fastrms import backends
backends.load("numba")
t1, c1 = time.perf_counter(), time.process_time()

@numba.njit
def warm_up(x):
    return x + 1

warm_up(1)  # Numba's own one-time start-up, paid by any first compilation
t2, c2 = time.perf_counter(), time.process_time()

@numba.njit
def step(p, g, s):
    fastrms.rmsprop_update(p, g, s, lr=0.01)

step(np.ones(10, np.float32), np.ones(10, np.float32), np.zeros(10, np.float32))
t3, c3 = time.perf_counter(), time.process_time()
print(json.dumps({"import": [t1 - t0, c1 - c0], "numba_start": [t2 - t1, c2 - c1],
                  "first_call": [t3 - t2, c3 - c2]}))
"""


def first_call_seconds() -> dict[str, dict]:
    """Compile time of a first call from @njit code, in fresh processes: Numba's cache empty
    (fastrms's compiled checks and loop compile too), then warm (only the caller compiles)."""
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                   PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for label in ("cold cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, check=True,
                                 capture_output=True, text=True, timeout=900).stdout
            results[label] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    for label, times in first_call_seconds().items():
        print(f"first call from @njit code, {label}: "
              + ", ".join(f"{what} {wall:.2f} s (CPU {cpu:.2f} s)"
                          for what, (wall, cpu) in times.items()))
    for problem, row in steps_per_second().items():
        print(f"{problem:>8}: compiled loop {row['compiled']:10.0f} steps/s, python loop "
              f"{row['python']:10.0f} steps/s, {row['compiled'] / row['python']:.1f}x")


if __name__ == "__main__":
    main()
