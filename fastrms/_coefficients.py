"""The one place where hyperparameters become kernel coefficients.

Each coefficient is computed once in Python float64 and then rounded once to the array dtype
(docs/contract.md). Backends receive a :class:`Coefficients` and arrays, nothing else, so they
cannot disagree about a coefficient. Results are cached: a training loop that calls with the same
hyperparameters every step pays for one dictionary lookup.
"""
from __future__ import annotations

import math
from functools import lru_cache
from numbers import Real

import numpy as np

from ._codecs import LOW_PRECISION_DTYPES

# Option flags; the same values as the FASTRMS_* constants in csrc/fastrms.h (a test pins them).
MAXIMIZE = 1
CENTERED = 2
EPS_IN_SQRT = 4
WD_COUPLED = 8
WD_DECOUPLED = 16
MOMENTUM = 32
LR_IN_MOMENTUM = 64
NESTEROV = 128
GRAD_SCALE = 256

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: The coefficients in kernel order (the field order of the C structs in csrc/fastrms.h).
COEFFICIENT_NAMES = ("alpha", "one_minus_alpha", "eps", "neg_lr", "lr", "weight_decay", "momentum",
                     "decay", "grad_scale", "grad_scale_inverse")


class Coefficients:
    """Kernel coefficients for one dtype, each exactly representable in that dtype.

    ``values`` holds the coefficients named in :data:`COEFFICIENT_NAMES` as Python floats
    (``grad_scale_inverse`` is 1 / grad_scale where that is exact in ``dtype``, else 0); ``scalars`` holds the same as NumPy scalars of ``dtype``; ``flags`` is the
    bitwise OR of the option flags. ``backend_cache`` lets a backend keep its own form of these
    coefficients (a C struct, say) next to them.
    """

    __slots__ = ("values", "scalars", "flags", "dtype", "uses_momentum", "centered",
                 "backend_cache")

    def __init__(self, values: tuple[float, ...], flags: int, dtype: np.dtype):
        self.values = values
        self.scalars = tuple(dtype.type(v) for v in values)
        self.flags = flags
        self.dtype = dtype
        # Plain attributes, not properties: read on every call of the small-array fast path.
        self.uses_momentum = bool(flags & MOMENTUM)
        self.centered = bool(flags & CENTERED)
        self.backend_cache: dict = {}

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={v!r}" for n, v in zip(COEFFICIENT_NAMES, self.values))
        return f"Coefficients({body}, flags={self.flags}, dtype={self.dtype})"


def check_real(name: str, value, *, lower: float = 0.0, upper: float | None = None,
                upper_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        raise ValueError(f"{name} must be finite, got a number beyond the float64 range") from None
    violation = range_violation(value, lower, math.inf if upper is None else upper, upper_open)
    if violation == NOT_FINITE:
        raise ValueError(f"{name} must be finite, got {value}")
    if violation == BELOW:
        raise ValueError(f"{name} must be >= {lower}, got {value}")
    if violation == ABOVE:
        raise ValueError(f"{name} must be {'<' if upper_open else '<='} {upper}, got {value}")
    return value


#: Hyperparameter types that cannot change value behind an identity: only calls made of these
#: are served from the coefficient cache or remembered in :data:`last_call`.
IMMUTABLE = frozenset((float, int, bool, type(None), np.float16, np.float32, np.float64,
                        np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                        np.uint64, np.bool_))


def _check_hyperparameter(name: str, value) -> float:
    lower, upper, upper_open = RANGES[name]
    return check_real(name, value, lower=lower, upper=None if upper == math.inf else upper,
                      upper_open=upper_open)


def kernel_coefficients(dtype, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                        centered=False, maximize=False, eps_in_sqrt=False, lr_in_momentum=False,
                        nesterov=False, decoupled_weight_decay=False,
                        grad_scale=None) -> Coefficients:
    """Validate hyperparameters and return the coefficients for arrays of ``dtype``.

    A 16-bit parameter dtype (float16, bfloat16) computes in float32: its coefficients are the
    float32 ones (``.dtype`` is float32).

    ``grad_scale`` (a loss scale; None or 1 for none) makes the kernels divide each gradient by
    it first, in the dtype. Raises ``TypeError`` / ``ValueError`` naming the offending
    hyperparameter.
    """
    arguments = (lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
                 lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)
    # Only values that cannot change behind the same object may be served from the cache: a
    # mutable numbers.Real (or an unhashable argument) is read, and checked, afresh.
    if IMMUTABLE.issuperset(map(type, arguments)):
        return _cached(dtype, *arguments)
    return _compute(dtype, *arguments)


# -- The value rules and the arithmetic: plain functions of floats, ints and bools ------------
# They are written in the subset of Python that Numba compiles: the entry for @njit code
# (fastrms/_numba_overload.py) compiles these same functions, so that a call from compiled
# code is checked and rounded exactly as a call from Python. Nothing else computes a coefficient.

#: The answers of :func:`range_violation` (0: in range).
NOT_FINITE, BELOW, ABOVE = 1, 2, 3
#: (lower, upper, upper_open) of each real hyperparameter, in the order they are checked; upper
#: is inf where there is none.
RANGES = {"lr": (0.0, math.inf, False), "alpha": (0.0, 1.0, True), "eps": (0.0, math.inf, False),
          "weight_decay": (0.0, math.inf, False), "momentum": (0.0, math.inf, False),
          "grad_scale": (0.0, math.inf, False)}
#: The errors of :func:`coefficient_arithmetic` (0: none).
COEFFICIENT_OVERFLOW, SCALE_ZERO_IN_DTYPE = 1, 2


def range_violation(value: float, lower: float, upper: float, upper_open: bool) -> int:
    """0 if ``value`` lies in its range, else NOT_FINITE, BELOW or ABOVE."""
    if not math.isfinite(value):
        return NOT_FINITE
    if value < lower:
        return BELOW
    if value >= upper if upper_open else value > upper:
        return ABOVE
    return 0


def _round_to(value: float, float32: bool) -> float:
    """``value`` rounded once to float32 (to nearest even; inf beyond the range), else itself."""
    return float(np.float32(value)) if float32 else value


def coefficient_arithmetic(float32: bool, lr: float, alpha: float, eps: float,
                           weight_decay: float, momentum: float, centered: bool, maximize: bool,
                           eps_in_sqrt: bool, lr_in_momentum: bool, nesterov: bool,
                           decoupled_weight_decay: bool, grad_scale: float):
    """The flags and coefficients of checked hyperparameters: ``(error, culprits, values,
    flags)``. ``values`` holds the coefficients of :data:`COEFFICIENT_NAMES` as float64, each
    computed in float64 and rounded once to the dtype (float32 if ``float32``, else float64).
    ``error`` is 0, COEFFICIENT_OVERFLOW (bit i of ``culprits`` set where coefficient i would be
    infinite) or SCALE_ZERO_IN_DTYPE. Rounding to float32 can overflow: Python callers silence
    NumPy's warning around the call.
    """
    # -0.0 counts as 0.0: the coefficient cache cannot tell them apart (they compare and hash
    # equal), and the compiled entries, which have no cache, must give the same bits.
    lr, alpha, eps = lr + 0.0, alpha + 0.0, eps + 0.0
    weight_decay, momentum = weight_decay + 0.0, momentum + 0.0
    flags = 0
    if maximize:
        flags |= MAXIMIZE
    if centered:
        flags |= CENTERED
    if eps_in_sqrt:
        flags |= EPS_IN_SQRT
    # Like torch, a zero weight decay skips the decay line (g + 0 * p is not g for p = inf).
    if weight_decay != 0.0:
        flags |= WD_DECOUPLED if decoupled_weight_decay else WD_COUPLED
    if momentum != 0.0:
        flags |= MOMENTUM
        if lr_in_momentum:
            flags |= LR_IN_MOMENTUM
        if nesterov:
            flags |= NESTEROV

    rounded = (_round_to(alpha, float32), _round_to(1.0 - alpha, float32),
               _round_to(eps, float32), _round_to(-lr, float32), _round_to(lr, float32),
               _round_to(weight_decay, float32), _round_to(momentum, float32),
               _round_to(1.0 - lr * weight_decay, float32), _round_to(grad_scale, float32))
    culprits = 0
    for i in range(len(rounded)):
        if not math.isfinite(rounded[i]):
            culprits |= 1 << i
    if culprits:
        return COEFFICIENT_OVERFLOW, culprits, rounded + (0.0,), flags
    scale = rounded[8]
    if scale == 0.0:
        return SCALE_ZERO_IN_DTYPE, 0, rounded + (0.0,), flags
    # Dividing by exactly 1 changes no bits: skip the division.
    if scale != 1.0:
        flags |= GRAD_SCALE
    # A power of two has an exact reciprocal if the dtype holds it (that of the smallest
    # subnormals overflows), and multiplying by an exact reciprocal rounds the same exact
    # quotient as dividing: the same bits, faster.
    inverse = 1.0 / scale
    exact = (math.frexp(scale)[0] == 0.5 and math.isfinite(inverse)
             and _round_to(inverse, float32) == inverse)
    return 0, 0, rounded + (inverse if exact else 0.0,), flags


def _compute(dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
             lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale=None) -> Coefficients:
    dtype = np.dtype(dtype)
    if dtype in LOW_PRECISION_DTYPES:  # 16-bit parameters compute in float32
        dtype = FLOAT_DTYPES[0]
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    lr = _check_hyperparameter("lr", lr)
    alpha = _check_hyperparameter("alpha", alpha)
    eps = _check_hyperparameter("eps", eps)
    weight_decay = _check_hyperparameter("weight_decay", weight_decay)
    momentum = _check_hyperparameter("momentum", momentum)
    for name, flag in (("centered", centered), ("maximize", maximize), ("eps_in_sqrt", eps_in_sqrt),
                       ("lr_in_momentum", lr_in_momentum), ("nesterov", nesterov),
                       ("decoupled_weight_decay", decoupled_weight_decay)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov requires momentum > 0")
    if grad_scale is None:
        grad_scale = 1.0
    else:
        grad_scale = _check_hyperparameter("grad_scale", grad_scale)
        if grad_scale == 0.0:
            raise ValueError("grad_scale must be > 0, got 0.0")
    with np.errstate(over="ignore", under="ignore"):
        error, culprits, values, flags = coefficient_arithmetic(
            dtype == FLOAT_DTYPES[0], lr, alpha, eps, weight_decay, momentum, bool(centered),
            bool(maximize), bool(eps_in_sqrt), bool(lr_in_momentum), bool(nesterov),
            bool(decoupled_weight_decay), grad_scale)
    if error:
        raise ValueError(coefficient_error_message(error, culprits, dtype, grad_scale))
    return Coefficients(values, flags, dtype)


def coefficient_error_message(error: int, culprits: int, dtype, grad_scale: float) -> str:
    """The message of a :func:`coefficient_arithmetic` error (raised as ValueError)."""
    if error == COEFFICIENT_OVERFLOW:
        names = sorted({_SOURCES[i] for i in range(len(_SOURCES)) if culprits >> i & 1})
        return (f"{' and '.join(names)} too large for {np.dtype(dtype)}: a kernel coefficient "
                f"would be infinite")
    return f"grad_scale {grad_scale} is zero in {np.dtype(dtype)}"


#: The hyperparameters each coefficient comes from, for error messages.
_SOURCES = ("alpha", "alpha", "eps", "lr", "lr", "weight_decay", "momentum", "lr * weight_decay",
            "grad_scale")


# typed=True: 1, 1.0 and True hash alike, and a cached float lr must not let lr=True through.
_cached = lru_cache(maxsize=512, typed=True)(_compute)

#: ``(dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
#: lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale, coefficients)`` of the last
#: :func:`coefficients_for_call`. rmsprop_update compares its arguments with these by identity
#: first: identical objects validate alike, and the comparison costs about a third of the
#: lru_cache lookup, which hashes all thirteen arguments and their types.
last_call: tuple = (object(),) * 13 + (None,)


def coefficients_for_call(dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize,
                          eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                          grad_scale) -> Coefficients:
    """:func:`kernel_coefficients`, remembering the call in :data:`last_call`."""
    global last_call
    arguments = (lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
                 lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)
    coeffs = kernel_coefficients(dtype, *arguments)
    if all(type(a) in IMMUTABLE for a in arguments):
        last_call = (coeffs.dtype, *arguments, coeffs)
    return coeffs
