"""The public fused update, :func:`rmsprop_update`."""
from __future__ import annotations

import numpy as np

from . import _dispatch
from . import _coefficients
from ._codecs import LOW_PRECISION_DTYPES
from ._compact_state import any_compact, rmsprop_update_compact
from ._coefficients import FLOAT_DTYPES
from ._low_precision import check_extras_for_float, rmsprop_update_low_precision
from ._validation import (check_arrays, check_no_internal_overlap, check_no_overlap,
                          check_param, check_writeable, is_kernel_ready)
from .backends import numpy_reference

_ndarray = np.ndarray
_FLOAT32, _FLOAT64 = FLOAT_DTYPES
_NEAREST = "nearest"


def rmsprop_update(param, grad, square_avg, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
                   momentum=0.0, centered=False, maximize=False, eps_in_sqrt=False,
                   lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
                   momentum_buffer=None, grad_avg=None, grad_scale=None, backend=None,
                   param_rounding="nearest", seed=None, step=None, master_param=None):
    """One RMSProp step, in place, in one fused pass over memory.

    Updates ``param``, ``square_avg`` and, when used, ``momentum_buffer`` (required exactly when
    ``momentum > 0``) and ``grad_avg`` (required exactly when ``centered``), in the order of
    docs/contract.md; every backend gives the NumPy reference's bits. The defaults are torch's
    (``torch.optim.RMSprop``): eps outside the square root, lr outside the momentum buffer,
    coupled (L2) weight decay.

    ``grad_scale``: a loss scale to undo. The kernel divides each gradient element by it (in the
    compute dtype) before anything else, which gives the bits of passing ``grad / grad_scale``.

    16-bit parameters (``numpy.float16``, ``ml_dtypes.bfloat16``): ``grad`` has the param's
    dtype or float32, the state arrays are float32. Each element is widened to float32 (exact),
    updated in float32 with float32 coefficients, and written back by ``param_rounding``:
    ``"nearest"`` (round to nearest even, as ``astype`` converts) or ``"stochastic"`` (unbiased
    stochastic rounding whose random bits are a function of ``seed``, ``step`` and the
    element's C-order index: both required then, ints in [0, 2**64), and read by nothing
    else). ``master_param``: a float32 copy of the parameter that the update runs on instead,
    ``param`` receiving its nearest 16-bit value.

    Compact state (docs/compact-state.md): any state argument may be a bfloat16 array (round
    to nearest even) or a :class:`fastrms.Blockwise8` (unsigned for ``square_avg``, signed
    for the others), with float32 or 16-bit params: each block is decoded, updated in float32
    in the same order, and encoded (a new scale per block of 256).

    Every argument is checked before anything is written; bad input raises ``TypeError`` or
    ``ValueError`` naming the argument and leaves every array untouched.

    Example:
        >>> import numpy as np, fastrms
        >>> p = np.array([0.2, 0.4, 0.6]); g = np.array([-0.5, 0.3, 0.24]); s = np.zeros(3)
        >>> fastrms.rmsprop_update(p, g, s, lr=0.01, alpha=0.9, eps_in_sqrt=True)
        >>> p.round(8)
        array([0.23162277, 0.36837724, 0.56837725])
        >>> import ml_dtypes
        >>> w = np.ones(4, ml_dtypes.bfloat16); s32 = np.zeros(4, np.float32)
        >>> fastrms.rmsprop_update(w, np.full(4, 0.5, ml_dtypes.bfloat16), s32, lr=0.01,
        ...                        param_rounding="stochastic", seed=0, step=1)
        >>> bool((w < 1).all())
        True
    """
    # Exact type and dtype identity tests accept the common case cheaply; anything else goes to
    # the full validators, which raise the precise errors. On small arrays the checks are a
    # large part of the whole cost of a call.
    dtype = param.dtype if type(param) is _ndarray else None
    if dtype is not _FLOAT32 and dtype is not _FLOAT64:
        if any_compact(square_avg, momentum_buffer, grad_avg):
            return _compact(param, grad, square_avg, momentum_buffer, grad_avg, locals())
        if isinstance(param, _ndarray) and param.dtype in LOW_PRECISION_DTYPES:
            return rmsprop_update_low_precision(
                param, grad, square_avg, (lr, alpha, eps, weight_decay, momentum, centered,
                                          maximize, eps_in_sqrt, lr_in_momentum, nesterov,
                                          decoupled_weight_decay, grad_scale),
                param_rounding=param_rounding, seed=seed, step=step, master_param=master_param,
                momentum_buffer=momentum_buffer, grad_avg=grad_avg, backend=backend)
        dtype = check_param(param, accepted="float32, float64, float16 or bfloat16")
        if type(param) is not _ndarray:  # a subclass is updated as the plain memory it holds
            param = param.view(_ndarray)
    if master_param is not None or param_rounding is not _NEAREST:
        check_extras_for_float(param_rounding, master_param)
    last = _coefficients.last_call  # the same objects as the last call: its coefficients
    if (dtype is last[0] and lr is last[1] and alpha is last[2] and eps is last[3]
            and weight_decay is last[4] and momentum is last[5] and centered is last[6]
            and maximize is last[7] and eps_in_sqrt is last[8] and lr_in_momentum is last[9]
            and nesterov is last[10] and decoupled_weight_decay is last[11]
            and grad_scale is last[12]):
        coeffs = last[13]
    else:
        coeffs = _coefficients.coefficients_for_call(
            dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
            lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)
    shape = param.shape
    accepted = (type(grad) is _ndarray and type(square_avg) is _ndarray and grad.dtype is dtype
                and square_avg.dtype is dtype and grad.shape == shape and square_avg.shape == shape)
    if accepted and (momentum_buffer is not None or coeffs.uses_momentum):
        accepted = (coeffs.uses_momentum and type(momentum_buffer) is _ndarray
                    and momentum_buffer.dtype is dtype and momentum_buffer.shape == shape)
    if accepted and (grad_avg is not None or coeffs.centered):
        accepted = (coeffs.centered and type(grad_avg) is _ndarray and grad_avg.dtype is dtype
                    and grad_avg.shape == shape)
    if not accepted:
        if any_compact(square_avg, momentum_buffer, grad_avg):
            return _compact(param, grad, square_avg, momentum_buffer, grad_avg, locals())
        check_arrays(param, grad, square_avg, momentum_buffer, grad_avg, coeffs.uses_momentum,
                     coeffs.centered)
        # Subclasses (np.matrix, masked arrays) are updated as the plain memory they hold.
        param, grad, square_avg, momentum_buffer, grad_avg = (
            a if a is None or type(a) is _ndarray else a.view(_ndarray)
            for a in (param, grad, square_avg, momentum_buffer, grad_avg))
    module = _dispatch.auto_module if backend is None and _dispatch.context_choice() is None else None
    if module is None:
        module = _dispatch.resolve(backend, param.size, param.dtype, coeffs.flags)
    # The common case costs the least: the backend takes C-contiguous, aligned, writeable arrays
    # as they are, or declines without writing anything.
    if module.update_if_ready(coeffs, param, grad, square_avg, momentum_buffer, grad_avg):
        return
    check_writeable(param, square_avg, momentum_buffer, grad_avg)
    check_no_internal_overlap(param=param, square_avg=square_avg,
                              momentum_buffer=momentum_buffer, grad_avg=grad_avg)
    if module is numpy_reference or _all_kernel_ready(param, grad, square_avg, momentum_buffer, grad_avg):
        module.update(coeffs, param, grad, square_avg, momentum_buffer, grad_avg)
    else:
        _update_through_copies(module, coeffs, param, grad, square_avg, momentum_buffer, grad_avg)


def _compact(param, grad, square_avg, momentum_buffer, grad_avg, arguments):
    """The compact-state path (bfloat16 or Blockwise8 state), with the call's arguments."""
    hyperparameters = tuple(arguments[name] for name in _HYPERPARAMETERS)
    rmsprop_update_compact(param, grad, (square_avg, momentum_buffer, grad_avg),
                           hyperparameters, param_rounding=arguments["param_rounding"],
                           seed=arguments["seed"], step=arguments["step"],
                           master_param=arguments["master_param"], backend=arguments["backend"])


_HYPERPARAMETERS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize",
                    "eps_in_sqrt", "lr_in_momentum", "nesterov", "decoupled_weight_decay",
                    "grad_scale")


def _all_kernel_ready(*arrays) -> bool:
    for array in arrays:
        if array is not None and not is_kernel_ready(array):
            return False
    return True


def _update_through_copies(module, coeffs, param, grad, square_avg, momentum_buffer, grad_avg):
    """Strided or misaligned arrays: gather into contiguous copies, update, scatter back."""
    originals = (param, grad, square_avg, momentum_buffer, grad_avg)
    check_no_overlap(*originals)
    copies = [None if a is None else (a if is_kernel_ready(a) else a.copy(order="C")) for a in originals]
    module.update(coeffs, *copies)
    for index in (0, 2, 3, 4):  # the outputs
        if copies[index] is not originals[index]:
            originals[index][...] = copies[index]
