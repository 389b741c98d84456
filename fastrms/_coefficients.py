"""The one place where hyperparameters become kernel coefficients.

Each coefficient is computed once in Python float64 and then rounded once to the array dtype
(SPEC.md). Backends receive a :class:`Coefficients` and arrays, nothing else, so they cannot
disagree about a coefficient. Results are cached: a training loop that calls with the same
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
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < lower:
        raise ValueError(f"{name} must be >= {lower}, got {value}")
    if upper is not None and (value >= upper if upper_open else value > upper):
        raise ValueError(f"{name} must be {'<' if upper_open else '<='} {upper}, got {value}")
    return value


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
    try:
        return _cached(dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize,
                       eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)
    except TypeError as exc:  # unhashable argument: validate uncached to get the real message
        if "unhashable" not in str(exc):
            raise
        return _compute(dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize,
                        eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)


def _compute(dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
             lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale=None) -> Coefficients:
    dtype = np.dtype(dtype)
    if dtype in LOW_PRECISION_DTYPES:
        dtype = FLOAT_DTYPES[0]
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    lr = check_real("lr", lr)
    alpha = check_real("alpha", alpha, upper=1.0, upper_open=True)
    eps = check_real("eps", eps)
    weight_decay = check_real("weight_decay", weight_decay)
    momentum = check_real("momentum", momentum)
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
        grad_scale = check_real("grad_scale", grad_scale)
        if grad_scale == 0.0:
            raise ValueError("grad_scale must be > 0, got 0.0")

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

    in_float64 = (alpha, 1.0 - alpha, eps, -lr, lr, weight_decay, momentum, 1.0 - lr * weight_decay,
                  grad_scale)
    with np.errstate(over="ignore", under="ignore"):
        rounded = np.array(in_float64, dtype=np.float64).astype(dtype)
    if not np.isfinite(rounded).all():
        culprits = sorted({_SOURCES[i] for i in np.flatnonzero(~np.isfinite(rounded)).tolist()})
        raise ValueError(f"{' and '.join(culprits)} too large for {dtype}: a kernel coefficient "
                         f"would be infinite")
    values = rounded.tolist()
    scale = values[-1]
    if scale == 0.0:
        raise ValueError(f"grad_scale {grad_scale} is zero in {dtype}")
    # Dividing by exactly 1 changes no bits: skip the division.
    if scale != 1.0:
        flags |= GRAD_SCALE
    # A power of two has an exact reciprocal (if the dtype holds it), and multiplying by an
    # exact reciprocal rounds the same exact quotient as dividing: the same bits, faster.
    inverse = 1.0 / scale
    with np.errstate(over="ignore"):
        exact = math.frexp(scale)[0] == 0.5 and float(dtype.type(inverse)) == inverse
    values.append(inverse if exact else 0.0)
    return Coefficients(tuple(values), flags, dtype)


#: The hyperparameters each coefficient comes from, for error messages.
_SOURCES = ("alpha", "alpha", "eps", "lr", "lr", "weight_decay", "momentum", "lr * weight_decay",
            "grad_scale")


# typed=True: 1, 1.0 and True hash alike, and a cached float lr must not let lr=True through.
_cached = lru_cache(maxsize=512, typed=True)(_compute)

#: Hyperparameter types that cannot change value behind an identity: only calls made of these
#: are remembered in :data:`last_call`.
_IMMUTABLE = frozenset((float, int, bool, type(None), np.float16, np.float32, np.float64,
                        np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                        np.uint64, np.bool_))

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
    if all(type(a) in _IMMUTABLE for a in arguments):
        last_call = (coeffs.dtype, *arguments, coeffs)
    return coeffs
