"""The embedding example (bench/embedding_example.py, docs/embedding.md): REINFORCE written
entirely in Numba and calling ``fastrms.rmsprop_update`` each step gives the same parameters,
bit for bit, as the same loop run by Python; and it learns."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from fastrms import backends

pytestmark = pytest.mark.skipif(not backends.availability("numba")[0],
                                reason=f"numba unavailable: {backends.availability('numba')[1]}")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "bench" / "embedding_example.py"


@pytest.fixture(scope="module")
def example():
    if not EXAMPLE.exists():
        pytest.skip("not a source tree")
    spec = importlib.util.spec_from_file_location("embedding_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("problem,steps", [("bandit", 300), ("cartpole", 20)])
def test_compiled_and_python_loops_give_identical_parameters(example, problem, steps):
    states = {}
    for loop in ("compiled", "python"):
        theta, square_avg, rng = example.initial_state(problem)
        loops = example.compiled_loop if loop == "compiled" else example.python_loop
        mean = loops[problem](theta, square_avg, rng, steps)
        states[loop] = (theta.tobytes(), square_avg.tobytes(), rng.tobytes(), mean)
    assert states["compiled"] == states["python"]


def test_the_bandit_policy_learns(example):
    theta, square_avg, rng = example.initial_state("bandit")
    first = example.compiled_loop["bandit"](theta, square_avg, rng, 2000)
    later = example.compiled_loop["bandit"](theta, square_avg, rng, 2000)
    assert first > 0.3 and later > first and np.isfinite(theta).all()  # a random policy: 0
