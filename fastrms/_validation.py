"""Array checks shared by every entry point. Everything here runs before the first write."""
from __future__ import annotations

import numpy as np

from ._coefficients import FLOAT_DTYPES

STREAM_NAMES = ("param", "grad", "square_avg", "momentum_buffer", "grad_avg")
_ndarray = np.ndarray


def check_param(param) -> np.dtype:
    """Check that param is a float32 / float64 ndarray; return its dtype."""
    if not isinstance(param, _ndarray):
        raise TypeError(f"param must be a numpy.ndarray, got {type(param).__name__}")
    dtype = param.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"param must have dtype float32 or float64 (native byte order), got {dtype}")
    return dtype


def check_arrays(param, grad, square_avg, momentum_buffer, grad_avg, uses_momentum: bool,
                 centered: bool) -> None:
    """Check the other arrays against a checked param: types, dtypes, shapes, writability and
    the optional buffers. Overlap is checked separately (:func:`check_no_overlap`), or inside
    the C kernel.
    """
    dtype = param.dtype
    shape = param.shape
    if uses_momentum:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum > 0")
    elif momentum_buffer is not None:
        raise ValueError("momentum_buffer was given but momentum is 0; pass momentum > 0 or drop it")
    if centered:
        if grad_avg is None:
            raise ValueError("grad_avg is required when centered=True")
    elif grad_avg is not None:
        raise ValueError("grad_avg was given but centered is False; pass centered=True or drop it")
    for name, array in (("grad", grad), ("square_avg", square_avg),
                        ("momentum_buffer", momentum_buffer), ("grad_avg", grad_avg)):
        if array is None:
            continue
        if not isinstance(array, _ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
        if array.dtype != dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but param has dtype {dtype}")
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape} but param has shape {shape}")
    for name, array in (("param", param), ("square_avg", square_avg),
                        ("momentum_buffer", momentum_buffer), ("grad_avg", grad_avg)):
        if array is not None and not array.flags.writeable:
            raise ValueError(f"{name} is read-only; it is updated in place and must be writeable")


def check_no_overlap(param, grad, square_avg, momentum_buffer=None, grad_avg=None) -> None:
    """Raise ValueError naming the first two arrays that share memory (exact, any strides)."""
    arrays = [(n, a) for n, a in zip(STREAM_NAMES, (param, grad, square_avg, momentum_buffer, grad_avg))
              if a is not None and a.size]
    for i, (name_a, a) in enumerate(arrays):
        for name_b, b in arrays[i + 1:]:
            if np.may_share_memory(a, b) and np.shares_memory(a, b):
                raise ValueError(f"{name_a} and {name_b} overlap in memory; every array must be its own buffer")


def is_kernel_ready(array) -> bool:
    """True when a compiled kernel can use the array's memory directly as a flat buffer."""
    flags = array.flags
    return flags.c_contiguous and flags.aligned
