"""16-bit parameters in the engine: the group options that govern them (``param_rounding``,
``seed``, ``master_weights``), their check, and the stochastic rounding keys of a step.

A float16 / bfloat16 parameter keeps float32 state; its update is that of
:func:`fastrms.rmsprop_update` on it. With ``param_rounding="stochastic"`` parameter ``i`` (its
index in group order, the state dict's id) at its ``t``-th step (1-based, its own step count)
rounds as ``rmsprop_update(..., param_rounding="stochastic", seed=parameter_seed(seed, i),
step=t)``: the random bits are a pure function of (seed, i, t), so a run resumed from a
checkpoint continues the very stream of a run that never stopped, and two parameters never
share random bits.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .._codecs import LOW_PRECISION_DTYPES, splitmix64, stochastic_key
from .._low_precision import PARAM_ROUNDINGS, check_counter

#: The group keys of 16-bit parameters, after :data:`~fastrms.engine.HYPERPARAMETERS`.
PRECISION_OPTIONS = ("param_rounding", "seed", "master_weights")
#: Their defaults: round to nearest even, seed 0, no float32 master copy.
PRECISION_DEFAULTS = {"param_rounding": "nearest", "seed": 0, "master_weights": False}
#: The name of the float32 master copy among a bucket's state buffers (and in state dicts).
MASTER = "master_param"
_NEAREST = ("nearest", 0, False)


def is_low_precision(dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (float32 state and arithmetic)."""
    return dtype in LOW_PRECISION_DTYPES


def check_precision_options(group: Mapping, where: str) -> tuple:
    """``(param_rounding, seed, master_weights)`` of a group, checked (``TypeError`` /
    ``ValueError`` prefixed with ``where`` and naming the key). A group without the keys (a
    front end with no 16-bit parameters) has the defaults."""
    rounding = group.get("param_rounding", "nearest")
    seed = group.get("seed", 0)
    master = group.get("master_weights", False)
    if rounding == "nearest" and master is False and type(seed) is int and seed == 0:
        return _NEAREST  # the defaults: the common case, cheaply
    if not isinstance(rounding, str) or rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"{where}: param_rounding must be 'nearest' or 'stochastic', got "
                         f"{rounding!r}")
    try:
        seed = check_counter("seed", seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if not isinstance(master, (bool, np.bool_)):
        raise TypeError(f"{where}: master_weights must be a bool, got {type(master).__name__}")
    master = bool(master)
    if master and rounding == "stochastic":
        raise ValueError(f"{where}: master_weights=True cannot go with "
                         f"param_rounding='stochastic': the update runs on the float32 master "
                         f"copy and the parameter receives its nearest 16-bit value")
    return rounding, seed, master


def check_master_has_targets(group: Mapping, dtypes, where: str) -> None:
    """``master_weights=True`` in a group with no float16 / bfloat16 parameter is an error: a
    float32 / float64 parameter is already its own master copy."""
    if group.get("master_weights", False) and not any(map(is_low_precision, dtypes)):
        raise ValueError(f"{where}: master_weights=True but the group holds no float16 / "
                         f"bfloat16 parameter (float32 and float64 parameters are their own "
                         f"master copy); drop master_weights for this group")


def parameter_seed(seed: int, index: int) -> int:
    """The seed of parameter ``index`` of an optimizer seeded ``seed``:
    ``stochastic_key(seed, 0, index)``.

    >>> parameter_seed(0, 0) == parameter_seed(0, 1)
    False
    """
    return stochastic_key(seed, 0, index)


def key_bases(seed: int, ids) -> np.ndarray:
    """Per parameter id, the uint64 ``b`` with ``stochastic_key(parameter_seed(seed, i), t) ==
    splitmix64(b ^ t)`` for every step ``t`` (:func:`step_keys`)."""
    with np.errstate(over="ignore"):
        streams = np.asarray(list(ids), dtype=np.uint64) ^ np.uint64(splitmix64(seed))
        return _splitmix(_splitmix(_splitmix(_splitmix(streams))))


def step_keys(bases: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The stochastic rounding keys of parameters with key bases ``bases`` at 1-based steps
    ``steps`` (uint64 arrays of one length)."""
    with np.errstate(over="ignore"):
        return _splitmix(bases ^ steps)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
