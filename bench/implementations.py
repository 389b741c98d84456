"""What the benchmarks time: the NumPy formula, the reference, each backend, the automatic
choice and the roofline kernels, all with one calling convention: ``make(variant, dtype, n)``
returns a zero-argument callable that performs one step on arrays it owns."""
from __future__ import annotations

import numpy as np

import fastrms
from fastrms import backends
from fastrms._coefficients import CENTERED, MOMENTUM

LR, ALPHA, EPS, MOMENTUM_VALUE = 1e-3, 0.99, 1e-8, 0.9
VARIANTS = {"plain": {}, "momentum": {"momentum": MOMENTUM_VALUE}, "centered": {"centered": True}}
_STREAM_BYTES = {"plain": 5, "momentum": 7, "centered": 7}  # streams read + written per element


def bytes_moved(variant: str, dtype, n: int) -> int:
    return _STREAM_BYTES[variant] * np.dtype(dtype).itemsize * n


def make_state(variant: str, dtype, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    state = {"param": rng.standard_normal(n).astype(dtype),
             "grad": rng.standard_normal(n).astype(dtype),
             "square_avg": np.abs(rng.standard_normal(n)).astype(dtype)}
    if variant == "momentum":
        state["momentum_buffer"] = np.zeros(n, dtype)
    if variant == "centered":
        state["grad_avg"] = np.zeros(n, dtype)
    return state


def numpy_formula(variant: str, state: dict):
    """The straightforward NumPy formula, written as in SPEC.md's seed example: whole-array
    expressions, new temporaries, the state rebound."""
    p, g = state["param"], state["grad"]

    def step():
        s = state["square_avg"] = ALPHA * state["square_avg"] + (1 - ALPHA) * g * g
        if variant == "centered":
            a = state["grad_avg"] = ALPHA * state["grad_avg"] + (1 - ALPHA) * g
            s = s - a * a
        if variant == "momentum":
            b = state["momentum_buffer"] = MOMENTUM_VALUE * state["momentum_buffer"] + g / (np.sqrt(s) + EPS)
            p[...] -= LR * b
        else:
            p[...] -= LR * g / (np.sqrt(s) + EPS)
    return step


def fastrms_call(variant: str, state: dict, backend: str | None):
    kwargs = dict(VARIANTS[variant], lr=LR, alpha=ALPHA, eps=EPS, backend=backend)
    arrays = dict(state)

    def step():
        fastrms.rmsprop_update(**arrays, **kwargs)
    return step


def roofline_call(variant: str, state: dict, backend: str):
    module = backends.load(backend)
    flags = {"plain": 0, "momentum": MOMENTUM, "centered": CENTERED}[variant]
    arrays = (state["param"], state["grad"], state["square_avg"], state.get("momentum_buffer"),
              state.get("grad_avg"))

    def step():
        module.roofline(flags, *arrays)
    return step


IMPLEMENTATIONS = {
    "numpy-formula": lambda variant, state: numpy_formula(variant, state),
    "numpy-reference": lambda variant, state: fastrms_call(variant, state, "numpy"),
    "c": lambda variant, state: fastrms_call(variant, state, "c"),
    "numba": lambda variant, state: fastrms_call(variant, state, "numba"),
    "auto": lambda variant, state: fastrms_call(variant, state, None),
    "roofline-c": lambda variant, state: roofline_call(variant, state, "c"),
    "roofline-numba": lambda variant, state: roofline_call(variant, state, "numba"),
}
REQUIRES = {"c": "c", "numba": "numba", "roofline-c": "c", "roofline-numba": "numba"}


def make(name: str, variant: str, dtype, n: int):
    """A zero-argument step for implementation ``name``, or raise LookupError if unavailable."""
    needed = REQUIRES.get(name)
    if needed is not None:
        available, reason = backends.availability(needed)
        if not available:
            raise LookupError(reason)
    return IMPLEMENTATIONS[name](variant, make_state(variant, dtype, n))
