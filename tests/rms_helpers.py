"""Shared helpers for the fastrms test suite (plain functions; fixtures live in conftest.py).

The oracle is :func:`fastrms.backends.numpy_reference.reference_step`: it returns new arrays and
writes nothing, so a test can run a backend in place and the reference on copies, step by step.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

import fastrms
from fastrms.backends import availability
from fastrms.backends.numpy_reference import reference_step

BACKENDS = fastrms.BACKEND_NAMES
DTYPES = (np.float32, np.float64)
#: One size above both compiled kernels' parallel threshold (1 << 16), odd so that every
#: thread slice / chunk boundary and the vector remainder loop are exercised.
LARGE = 65536 * 2 + 5
STATE_NAMES = ("param", "square_avg", "momentum_buffer", "grad_avg")
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


# --------------------------------------------------------------------------------------------
# backends


def require_backend(name: str) -> None:
    """Skip the calling test, with the registry's reason, when ``name`` cannot run here."""
    available, reason = availability(name)
    if not available:
        pytest.skip(f"backend {name!r} unavailable: {reason}")


# --------------------------------------------------------------------------------------------
# bit comparison


def bit_mismatches(actual, expected) -> np.ndarray:
    """Boolean mask of elements whose bits differ; any NaN equals any NaN (payload, sign)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    uint = _UINT[actual.dtype.itemsize]
    a = actual.copy(order="C")
    b = expected.copy(order="C")
    same = (a.view(uint) == b.view(uint)) | (np.isnan(a) & np.isnan(b))
    return ~same


def assert_bits_equal(actual, expected, label: str = "") -> None:
    bad = bit_mismatches(actual, expected)
    if bad.any():
        actual = np.asarray(actual)
        expected = np.asarray(expected)
        index = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()
        uint = _UINT[actual.dtype.itemsize]
        got, want = actual[index], expected[index]
        raise AssertionError(
            f"{label}: {int(bad.sum())} of {bad.size} elements differ in their bits; first at "
            f"{index}: got {got!r} (0x{int(np.asarray(got).view(uint)):x}), expected {want!r} "
            f"(0x{int(np.asarray(want).view(uint)):x})")


def assert_state_bits_equal(state: dict, reference: dict, label: str) -> None:
    for name in STATE_NAMES:
        if reference.get(name) is None:
            assert state.get(name) is None, f"{label}: {name} should be unused"
            continue
        assert_bits_equal(state[name], reference[name], f"{label}: {name}")


# --------------------------------------------------------------------------------------------
# option combinations

#: (id, momentum, lr_in_momentum, nesterov). lr_in_momentum with momentum 0 is valid (a no-op).
MOMENTUM_FORMS = (
    ("nomom", 0.0, False, False),
    ("nomom-lrin", 0.0, True, False),
    ("torch", 0.9, False, False),
    ("torch-nest", 0.9, False, True),
    ("lrin", 0.9, True, False),
    ("lrin-nest", 0.9, True, True),
)
#: (id, weight_decay, decoupled_weight_decay). decoupled with weight_decay 0 is valid (a no-op).
DECAY_FORMS = (
    ("nowd", 0.0, False),
    ("nowd-dec", 0.0, True),
    ("coupled", 0.1, False),
    ("decoupled", 0.1, True),
)


def make_options(maximize=False, centered=False, eps_in_sqrt=False, momentum_form="nomom",
                 decay_form="nowd", lr=0.01, alpha=0.9, eps=1e-8) -> dict:
    _, momentum, lr_in_momentum, nesterov = next(m for m in MOMENTUM_FORMS if m[0] == momentum_form)
    _, weight_decay, decoupled = next(d for d in DECAY_FORMS if d[0] == decay_form)
    return dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                centered=centered, maximize=maximize, eps_in_sqrt=eps_in_sqrt,
                lr_in_momentum=lr_in_momentum, nesterov=nesterov,
                decoupled_weight_decay=decoupled)


def all_option_combinations():
    """Every valid combination: (id, options). 2 * 2 * 2 * 6 * 4 = 192."""
    combos = []
    for maximize, centered, eps_in_sqrt, (mform, *_), (dform, *_) in itertools.product(
            (False, True), (False, True), (False, True), MOMENTUM_FORMS, DECAY_FORMS):
        ident = (f"{'max' if maximize else 'min'}-{'cen' if centered else 'unc'}-"
                 f"{'insqrt' if eps_in_sqrt else 'outsqrt'}-{mform}-{dform}")
        combos.append((ident, make_options(maximize, centered, eps_in_sqrt, mform, dform)))
    return combos


ALL_COMBOS = all_option_combinations()

#: The combinations also run above the parallel threshold: plain, momentum and centered (the
#: three variants), plus every option at least once.
LARGE_COMBOS = (
    ("plain", make_options()),
    ("momentum", make_options(momentum_form="torch")),
    ("centered", make_options(centered=True)),
    ("centered-momentum-all", make_options(True, True, True, "lrin-nest", "coupled")),
    ("torch-nest-decoupled", make_options(momentum_form="torch-nest", decay_form="decoupled")),
    ("lrin-insqrt-decoupled", make_options(eps_in_sqrt=True, momentum_form="lrin",
                                           decay_form="decoupled")),
    ("max-coupled-centered", make_options(maximize=True, centered=True, decay_form="coupled")),
)


# --------------------------------------------------------------------------------------------
# data


def special_values(dtype) -> np.ndarray:
    """Zeros of both signs, subnormals, the extremes, infinities and NaN."""
    fi = np.finfo(dtype)
    values = [0.0, -0.0, 1.0, -1.0, 0.5, -3.0, fi.smallest_subnormal, -fi.smallest_subnormal,
              fi.tiny, -fi.tiny, fi.max, -fi.max, np.inf, -np.inf, np.nan, fi.eps, -fi.eps,
              1e-20, -1e-20, 1e20, -1e20, np.sqrt(fi.max), -np.sqrt(fi.max), np.sqrt(fi.tiny),
              7.25, -0.125, 1e-3, -1e3, 2.0 ** 60, -(2.0 ** -60), 123.456, -0.987]
    return np.array(values, dtype=np.float64).astype(dtype)


def random_values(rng, shape, dtype, scale_decades=3) -> np.ndarray:
    """Normal values with magnitudes spread over +-scale_decades decades, and some zeros."""
    values = np.array(rng.standard_normal(shape)
                      * 10.0 ** rng.uniform(-scale_decades, scale_decades, shape))
    values[np.asarray(rng.random(shape) < 0.05)] = 0.0
    return values.astype(dtype)


def make_problem(rng, dtype, shape, options, steps=3, special=False):
    """Initial state dict (param, square_avg, momentum_buffer, grad_avg) and ``steps`` gradients.

    With ``special``, 1-D ``shape`` and every array drawn from :func:`special_values`.
    """
    dtype = np.dtype(dtype)
    if special:
        pool = special_values(dtype)

        def draw(nonnegative=False):
            values = rng.choice(pool, size=shape)
            return np.abs(values) if nonnegative else values

        state = {"param": draw(), "square_avg": draw(nonnegative=True),
                 "momentum_buffer": draw() if options["momentum"] else None,
                 "grad_avg": draw() if options["centered"] else None}
        grads = [draw() for _ in range(steps)]
        return state, grads
    state = {
        "param": random_values(rng, shape, dtype, 1),
        "square_avg": np.array(rng.random(shape) * 2).astype(dtype),
        "momentum_buffer": random_values(rng, shape, dtype, 1) if options["momentum"] else None,
        "grad_avg": random_values(rng, shape, dtype, 1) if options["centered"] else None,
    }
    grads = [random_values(rng, shape, dtype) for _ in range(steps)]
    return state, grads


def copy_state(state: dict) -> dict:
    return {k: (None if v is None else np.array(v, copy=True)) for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# running


def reference_update(options: dict, state: dict, grad) -> dict:
    """One reference step; returns a new state dict (writes nothing)."""
    coeffs = fastrms.kernel_coefficients(np.asarray(state["param"]).dtype, **options)
    with np.errstate(all="ignore"):
        p, s, b, a = reference_step(coeffs, state["param"], grad, state["square_avg"],
                                    state["momentum_buffer"], state["grad_avg"])
    return {"param": np.asarray(p), "square_avg": np.asarray(s),
            "momentum_buffer": None if b is None else np.asarray(b),
            "grad_avg": None if a is None else np.asarray(a)}


def backend_update(backend, options: dict, state: dict, grad) -> None:
    with np.errstate(all="ignore"):
        fastrms.rmsprop_update(state["param"], grad, state["square_avg"],
                               momentum_buffer=state["momentum_buffer"],
                               grad_avg=state["grad_avg"], backend=backend, **options)


def check_steps(backend, options, state, grads, label) -> dict:
    """Run ``grads`` through ``backend`` in place on ``state`` and through the reference on a
    copy; assert identical bits after every step. Returns the final reference state."""
    reference = copy_state(state)
    for step, grad in enumerate(grads):
        reference = reference_update(options, reference, grad)
        backend_update(backend, options, state, grad)
        assert_state_bits_equal(state, reference, f"{label}, step {step}")
    return reference


# --------------------------------------------------------------------------------------------
# subprocesses


def clean_env(**extra) -> dict:
    """The environment for a fresh interpreter: no backend or SIMD override unless given."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTRMS_BACKEND", "FASTRMS_SIMD", "FASTRMS_NUMBA_CACHE")}
    env.update(extra)
    return env


def run_python(code: str, env=None, args=(), timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args, *(["-c", code] if code is not None else [])],
                          env=clean_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc
