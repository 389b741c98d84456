"""The problem every row of the bench report solves: hyperparameters, variants, streams, state.

The hyperparameters are torch's defaults with lr 1e-3: lr=1e-3, alpha=0.99, eps=1e-8, and
momentum=0.9 for the momentum variant. Rows step one shared state over and over with one fixed
gradient; :func:`make_state` draws it and :class:`StateGuard` keeps it valid (see there).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

LR, ALPHA, EPS, MOMENTUM_VALUE = 1e-3, 0.99, 1e-8, 0.9
#: variant -> the keyword arguments of fastrms.rmsprop_update that make it.
VARIANTS: dict[str, dict] = {"plain": {}, "momentum": {"momentum": MOMENTUM_VALUE},
                             "centered": {"centered": True}}
#: Streams read + written per element: plain reads p, g, s and writes p, s; momentum and
#: centered add one buffer each, read and written.
STREAMS: dict[str, int] = {"plain": 5, "momentum": 7, "centered": 7}
#: Steps of the centered variant on one state before it must be restored (see StateGuard).
CENTERED_STEPS_BETWEEN_RESETS = 1000


def bytes_moved(variant: str, dtype: DTypeLike, n: int) -> int:
    """Bytes one step must move at least: streams x itemsize x n."""
    return STREAMS[variant] * np.dtype(dtype).itemsize * n


def make_state(variant: str, dtype: DTypeLike, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays for one step of ``variant``: random param and grad, positive square_avg."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    state = {"param": rng.standard_normal(n).astype(dtype),
             "grad": rng.standard_normal(n).astype(dtype),
             "square_avg": np.abs(rng.standard_normal(n)).astype(dtype) + np.asarray(1e-3, dtype)}
    if variant == "momentum":
        state["momentum_buffer"] = np.zeros(n, dtype)
    if variant == "centered":
        state["grad_avg"] = np.zeros(n, dtype)
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
