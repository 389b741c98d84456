"""The NumPy reference: the contract's update order, one readable whole-array pass per line.

This is the oracle every test compares against. Each line is computed in the array dtype with
coefficients of that dtype, so each line is rounded once, as the compiled kernels do. It works on
any strides, reads every input before it writes any output, and needs no gather step.
"""
from __future__ import annotations

import numpy as np

from .. import _blockwise, _codecs
from .._coefficients import (CENTERED, EPS_IN_SQRT, GRAD_SCALE, LR_IN_MOMENTUM, MAXIMIZE, MOMENTUM,
                             NESTEROV, WD_COUPLED, WD_DECOUPLED, Coefficients)
from .._validation import check_no_overlap


def reference_step(coeffs: Coefficients, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    """Return the new (param, square_avg, momentum_buffer, grad_avg) without writing anything."""
    (alpha, one_minus_alpha, eps, neg_lr, lr, weight_decay, momentum, decay, scale,
     _exact_inverse) = coeffs.scalars
    flags = coeffs.flags

    g = grad / scale if flags & GRAD_SCALE else grad                     # 0 (loss scaling)
    g = -g if flags & MAXIMIZE else g                                    # 1
    p = param
    if flags & WD_COUPLED:                                               # 2
        g = g + weight_decay * p
    elif flags & WD_DECOUPLED:
        p = p * decay
    s = square_avg * alpha + (one_minus_alpha * g) * g                   # 3
    a = None
    v = s
    if flags & CENTERED:                                                 # 4
        a = grad_avg + one_minus_alpha * (g - grad_avg)
        v = s - a * a
    d = np.sqrt(v + eps) if flags & EPS_IN_SQRT else np.sqrt(v) + eps    # 5
    b = None
    if not flags & MOMENTUM:                                             # 6
        p = p + (neg_lr * g) / d
    else:
        u = (lr * g) / d if flags & LR_IN_MOMENTUM else g / d
        b = momentum_buffer * momentum + u
        step = u + momentum * b if flags & NESTEROV else b
        p = p - step if flags & LR_IN_MOMENTUM else p + neg_lr * step
    return p, s, b, a


def update(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    check_no_overlap(param, grad, square_avg, momentum_buffer, grad_avg)
    with np.errstate(all="ignore"):
        p, s, b, a = reference_step(coeffs, param, grad, square_avg, momentum_buffer, grad_avg)
    param[...] = p
    square_avg[...] = s
    if b is not None:
        momentum_buffer[...] = b
    if a is not None:
        grad_avg[...] = a


def update_if_ready(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None) -> bool:
    """The reference has no fast path: every call takes the fully checked route."""
    return False


def update_many(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs, *,
                cache=None):
    """One update per array; ``cache`` (see the C backend) is accepted and not needed."""
    for k in range(len(params)):
        update(coeffs, params[k], grads[k], square_avgs[k],
               momentum_buffers[k] if momentum_buffers is not None else None,
               grad_avgs[k] if grad_avgs is not None else None)


def all_finite(coeffs, grads) -> bool:
    """True when every gradient, divided by the loss scale when there is one, is finite."""
    scale = coeffs.scalars[-2]
    with np.errstate(all="ignore"):
        return all(bool(np.isfinite(_widened(g) / scale if coeffs.flags & GRAD_SCALE else g)
                        .all())
                   for g in grads)


def _widened(grad):
    """A 16-bit gradient in its compute dtype (float32); others as they are."""
    return _codecs.decode(grad) if grad.dtype in _codecs.LOW_PRECISION_DTYPES else grad


def reference_step_low_precision(coeffs, param, grad, square_avg, momentum_buffer=None,
                                 grad_avg=None, master_param=None, key=None):
    """:func:`reference_step` for a float16 / bfloat16 param: widen (or take the float32
    master copy), step in float32, narrow. Returns (param, square_avg, momentum_buffer,
    grad_avg, master_param) as new arrays, writing nothing."""
    p32 = master_param if master_param is not None else _codecs.decode(param)
    g32 = grad if grad.dtype == _codecs.FLOAT32 else _codecs.decode(grad)
    with np.errstate(all="ignore"):
        p, s, b, a = reference_step(coeffs, p32, g32, square_avg, momentum_buffer, grad_avg)
    p = np.asarray(p, _codecs.FLOAT32)
    if key is None:
        narrowed = _codecs.encode_nearest(p, param.dtype)
    else:
        narrowed = _codecs.encode_stochastic(p, param.dtype, key)
    return narrowed, s, b, a, (p if master_param is not None else None)


def update_low_precision(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None,
                         master_param=None, key=None):
    """One step of a 16-bit param (the registry's contract; any strides here)."""
    check_no_overlap(param, grad, square_avg, momentum_buffer, grad_avg, master_param)
    p, s, b, a, m = reference_step_low_precision(coeffs, param, grad, square_avg,
                                                 momentum_buffer, grad_avg, master_param, key)
    param[...] = p
    square_avg[...] = s
    if b is not None:
        momentum_buffer[...] = b
    if a is not None:
        grad_avg[...] = a
    if m is not None:
        master_param[...] = m


def update_many_low_precision(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs,
                              master_params=None, keys=None, *, cache=None):
    """One :func:`update_low_precision` per array; ``keys``: None or one key per array."""
    for k in range(len(params)):
        update_low_precision(coeffs, params[k], grads[k], square_avgs[k],
                             momentum_buffers[k] if momentum_buffers is not None else None,
                             grad_avgs[k] if grad_avgs is not None else None,
                             master_params[k] if master_params is not None else None,
                             None if keys is None else int(keys[k]))


def decode_low_precision(values):
    return _codecs.decode(values)


def encode_low_precision(values, dtype, key=None, first_index: int = 0):
    if key is None:
        return _codecs.encode_nearest(values, dtype)
    return _codecs.encode_stochastic(values, dtype, key, first_index)


def set_num_threads(n: int | None) -> None:
    """The reference is single-threaded; NumPy's own threads are not ours to change."""


def describe() -> dict:
    return {"available": True, "reason": "always available (the reference)", "threads": 1}


# -- compact state (bfloat16 arrays, Blockwise8 buffers) -----------------------------------


def decode_state(state, shape):
    """A state argument as float32 values of ``shape`` (float32 arrays as they are)."""
    if isinstance(state, _blockwise.Blockwise8):
        return _blockwise.decode(state.codes, state.scales, state.signed).reshape(shape)
    return _codecs.decode(state) if state.dtype == _codecs.BFLOAT16 else state


def reference_step_compact(coeffs, param, grad, square_avg, momentum_buffer=None,
                           grad_avg=None, master_param=None, key=None):
    """Decode every stream to float32, run :func:`reference_step` (SPEC's order, float32),
    encode: returns (param, master_param, [encoded square_avg, momentum_buffer, grad_avg]),
    each encoded state an array (float32 or bfloat16) or a (codes, scales) pair; None where
    absent. Writes nothing."""
    shape = param.shape
    if param.dtype == _codecs.FLOAT32:
        p32 = param
    else:
        p32 = master_param if master_param is not None else _codecs.decode(param)
    g32 = grad if grad.dtype == _codecs.FLOAT32 else _codecs.decode(grad)
    states = (square_avg, momentum_buffer, grad_avg)
    decoded = [None if s is None else decode_state(s, shape) for s in states]
    with np.errstate(all="ignore"):
        p, s, b, a = reference_step(coeffs, p32, g32, *decoded)
        p = np.asarray(p, _codecs.FLOAT32)
        if param.dtype == _codecs.FLOAT32:
            new_param = p
        elif key is None:
            new_param = _codecs.encode_nearest(p, param.dtype)
        else:
            new_param = _codecs.encode_stochastic(p, param.dtype, key)
        encoded = []
        for state, values in zip(states, (s, b, a)):
            if state is None:
                encoded.append(None)
            elif isinstance(state, _blockwise.Blockwise8):
                encoded.append(_blockwise.encode(values, state.signed))
            elif state.dtype == _codecs.BFLOAT16:
                encoded.append(_codecs.encode_nearest(values, _codecs.BFLOAT16))
            else:
                encoded.append(np.asarray(values, _codecs.FLOAT32))
    return new_param, (p if master_param is not None else None), encoded


def write_state(state, encoded) -> None:
    """Store one encoded state (from :func:`reference_step_compact`) into its argument."""
    if isinstance(state, _blockwise.Blockwise8):
        state.codes[...], state.scales[...] = encoded
    else:
        state[...] = encoded


def update_compact(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None,
                   master_param=None, key=None):
    """One step with compact state (the registry's contract; any strides here)."""
    p, m, encoded = reference_step_compact(coeffs, param, grad, square_avg, momentum_buffer,
                                           grad_avg, master_param, key)
    param[...] = p
    if m is not None:
        master_param[...] = m
    for state, values in zip((square_avg, momentum_buffer, grad_avg), encoded):
        if state is not None:
            write_state(state, values)


def decode_blockwise8(codes, scales, signed):
    return _blockwise.decode(codes, scales, signed)


def encode_blockwise8(values, signed):
    return _blockwise.encode(values, signed)
