"""Array checks shared by every entry point. Everything here runs before the first write."""
from __future__ import annotations

import numpy as np

from ._coefficients import FLOAT_DTYPES

STREAM_NAMES = ("param", "grad", "square_avg", "momentum_buffer", "grad_avg", "master_param")
_ndarray = np.ndarray


def check_param(param, name: str = "param", accepted: str = "float32 or float64") -> np.dtype:
    """Check that a parameter is a float32 / float64 ndarray; return its dtype. ``accepted``
    is what the error message says the caller takes."""
    if not isinstance(param, _ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(param).__name__}")
    dtype = param.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype {accepted} (native byte order), got {dtype}")
    return dtype


def check_arrays(param, grad, square_avg, momentum_buffer, grad_avg, uses_momentum: bool,
                 centered: bool) -> None:
    """Check the other arrays against a checked param: types, dtypes, shapes and the optional
    buffers. Writability (:func:`check_writeable`) and overlap (:func:`check_no_overlap`) are
    checked separately, or by the C kernel's fast path. Straight-line code: on small arrays this
    function is a large part of the whole cost of a call.
    """
    dtype = param.dtype
    shape = param.shape
    if type(grad) is not _ndarray or type(square_avg) is not _ndarray:
        _check_type("grad", grad)
        _check_type("square_avg", square_avg)
    if grad.dtype is not dtype or square_avg.dtype is not dtype:
        _check_dtype("grad", grad, dtype)
        _check_dtype("square_avg", square_avg, dtype)
    if grad.shape != shape:
        raise ValueError(f"grad has shape {grad.shape} but param has shape {shape}")
    if square_avg.shape != shape:
        raise ValueError(f"square_avg has shape {square_avg.shape} but param has shape {shape}")
    if uses_momentum:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum > 0")
        _check_optional("momentum_buffer", momentum_buffer, dtype, shape)
    elif momentum_buffer is not None:
        raise ValueError("momentum_buffer was given but momentum is 0; pass momentum > 0 or drop it")
    if centered:
        if grad_avg is None:
            raise ValueError("grad_avg is required when centered=True")
        _check_optional("grad_avg", grad_avg, dtype, shape)
    elif grad_avg is not None:
        raise ValueError("grad_avg was given but centered is False; pass centered=True or drop it")


def _check_type(name, array):
    if not isinstance(array, _ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")


def _check_dtype(name, array, dtype):
    if array.dtype != dtype:
        raise TypeError(f"{name} has dtype {array.dtype} but param has dtype {dtype}")


def _check_optional(name, array, dtype, shape):
    _check_type(name, array)
    _check_dtype(name, array, dtype)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape} but param has shape {shape}")


def check_writeable(param, square_avg, momentum_buffer=None, grad_avg=None) -> None:
    """Raise ValueError naming the first output array that is read-only."""
    for name, array in (("param", param), ("square_avg", square_avg),
                        ("momentum_buffer", momentum_buffer), ("grad_avg", grad_avg)):
        if array is not None and not array.flags.writeable:
            raise ValueError(f"{name} is read-only; it is updated in place and must be writeable")


def check_no_overlap(param, grad, square_avg, momentum_buffer=None, grad_avg=None,
                     master_param=None) -> None:
    """Raise ValueError naming the first two arrays that share memory (exact, any strides)."""
    arrays = [(n, a) for n, a in zip(STREAM_NAMES, (param, grad, square_avg, momentum_buffer,
                                                    grad_avg, master_param))
              if a is not None and a.size]
    for i, (name_a, a) in enumerate(arrays):
        for name_b, b in arrays[i + 1:]:
            if np.may_share_memory(a, b) and np.shares_memory(a, b):
                raise ValueError(f"{name_a} and {name_b} overlap in memory; every array must be its own buffer")


def is_kernel_ready(array) -> bool:
    """True when a compiled kernel can use the array's memory directly as a flat buffer."""
    flags = array.flags
    return flags.c_contiguous and flags.aligned


def check_no_internal_overlap(**named_arrays) -> None:
    """Raise ValueError naming the first output whose own elements may share memory (a zero or
    overlapping stride, as np.lib.stride_tricks.as_strided can make): an elementwise update of
    such an array has no well-defined result. Conservative: it trusts only layouts whose
    strides, sorted, each step over everything inside them."""
    for name, array in named_arrays.items():
        if array is None or array.size <= 1 or array.flags.c_contiguous or array.flags.f_contiguous:
            continue
        extent = array.itemsize
        for stride, length in sorted((abs(st), n) for n, st in zip(array.shape, array.strides) if n > 1):
            if stride < extent:
                raise ValueError(f"{name} overlaps itself in memory (strides {array.strides} "
                                 f"for shape {array.shape}); outputs need one element per address")
            extent += stride * (length - 1)

