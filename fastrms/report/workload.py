"""The problem every row of the bench report solves: hyperparameters, variants, streams, state.

The hyperparameters are torch's defaults with lr 1e-3: lr=1e-3, alpha=0.99, eps=1e-8, and
momentum=0.9 for the momentum variant. Rows step one shared state over and over with one fixed
gradient; :func:`make_state` draws it and :class:`StateGuard` keeps it valid (see there).

A 16-bit problem (bfloat16, float16) has 16-bit param and grad and float32 state, as
:func:`fastrms.rmsprop_update` takes them: 14 bytes per element for the plain variant.

A row may keep its state in a compact format (:data:`STATE_FORMATS`): bfloat16 arrays, or
:class:`fastrms.Blockwise8` buffers (one byte per element and a float32 scale per 256), made
from the shared float32 state; the bytes it moves are counted in that format.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from .._codecs import LOW_PRECISION_DTYPES

LR, ALPHA, EPS, MOMENTUM_VALUE = 1e-3, 0.99, 1e-8, 0.9
#: variant -> the keyword arguments of fastrms.rmsprop_update that make it.
VARIANTS: dict[str, dict] = {"plain": {}, "momentum": {"momentum": MOMENTUM_VALUE},
                             "centered": {"centered": True}}
#: Streams read + written per element: plain reads p, g, s and writes p, s; momentum and
#: centered add one buffer each, read and written.
STREAMS: dict[str, int] = {"plain": 5, "momentum": 7, "centered": 7}
#: The state formats a row can keep, and the bytes one element of one state stream takes.
STATE_FORMATS = ("float32", "bfloat16", "blockwise8")
_STATE_BYTES = {"bfloat16": 2, "blockwise8": 1 + 4 / 256}
#: Steps of the centered variant on one state before it must be restored (see StateGuard).
CENTERED_STEPS_BETWEEN_RESETS = 1000


def bytes_moved(variant: str, dtype: DTypeLike, n: int, state_format: str = "float32"):
    """Bytes one step must move at least: streams x itemsize x n (a 16-bit problem: three
    16-bit streams, read p and g, write p, and the float32 state's; a compact state format:
    its bytes per state element; a float for blockwise8, whose scales are 1/64 byte each)."""
    dtype = np.dtype(dtype)
    state = STREAMS[variant] - 3  # each state buffer is read and written
    if state_format != "float32":
        return int(3 * dtype.itemsize * n + round(state * _STATE_BYTES[state_format] * n))
    if dtype in LOW_PRECISION_DTYPES:
        return (3 * 2 + state * 4) * n
    return STREAMS[variant] * dtype.itemsize * n


def state_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype of the state arrays of a problem in ``dtype`` (float32 for 16-bit ones)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype in LOW_PRECISION_DTYPES else dtype


def make_state(variant: str, dtype: DTypeLike, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays for one step of ``variant``: random param and grad, positive square_avg."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    wide = state_dtype(dtype)
    state = {"param": rng.standard_normal(n).astype(dtype),
             "grad": rng.standard_normal(n).astype(dtype),
             "square_avg": np.abs(rng.standard_normal(n)).astype(wide) + np.asarray(1e-3, wide)}
    if variant == "momentum":
        state["momentum_buffer"] = np.zeros(n, wide)
    if variant == "centered":
        state["grad_avg"] = np.zeros(n, wide)
    return state


class StateGuard:
    """Keeps a shared state valid while rows step it with one fixed gradient.

    With a fixed gradient g the centered variance estimate ``s - a*a`` decays like alpha^k
    towards zero, and once it is below the rounding error of ``s`` (about 1600 float32 steps
    at alpha 0.99) it can round below zero: sqrt gives NaN and every later step times NaN data.
    From the state :func:`make_state` draws, ``s - a*a`` stays above alpha^k * s0 > 0, so
    :data:`CENTERED_STEPS_BETWEEN_RESETS` steps (alpha^1000 = 4e-5, far above float32's 6e-8)
    are safe. The timing loop caps each sample at that many steps (:meth:`cap`) and calls
    :meth:`before` ahead of each sample, which restores the state outside the timed region when
    the budget is spent; the plain and momentum variants never need it.
    """

    def __init__(self, variant: str, state: dict[str, np.ndarray]):
        self.limit = CENTERED_STEPS_BETWEEN_RESETS if variant == "centered" else None
        self._shared = state
        # Only a state that will be restored is copied (at 10^8 the copy is gigabytes).
        self._initial = ({} if self.limit is None else
                         {name: array.copy() for name, array in state.items()})
        self._since_restore = 0
        self.restores = 0

    def cap(self, number: int) -> int:
        """The most steps one sample may take."""
        return number if self.limit is None else max(1, min(number, self.limit))

    def before(self, steps: int, resets=()) -> None:
        """Make room for ``steps`` more steps, restoring the state (and calling each row's own
        ``reset``, for rows that keep copies) when the budget since the last restore is spent."""
        if self.limit is not None and self._since_restore + steps > self.limit:
            for name, array in self._shared.items():
                array[...] = self._initial[name]
            for reset in resets:
                reset()
            self._since_restore = 0
            self.restores += 1
        self._since_restore += steps
