"""The compiled ``fastrms.rmsprop_update`` for callers in ``@njit`` code: the checks, the
coefficients and the Numba backend's driver, with no Python on the way.

:func:`implementation` is the overload's typing step (fastrms/_numba_overload.py registers it).
The work is shared with the Python path, never copied: the value rules and the coefficient
arithmetic are fastrms/_coefficients.py's own functions compiled by Numba, the kernel's
arguments come from the Numba backend's ``kernel_arguments_of`` and the loop is its driver
``update_flat``. What compiles here are the checks on arrays that Python makes with NumPy:
shapes, optional buffers, and overlap between and within arrays (exact, as
``np.shares_memory``).

Errors: the compiled checks only decide. When one refuses a call, the Python entry's own checks
run on the same arguments, in its order, in an object-mode block (the GIL is taken there, and
only there), and raise its exception: the same type, the same message, naming the argument.
Nothing is written before every check passed. Argument types that cannot pass (a float64
``grad`` for a float32 ``param``, a read-only ``param``) are known while typing, and such a call
compiles to that block alone.

Differences from a Python call: the kernel is always Numba's (``backend`` may be None or
``"numba"``; ``use_backend``/``set_backend`` are not consulted), the thread count is Numba's
(``numba.get_num_threads()``), and the coefficients are computed on every call (a few dozen
nanoseconds), there being no cache to consult from compiled code.
"""
from __future__ import annotations

import numpy as np
from numba import njit, objmode, types
from numba.extending import overload, register_jitable

from . import _coefficients, _dispatch, backends
from ._coefficients import CENTERED, MOMENTUM, RANGES, FLOAT_DTYPES
from ._validation import (check_arrays, check_no_internal_overlap, check_no_overlap, check_param,
                          check_writeable)
from .backends import numba_backend
from .backends.numba_backend import _jit  # the one place for Numba's compilation settings

#: Options of the overloads here: no fastmath, whatever the calling function's (Numba would
#: otherwise let a caller's fastmath=True reach them).
_overload_options = {"fastmath": False, "error_model": "numpy"}
register_jitable(**_overload_options)(_coefficients._round_to)
_coefficient_arithmetic = njit(**_jit)(_coefficients.coefficient_arithmetic)
_range_violation = njit(**_jit)(_coefficients.range_violation)
_kernel_arguments_of = njit(**_jit)(numba_backend.kernel_arguments_of)
_update_serial = numba_backend._update_serial

_LR, _ALPHA, _EPS, _WEIGHT_DECAY, _MOMENTUM, _GRAD_SCALE = (
    RANGES[name] for name in ("lr", "alpha", "eps", "weight_decay", "momentum", "grad_scale"))
_NO_VALUES = (0.0,) * 10


# -- typing: which implementation serves these argument types -----------------------------------

def implementation(param, grad, square_avg, momentum_buffer, grad_avg, backend, reals, flags):
    """The compiled function for one set of argument types (a default value where one was left
    out): the full implementation, or, where the types alone must fail Python's checks or are
    not supported in compiled code, one that only raises."""
    problems = _type_problems(param, grad, square_avg, momentum_buffer, grad_avg, backend, reals,
                              flags)
    if problems:
        return _raising_implementation("; ".join(problems))
    return _full_implementation()


def _is_type(value) -> bool:
    return isinstance(value, types.Type)


def _real_ok(value) -> bool:
    """A number Python accepts (not a bool, not complex), None (Python refuses it, with a
    message), or an Optional of such a number; or a default left out."""
    if not _is_type(value):
        return True
    if isinstance(value, types.Optional):
        value = value.type
    return (isinstance(value, (types.NoneType, types.Omitted))
            or (isinstance(value, (types.Integer, types.Float))
                and not isinstance(value, types.Boolean)))


def _type_problems(param, grad, square_avg, momentum_buffer, grad_avg, backend, reals, flags):
    """Why these argument types cannot run the compiled update (an empty list if they can)."""
    if not (isinstance(param, types.Array) and param.dtype in (types.float32, types.float64)):
        return [f"param must be a float32 or float64 array, got {param}"]
    problems = []
    for name, value in reals.items():
        if not _real_ok(value):
            problems.append(f"{name} must be a real number, got {value}")
    for name, value in flags.items():
        if _is_type(value) and not isinstance(value, types.Boolean):
            problems.append(f"{name} must be a bool, got {value}")
    arrays = {"param": param, "grad": grad, "square_avg": square_avg,
              "momentum_buffer": momentum_buffer, "grad_avg": grad_avg}
    for name, value in arrays.items():
        if name in ("momentum_buffer", "grad_avg") and (
                not _is_type(value) or isinstance(value, (types.NoneType, types.Omitted))):
            continue
        if not (isinstance(value, types.Array) and value.dtype == param.dtype
                and value.ndim == param.ndim):
            problems.append(f"{name} must be an array of param's dtype and ndim "
                            f"({param.dtype}, {param.ndim}), got {value}")
        elif name != "grad" and not value.mutable:
            problems.append(f"{name} is read-only; it is updated in place and must be writeable")
    if _is_type(backend) and not isinstance(backend, (types.NoneType, types.Omitted,
                                                      types.UnicodeType, types.StringLiteral)):
        problems.append(f"backend must be None or 'numba', got {backend}")
    return problems


# -- the implementations -------------------------------------------------------------------------

def _full_implementation():
    def rmsprop_update(param, grad, square_avg, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
                       momentum=0.0, centered=False, maximize=False, eps_in_sqrt=False,
                       lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
                       momentum_buffer=None, grad_avg=None, grad_scale=None, backend=None):
        checked_update(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered,
                       maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                       momentum_buffer, grad_avg, grad_scale, backend)

    return rmsprop_update


def _raising_implementation(reason: str):
    message = f"fastrms.rmsprop_update in compiled code: {reason}"

    def rmsprop_update(param, grad, square_avg, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
                       momentum=0.0, centered=False, maximize=False, eps_in_sqrt=False,
                       lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
                       momentum_buffer=None, grad_avg=None, grad_scale=None, backend=None):
        _refuse(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered,
                maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                momentum_buffer, grad_avg, grad_scale, backend, message)

    return rmsprop_update


# A module-level function, not the overload's closure, so that Numba's cache keeps it: a fresh
# process then compiles only the caller and the thin overload around this.
@njit(**_jit)
def checked_update(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered,
                   maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                   momentum_buffer, grad_avg, grad_scale, backend):
    """rmsprop_update's checks and update, compiled (the argument types were sorted already)."""
    ok, values, flags = _checked_coefficients(
        _is_float32(param), lr, alpha, eps, weight_decay, momentum, centered, maximize,
        eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)
    if ok:
        ok = (_streams_ok(param, grad, square_avg, momentum_buffer, grad_avg,
                          (flags & MOMENTUM) != 0, (flags & CENTERED) != 0)
              and _backend_ok(backend)
              and _memory_ok(param, grad, square_avg, momentum_buffer, grad_avg))
    if not ok:
        _refuse(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered,
                maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                momentum_buffer, grad_avg, grad_scale, backend,
                "the compiled checks refused a call that Python's accept (a fastrms bug)")
        return
    if param.size == 0:
        return
    unscale, coefficients, forms = _kernel_arguments_of(_in_dtype_of(param, values), flags,
                                                        _in_dtype_of(param, 1.0),
                                                        _in_dtype_of(param, -0.0))
    # Contiguous arrays are used as they are; others are gathered into copies, updated and
    # scattered back (the Python path's design), which gives the same bits.
    P = _gather(param)
    G = _gather(grad)
    S = _gather(square_avg)
    if momentum_buffer is None:
        B = P[:0]
    else:
        B = _gather(momentum_buffer)
    if grad_avg is None:
        A = P[:0]
    else:
        A = _gather(grad_avg)
    _update_serial(P, G, S, B, A, unscale, coefficients, forms)
    _scatter(param, P)
    _scatter(square_avg, S)
    if momentum_buffer is not None:
        _scatter(momentum_buffer, B)
    if grad_avg is not None:
        _scatter(grad_avg, A)


@njit(**_jit)
def _refuse(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered, maximize,
            eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay, momentum_buffer,
            grad_avg, grad_scale, backend, otherwise):
    """Raise the Python entry's exception for a call the compiled checks refused."""
    with objmode():
        raise_as_python_would(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum,
                              centered, maximize, eps_in_sqrt, lr_in_momentum, nesterov,
                              decoupled_weight_decay, momentum_buffer, grad_avg, grad_scale,
                              backend, otherwise)


def _is_float32(param) -> bool:
    """Whether param is float32 (else float64), known from its type."""


@overload(_is_float32, jit_options=_overload_options)
def _is_float32_typed(param):
    float32 = param.dtype == types.float32
    return lambda param: float32


def _in_dtype_of(param, values):
    """A float, or a tuple of floats, as scalars of param's dtype (exact for these values)."""


@overload(_in_dtype_of, jit_options=_overload_options)
def _in_dtype_of_typed(param, values):
    to = np.float32 if param.dtype == types.float32 else np.float64
    if isinstance(values, types.BaseTuple):
        return lambda param, values: (to(values[0]), to(values[1]), to(values[2]),
                                      to(values[3]), to(values[4]), to(values[5]),
                                      to(values[6]), to(values[7]), to(values[8]),
                                      to(values[9]))
    return lambda param, values: to(values)


def raise_as_python_would(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum,
                          centered, maximize, eps_in_sqrt, lr_in_momentum, nesterov,
                          decoupled_weight_decay, momentum_buffer, grad_avg, grad_scale, backend,
                          otherwise: str):
    """Run the Python entry's checks on a call, in its order, writing nothing: they raise its
    exception. ``otherwise``: the TypeError's message if none of them raises (a call Python
    accepts with types compiled code does not take, or a fastrms bug)."""
    dtype = check_param(param)
    coeffs = _coefficients.kernel_coefficients(
        dtype, lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt,
        lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)
    check_arrays(param, grad, square_avg, momentum_buffer, grad_avg, coeffs.uses_momentum,
                 coeffs.centered)
    if backend is not None and backend != "numba":
        _dispatch.load_requested(backend, "backend argument")  # an unknown name raises here
        raise ValueError(f"backend {backend!r} cannot run in compiled code, which always runs "
                         f"the Numba kernel; pass backend=None or 'numba'")
    check_writeable(param, square_avg, momentum_buffer, grad_avg)
    check_no_internal_overlap(param=param, square_avg=square_avg,
                              momentum_buffer=momentum_buffer, grad_avg=grad_avg)
    check_no_overlap(param, grad, square_avg, momentum_buffer, grad_avg)
    raise TypeError(otherwise)


# -- the compiled checks -------------------------------------------------------------------------

@njit(**_jit)
def _optional_real(value):
    """(True, value as float), or (False, 0.0) for None."""
    if value is None:
        return False, 0.0
    return True, float(value)


@njit(**_jit)
def _in_range(value, bounds) -> bool:
    return _range_violation(value, bounds[0], bounds[1], bounds[2]) == 0


@njit(**_jit)
def _checked_coefficients(float32, lr, alpha, eps, weight_decay, momentum, centered, maximize,
                          eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                          grad_scale):
    """(ok, values, flags): _coefficients._compute's checks and arithmetic on compiled values."""
    lr_given, lr = _optional_real(lr)
    alpha_given, alpha = _optional_real(alpha)
    eps_given, eps = _optional_real(eps)
    weight_decay_given, weight_decay = _optional_real(weight_decay)
    momentum_given, momentum = _optional_real(momentum)
    scaled, grad_scale = _optional_real(grad_scale)  # None: no loss scale
    if not (lr_given and alpha_given and eps_given and weight_decay_given and momentum_given):
        return False, _NO_VALUES, 0
    if not (_in_range(lr, _LR) and _in_range(alpha, _ALPHA) and _in_range(eps, _EPS)
            and _in_range(weight_decay, _WEIGHT_DECAY) and _in_range(momentum, _MOMENTUM)):
        return False, _NO_VALUES, 0
    if nesterov and momentum == 0.0:
        return False, _NO_VALUES, 0
    if scaled:
        if not _in_range(grad_scale, _GRAD_SCALE) or grad_scale == 0.0:
            return False, _NO_VALUES, 0
    else:
        grad_scale = 1.0
    error, _, values, flags = _coefficient_arithmetic(
        float32, lr, alpha, eps, weight_decay, momentum, bool(centered), bool(maximize),
        bool(eps_in_sqrt), bool(lr_in_momentum), bool(nesterov), bool(decoupled_weight_decay),
        grad_scale)
    return error == 0, values, flags


@njit(**_jit)
def _optional_stream_ok(array, shape, used) -> bool:
    if array is None:
        return not used
    return used and array.shape == shape


@njit(**_jit)
def _streams_ok(param, grad, square_avg, momentum_buffer, grad_avg, uses_momentum, centered):
    shape = param.shape
    return (grad.shape == shape and square_avg.shape == shape
            and _optional_stream_ok(momentum_buffer, shape, uses_momentum)
            and _optional_stream_ok(grad_avg, shape, centered))


@njit(**_jit)
def _backend_ok(backend) -> bool:
    if backend is None:
        return True
    return backend == "numba"


# Each check below has a general form and, where it knows the answer from the types (C-contiguous
# arrays, far the most common), a trivial one: every caller compiles what it calls anew, so
# what a call does not need costs compile time only.

def _layout_c(array) -> bool:
    return isinstance(array, types.Array) and array.layout == "C"


@njit(**_jit)
def _address(array) -> int:
    return np.int64(array.ctypes.data)


@njit(**_jit)
def _extent(array):
    """[lo, hi): the bytes between the array's first and last byte (a non-empty array)."""
    lo = _address(array)
    hi = lo
    for d in range(array.ndim):
        reach = array.strides[d] * (array.shape[d] - 1)
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo, hi + array.itemsize


@njit(**_jit)
def _dense(array) -> bool:
    return array.flags.c_contiguous or array.flags.f_contiguous


@njit(**_jit)
def _element_addresses(array):
    addresses = np.empty(array.size, np.int64)
    base = _address(array)
    k = 0
    for index in np.ndindex(array.shape):
        offset = 0
        for d in range(array.ndim):
            offset += index[d] * array.strides[d]
        addresses[k] = base + offset
        k += 1
    return addresses


def _share_memory(a, b) -> bool:
    """np.shares_memory(a, b) for two arrays of one dtype: exact, any strides."""


@overload(_share_memory, jit_options=_overload_options)
def _share_memory_typed(a, b):
    if _layout_c(a) and _layout_c(b):
        return lambda a, b: _contiguous_share_memory(a, b)
    return lambda a, b: _strided_share_memory(a, b)


@njit(**_jit)
def _contiguous_share_memory(a, b) -> bool:
    if a.size == 0 or b.size == 0:
        return False
    a_lo = _address(a)
    b_lo = _address(b)
    return a_lo < b_lo + b.nbytes and b_lo < a_lo + a.nbytes


@njit(**_jit)
def _strided_share_memory(a, b) -> bool:
    if a.size == 0 or b.size == 0:
        return False
    a_lo, a_hi = _extent(a)
    b_lo, b_hi = _extent(b)
    if a_hi <= b_lo or b_hi <= a_lo:
        return False
    if _dense(a) and _dense(b):  # each covers its whole extent
        return True
    # Strided arrays may interleave without sharing a byte: look at every element's bytes.
    size = a.itemsize
    others = np.sort(_element_addresses(b))
    for start in _element_addresses(a):
        j = np.searchsorted(others, start - size + 1)
        if j < others.size and others[j] < start + size:
            return True
    return False


@njit(**_jit)
def _disjoint(a, b) -> bool:
    if a is None:
        return True
    if b is None:
        return True
    return not _share_memory(a, b)


def _overlaps_itself(array) -> bool:
    """_validation.check_no_internal_overlap's test: strides sorted, each must step over
    everything inside it."""


@overload(_overlaps_itself, jit_options=_overload_options)
def _overlaps_itself_typed(array):
    if _layout_c(array) or not isinstance(array, types.Array):  # or None: no array
        return lambda array: False
    return lambda array: _strided_overlaps_itself(array)


@njit(**_jit)
def _strided_overlaps_itself(array) -> bool:
    if array.size <= 1 or _dense(array):
        return False
    strides = np.empty(array.ndim, np.int64)
    lengths = np.empty(array.ndim, np.int64)
    k = 0
    for d in range(array.ndim):
        if array.shape[d] > 1:
            strides[k] = abs(array.strides[d])
            lengths[k] = array.shape[d]
            k += 1
    for i in range(1, k):  # insertion sort by (stride, length), as Python sorts the pairs
        stride, length = strides[i], lengths[i]
        j = i - 1
        while j >= 0 and (strides[j] > stride or (strides[j] == stride and lengths[j] > length)):
            strides[j + 1] = strides[j]
            lengths[j + 1] = lengths[j]
            j -= 1
        strides[j + 1] = stride
        lengths[j + 1] = length
    extent = array.itemsize
    for i in range(k):
        if strides[i] < extent:
            return True
        extent += strides[i] * (lengths[i] - 1)
    return False


@njit(**_jit)
def _memory_ok(param, grad, square_avg, momentum_buffer, grad_avg) -> bool:
    if (_overlaps_itself(param) or _overlaps_itself(square_avg)
            or _overlaps_itself(momentum_buffer) or _overlaps_itself(grad_avg)):
        return False
    return (_disjoint(param, grad) and _disjoint(param, square_avg)
            and _disjoint(param, momentum_buffer) and _disjoint(param, grad_avg)
            and _disjoint(grad, square_avg) and _disjoint(grad, momentum_buffer)
            and _disjoint(grad, grad_avg) and _disjoint(square_avg, momentum_buffer)
            and _disjoint(square_avg, grad_avg) and _disjoint(momentum_buffer, grad_avg))


def _gather(array):
    """The array's elements as a flat C-contiguous array: a view if it is contiguous, else a copy."""


@overload(_gather, jit_options=_overload_options)
def _gather_typed(array):
    if _layout_c(array):
        return lambda array: array.reshape(-1)
    return lambda array: np.ascontiguousarray(array).reshape(-1)


def _scatter(array, flat) -> None:
    """Write a gathered copy back into its array (nothing where _gather gave a view)."""


@overload(_scatter, jit_options=_overload_options)
def _scatter_typed(array, flat):
    if _layout_c(array):
        return lambda array, flat: None

    def scatter(array, flat):
        if _address(flat) != _address(array):
            array[...] = flat.reshape(array.shape)
    return scatter
