"""The NumPy reference: SPEC.md's update order, one readable whole-array pass per line.

This is the oracle every test compares against. Each line is computed in the array dtype with
coefficients of that dtype, so each line is rounded once, as the compiled kernels do. It works on
any strides, reads every input before it writes any output, and needs no gather step.
"""
from __future__ import annotations

import numpy as np

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
        return all(bool(np.isfinite(g / scale if coeffs.flags & GRAD_SCALE else g).all())
                   for g in grads)


def set_num_threads(n: int | None) -> None:
    """The reference is single-threaded; NumPy's own threads are not ours to change."""


def describe() -> dict:
    return {"available": True, "reason": "always available (the reference)", "threads": 1}
