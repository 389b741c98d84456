"""rmsprop_update for float16 and bfloat16 parameters: every check, then the backend's
``update_low_precision``. Kept apart from fastrms/_update.py, whose float32 / float64 path is
timed per call; a 16-bit call leaves that path at its first dtype test.
"""
from __future__ import annotations

import operator
from numbers import Integral

import numpy as np

from . import _coefficients, _dispatch
from ._codecs import FLOAT32, LOW_PRECISION_DTYPES, stochastic_key
from ._validation import (check_no_internal_overlap, check_no_overlap, check_writeable,
                          is_kernel_ready)
from .backends import numpy_reference

PARAM_ROUNDINGS = ("nearest", "stochastic")
_ndarray = np.ndarray
_LIMIT = 1 << 64


def check_counter(name: str, value) -> int:
    """A seed or step number: an int (not a bool) in [0, 2^64)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < _LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def rounding_key(param_rounding, seed, step, master_param=None):
    """Validate the rounding arguments of a 16-bit update; return the stochastic rounding key,
    or None for round to nearest even. ``seed`` and ``step`` are the stochastic rounding's
    inputs: required and checked for ``param_rounding="stochastic"`` and read by nothing else
    (an optimizer may pass them on every call). Stochastic rounding excludes ``master_param``
    (the master copy is updated; the parameter receives its nearest 16-bit value)."""
    if not isinstance(param_rounding, str) or param_rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be 'nearest' or 'stochastic', got "
                         f"{param_rounding!r}")
    if param_rounding == "nearest":
        return None
    if master_param is not None:
        raise ValueError("param_rounding='stochastic' cannot go with master_param: the update "
                         "runs on the float32 master copy and param receives its nearest "
                         "16-bit value")
    for name, value in (("seed", seed), ("step", step)):
        if value is None:
            raise ValueError(f"{name} is required for param_rounding='stochastic' (the random "
                             f"bits are a function of seed, step and element index)")
    return stochastic_key(check_counter("seed", seed), check_counter("step", step))


def check_extras_for_float(param_rounding, master_param) -> None:
    """The 16-bit-only arguments given with a float32 / float64 param (off the fast path)."""
    if master_param is not None:
        raise ValueError("master_param is only for float16 / bfloat16 params (it holds their "
                         "float32 copy); this param is already float32 or float64")
    if not isinstance(param_rounding, str) or param_rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be 'nearest' or 'stochastic', got "
                         f"{param_rounding!r}")
    if param_rounding != "nearest":
        raise ValueError("param_rounding='stochastic' is only for float16 / bfloat16 params; "
                         "a float32 / float64 param is written exactly")


def _check_state(name, array, param_dtype, shape):
    if not isinstance(array, _ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != FLOAT32:
        if array.dtype in LOW_PRECISION_DTYPES:
            raise TypeError(f"{name} has dtype {array.dtype}: state arrays are float32, "
                            f"bfloat16 or a fastrms.Blockwise8 (docs/compact-state.md)")
        raise TypeError(f"{name} has dtype {array.dtype} but the state of a {param_dtype} "
                        f"param must be float32")
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape} but param has shape {shape}")


def check_grad_of_float32_compute(param, grad) -> None:
    """A gradient for a parameter whose update computes in float32 (a float32 or 16-bit one):
    an ndarray of the parameter's shape, of its dtype or float32."""
    dtype = param.dtype
    if not isinstance(grad, _ndarray):
        raise TypeError(f"grad must be a numpy.ndarray, got {type(grad).__name__}")
    if grad.dtype != dtype and grad.dtype != FLOAT32:
        raise TypeError(f"grad has dtype {grad.dtype} but a {dtype} param takes a gradient of "
                        f"dtype {dtype} or float32")
    if grad.shape != param.shape:
        raise ValueError(f"grad has shape {grad.shape} but param has shape {param.shape}")


def check_arrays_low_precision(param, grad, square_avg, momentum_buffer, grad_avg,
                               master_param, uses_momentum: bool, centered: bool) -> None:
    """Types, dtypes, shapes and presence of the arrays of a 16-bit update."""
    dtype, shape = param.dtype, param.shape
    check_grad_of_float32_compute(param, grad)
    _check_state("square_avg", square_avg, dtype, shape)
    if uses_momentum:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum > 0")
        _check_state("momentum_buffer", momentum_buffer, dtype, shape)
    elif momentum_buffer is not None:
        raise ValueError("momentum_buffer was given but momentum is 0; pass momentum > 0 or "
                         "drop it")
    if centered:
        if grad_avg is None:
            raise ValueError("grad_avg is required when centered=True")
        _check_state("grad_avg", grad_avg, dtype, shape)
    elif grad_avg is not None:
        raise ValueError("grad_avg was given but centered is False; pass centered=True or drop it")
    if master_param is not None:
        _check_state("master_param", master_param, dtype, shape)


def rmsprop_update_low_precision(param, grad, square_avg, hyperparameters, *, param_rounding,
                                 seed, step, master_param, momentum_buffer, grad_avg, backend):
    """:func:`fastrms.rmsprop_update` for a float16 / bfloat16 ``param`` (an ndarray);
    ``hyperparameters`` are its twelve in kernel_coefficients order, after the dtype."""
    last = _coefficients.last_call  # the same objects as the last call: its coefficients
    if last[0] is FLOAT32 and all(map(operator.is_, hyperparameters, last[1:13])):
        coeffs = last[13]
    else:
        coeffs = _coefficients.coefficients_for_call(FLOAT32, *hyperparameters)
    key = rounding_key(param_rounding, seed, step, master_param)
    check_arrays_low_precision(param, grad, square_avg, momentum_buffer, grad_avg, master_param,
                               coeffs.uses_momentum, coeffs.centered)
    arrays = [a if a is None or type(a) is _ndarray else a.view(_ndarray)
              for a in (param, grad, square_avg, momentum_buffer, grad_avg, master_param)]
    param, grad, square_avg, momentum_buffer, grad_avg, master_param = arrays
    check_writeable(param, square_avg, momentum_buffer, grad_avg)
    if master_param is not None and not master_param.flags.writeable:
        raise ValueError("master_param is read-only; it is updated in place and must be writeable")
    module = _dispatch.resolve(backend, param.size, param.dtype, coeffs.flags)
    if param.size == 0:
        return
    ready = all(is_kernel_ready(a) for a in arrays if a is not None)
    if not ready:
        check_no_internal_overlap(param=param, square_avg=square_avg,
                                  momentum_buffer=momentum_buffer, grad_avg=grad_avg,
                                  master_param=master_param)
    if ready or module is numpy_reference:
        # Each backend checks that the arrays do not overlap before it writes (the C kernel
        # itself, the others with check_no_overlap), as on the float32 / float64 fast path.
        module.update_low_precision(coeffs, *arrays, key)
        return
    # Strided or misaligned arrays: gather into contiguous copies, update, scatter back. The
    # random bits follow the element's C-order index, which the copy keeps.
    check_no_overlap(*arrays)
    copies = [None if a is None else (a if is_kernel_ready(a) else a.copy(order="C"))
              for a in arrays]
    module.update_low_precision(coeffs, *copies, key)
    for index in (0, 2, 3, 4, 5):  # the outputs
        if copies[index] is not arrays[index]:
            arrays[index][...] = copies[index]
