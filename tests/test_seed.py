"""SPEC.md's seed example: a check any implementation must pass, on every backend.

float64, eps_in_sqrt=True, lr 0.01, alpha 0.9, eps 1e-8, square_avg starting at 0:
theta [0.2, 0.4, 0.6], gradient [-0.5, 0.3, 0.24] gives theta [0.23162277, 0.36837724, 0.56837725].
"""
from __future__ import annotations

import numpy as np

import fastrms

from rms_helpers import assert_bits_equal, reference_update

EXPECTED = np.array([0.23162277, 0.36837724, 0.56837725])
OPTIONS = dict(lr=0.01, alpha=0.9, eps=1e-8, eps_in_sqrt=True)


def test_seed_example(backend):
    theta = np.array([0.2, 0.4, 0.6], dtype=np.float64)
    grad = np.array([-0.5, 0.3, 0.24], dtype=np.float64)
    square_avg = np.zeros(3, dtype=np.float64)
    fastrms.rmsprop_update(theta, grad, square_avg, backend=backend, **OPTIONS)
    np.testing.assert_array_equal(theta.round(8), EXPECTED)
    np.testing.assert_allclose(theta, EXPECTED, rtol=0, atol=5e-9)
    # After one step from zero the accumulator is (1 - alpha) * g * g.
    np.testing.assert_allclose(square_avg, 0.1 * grad * grad, rtol=1e-15)
    # And the reference's bits.
    start = {"param": np.array([0.2, 0.4, 0.6]), "square_avg": np.zeros(3),
             "momentum_buffer": None, "grad_avg": None}
    expected = reference_update(OPTIONS, start, grad)
    assert_bits_equal(theta, expected["param"], "theta")
    assert_bits_equal(square_avg, expected["square_avg"], "square_avg")


def test_seed_example_is_the_documented_math():
    """The expected numbers follow from SPEC.md's equations in plain float64 arithmetic."""
    theta = np.array([0.2, 0.4, 0.6])
    grad = np.array([-0.5, 0.3, 0.24])
    s = 0.9 * 0.0 + (0.1 * grad) * grad
    theta = theta + (-0.01 * grad) / np.sqrt(s + 1e-8)
    np.testing.assert_array_equal(theta.round(8), EXPECTED)
