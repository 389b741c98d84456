"""rmsprop_update with compact state (bfloat16 arrays or :class:`~fastrms.Blockwise8` buffers in
place of float32 state): every check, then the backend's ``update_compact``. Entered from
fastrms/_update.py only when a state argument is not a float32 / float64 array, so the plain
paths keep their cost.
"""
from __future__ import annotations

import operator

import numpy as np

from . import _coefficients, _dispatch
from ._blockwise import Blockwise8, check_blockwise
from ._codecs import BFLOAT16, FLOAT32, LOW_PRECISION_DTYPES
from ._low_precision import (check_extras_for_float, check_grad_of_float32_compute,
                             rounding_key)
from ._validation import check_no_internal_overlap, check_writeable, is_kernel_ready
from .backends import compact_checks_overlap, compact_module, numpy_reference

_ndarray = np.ndarray
STATE_NAMES = ("square_avg", "momentum_buffer", "grad_avg")


def is_compact(state) -> bool:
    """True for a state argument only this path takes: a Blockwise8 or a bfloat16 array."""
    return isinstance(state, Blockwise8) or (isinstance(state, _ndarray)
                                             and state.dtype == BFLOAT16)


def any_compact(square_avg, momentum_buffer, grad_avg) -> bool:
    return is_compact(square_avg) or is_compact(momentum_buffer) or is_compact(grad_avg)


def _check_state(name, state, shape, size):
    if isinstance(state, Blockwise8):
        check_blockwise(name, state, size, signed=name != "square_avg")
        for part in ("codes", "scales"):
            array = getattr(state, part)
            if not array.flags.writeable:
                raise ValueError(f"{name}.{part} is read-only; it is updated in place")
            if not is_kernel_ready(array):
                raise ValueError(f"{name}.{part} must be C-contiguous and aligned")
        return
    if not isinstance(state, _ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (float32 or bfloat16) or a "
                        f"fastrms.Blockwise8, got {type(state).__name__}")
    if state.dtype != FLOAT32 and state.dtype != BFLOAT16:
        raise TypeError(f"{name} has dtype {state.dtype}; with compact state every state array "
                        f"is float32, bfloat16 or a fastrms.Blockwise8")
    if state.shape != shape:
        raise ValueError(f"{name} has shape {state.shape} but param has shape {shape}")


def check_compact_arrays(param, grad, states, master_param, uses_momentum, centered) -> None:
    """Types, dtypes, shapes, presence and writability of the arrays of a compact update."""
    dtype, shape, size = param.dtype, param.shape, param.size
    if dtype != FLOAT32 and dtype not in LOW_PRECISION_DTYPES:
        raise TypeError(f"param has dtype {dtype}; compact state (bfloat16 or Blockwise8) goes "
                        f"with float32, float16 or bfloat16 params (its compute dtype is float32)")
    check_grad_of_float32_compute(param, grad)
    wanted = (True, uses_momentum, centered)
    reasons = (None, "momentum > 0", "centered=True")
    undo = (None, "pass momentum > 0 or drop it", "pass centered=True or drop it")
    for name, state, want, reason, fix in zip(STATE_NAMES, states, wanted, reasons, undo):
        if state is None:
            if want:
                raise ValueError(f"{name} is required" + (f" when {reason}" if reason else ""))
            continue
        if not want:
            why = "momentum is 0" if name == "momentum_buffer" else "centered is False"
            raise ValueError(f"{name} was given but {why}; {fix}")
        _check_state(name, state, shape, size)
    if master_param is not None:
        if not isinstance(master_param, _ndarray) or master_param.dtype != FLOAT32:
            raise TypeError("master_param must be a float32 numpy.ndarray")
        if master_param.shape != shape:
            raise ValueError(f"master_param has shape {master_param.shape} but param has "
                             f"shape {shape}")
        if not master_param.flags.writeable:
            raise ValueError("master_param is read-only; it is updated in place and must be "
                             "writeable")
    check_writeable(param, None)
    for name, state in zip(STATE_NAMES, states):
        if isinstance(state, _ndarray) and not state.flags.writeable:
            raise ValueError(f"{name} is read-only; it is updated in place and must be writeable")


def memory(param, grad, states, master_param):
    """Every buffer of the call by name, for the overlap check."""
    named = {"param": param, "grad": grad, "master_param": master_param}
    for name, state in zip(STATE_NAMES, states):
        if isinstance(state, Blockwise8):
            named[f"{name}.codes"], named[f"{name}.scales"] = state.codes, state.scales
        else:
            named[name] = state
    return {k: v for k, v in named.items() if v is not None and v.size}


def check_no_overlap_named(named) -> None:
    items = list(named.items())
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1:]:
            if np.may_share_memory(a, b) and np.shares_memory(a, b):
                raise ValueError(f"{name_a} and {name_b} overlap in memory; every array must "
                                 f"be its own buffer")


def rmsprop_update_compact(param, grad, states, hyperparameters, *, param_rounding, seed, step,
                           master_param, backend):
    """:func:`fastrms.rmsprop_update` with a compact state argument; ``states`` is
    (square_avg, momentum_buffer, grad_avg); ``hyperparameters`` the twelve after the dtype."""
    if not isinstance(param, _ndarray):
        raise TypeError(f"param must be a numpy.ndarray, got {type(param).__name__}")
    param = param.view(_ndarray) if type(param) is not _ndarray else param
    last = _coefficients.last_call
    if last[0] is FLOAT32 and all(map(operator.is_, hyperparameters, last[1:13])):
        coeffs = last[13]
    else:
        coeffs = _coefficients.coefficients_for_call(FLOAT32, *hyperparameters)
    if param.dtype in LOW_PRECISION_DTYPES:
        key = rounding_key(param_rounding, seed, step, master_param)
    else:
        if param.dtype == FLOAT32:
            check_extras_for_float(param_rounding, master_param)
        key = None
    check_compact_arrays(param, grad, states, master_param, coeffs.uses_momentum,
                         coeffs.centered)
    views = [a if a is None or type(a) is _ndarray or isinstance(a, Blockwise8)
             else a.view(_ndarray) for a in (grad, *states, master_param)]
    grad, states, master_param = views[0], tuple(views[1:4]), views[4]
    module = compact_module(_dispatch.resolve(backend, param.size, param.dtype, coeffs.flags))
    dense = [param, grad, master_param] + [s for s in states if isinstance(s, _ndarray)]
    ready = all(is_kernel_ready(a) for a in dense if a is not None)
    if ready and compact_checks_overlap(module):
        # The C kernel compares every buffer with every other before it writes (and an overlap
        # it finds is named through memory()); a C-contiguous array cannot overlap itself.
        # This spares small calls the pairwise checks below, a third of their cost.
        if param.size:
            module.update_compact(coeffs, param, grad, *states, master_param, key)
        return
    named = memory(param, grad, states, master_param)
    check_no_internal_overlap(**{k: v for k, v in named.items() if k != "grad"})
    check_no_overlap_named(named)
    if param.size == 0:
        return
    if module is numpy_reference or ready:
        module.update_compact(coeffs, param, grad, *states, master_param, key)
        return
    # Strided or misaligned dense arrays: gather into contiguous copies, update, scatter back.
    def ready(a):
        return a if a is None or isinstance(a, Blockwise8) or is_kernel_ready(a) \
            else a.copy(order="C")
    originals = (param, grad, *states, master_param)
    copies = [ready(a) for a in originals]
    module.update_compact(coeffs, *copies, key)
    for index in (0, 2, 3, 4, 5):
        if copies[index] is not originals[index]:
            originals[index][...] = copies[index]

