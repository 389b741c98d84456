"""The compiled ``fastrms.rmsprop_update`` for callers in ``@njit`` code: the checks, the
coefficients and the Numba backend's loop, with no Python on the way.

:func:`implementation` is the overload's typing step (fastrms/_numba_overload.py registers it).
The work is shared with the Python path, never copied: the value rules and the coefficient
arithmetic are fastrms/_coefficients.py's own functions compiled by Numba, the kernel's
arguments come from the Numba backend's ``kernel_arguments_of`` and the loop is its serial
driver ``_update_serial``. The array checks Python makes with NumPy are compiled in
fastrms/_numba_arrays.py.

Errors: the compiled checks only decide. When one refuses a call, the Python entry's own checks
run on the same arguments, in its order, in an object-mode block (the GIL is taken there, and
only there), and raise its exception: the same type, the same message, naming the argument.
Nothing is written before every check passed. Argument types that cannot pass (a float64
``grad`` for a float32 ``param``, a read-only ``param``) are known while typing, and such a call
compiles to that block alone; so is one whose types compiled code does not take (an Optional
array), which raises a TypeError saying so if Python's checks would have let it pass.

Differences from a Python call: the kernel is always Numba's (``backend`` may be None or
``"numba"``; ``use_backend``/``set_backend`` are not consulted); it runs on the calling thread
at every size, since a caller that linked the ``prange`` driver would abort when Numba loads it
from its cache in a fresh process (the threading layer is not started then: "Symbol not found:
allocate_sched"); a caller that wants threads for a large array can split it in its own
``prange`` (the update is elementwise: the same bits); and the coefficients are computed on
every call (tens of nanoseconds), there being no cache to consult from compiled code. A missing
``lr``, or a positional one, is a TypingError while Numba compiles the caller.
"""
from __future__ import annotations

import numpy as np
from numba import njit, objmode, types
from numba.extending import overload, register_jitable

from . import _coefficients, _dispatch
from ._coefficients import CENTERED, MOMENTUM, RANGES
from ._numba_arrays import compiled, gather, memory_ok, overload_options, scatter, streams_ok
from ._validation import (check_arrays, check_no_internal_overlap, check_no_overlap, check_param,
                          check_writeable)
from .backends import numba_backend
from .backends.numba_backend import _jit  # the one place for Numba's compilation settings

register_jitable(**overload_options)(_coefficients._round_to)
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
        given = dict(reals, **flags, param=param, grad=grad, square_avg=square_avg,
                     momentum_buffer=momentum_buffer, grad_avg=grad_avg, backend=backend)
        stand_ins = ";".join(f"{name}={kind}" for name in ARGUMENT_NAMES
                             if (kind := _stand_in(given[name])))
        return _raising_implementation("; ".join(problems), stand_ins)
    return _full_implementation()


#: rmsprop_update's arguments, in the order the implementations pass them on.
ARGUMENT_NAMES = ("param", "grad", "square_avg", "lr", "alpha", "eps", "weight_decay", "momentum",
                  "centered", "maximize", "eps_in_sqrt", "lr_in_momentum", "nesterov",
                  "decoupled_weight_decay", "momentum_buffer", "grad_avg", "grad_scale",
                  "backend")


def _stand_in(value) -> str:
    """How Python's checks are to see an argument of this type, where its value comes back from
    compiled code as something else, whose type name their message would print: "" (as it
    is), a NumPy scalar type (a float32 comes back a float), or "!name" for a value that cannot
    enter an object-mode block at all (a list): an empty object of that type stands in."""
    if not _is_type(value) or isinstance(value, (types.Array, types.Boolean, types.NoneType,
                                                 types.Omitted, types.UnicodeType,
                                                 types.StringLiteral, types.Optional,
                                                 types.BaseTuple)):
        return ""
    if isinstance(value, (types.Integer, types.Float, types.Complex)):
        return "" if value.name in ("int64", "float64", "complex128") else value.name
    if isinstance(value, (types.List, types.ListType)):
        return "!list"
    if isinstance(value, types.Set):
        return "!set"
    if isinstance(value, types.DictType):
        return "!dict"
    return f"!{value}"


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


def _raising_implementation(reason: str, stand_ins: str):
    message = f"fastrms.rmsprop_update in compiled code: {reason}"

    def rmsprop_update(param, grad, square_avg, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
                       momentum=0.0, centered=False, maximize=False, eps_in_sqrt=False,
                       lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
                       momentum_buffer=None, grad_avg=None, grad_scale=None, backend=None):
        _refuse(_passable(param), _passable(grad), _passable(square_avg), _passable(lr),
                _passable(alpha), _passable(eps), _passable(weight_decay), _passable(momentum),
                _passable(centered), _passable(maximize), _passable(eps_in_sqrt),
                _passable(lr_in_momentum), _passable(nesterov),
                _passable(decoupled_weight_decay), _passable(momentum_buffer),
                _passable(grad_avg), _passable(grad_scale), _passable(backend), message,
                stand_ins)

    return rmsprop_update


def _passable(value):
    """The value, or None where it cannot enter an object-mode block (see _stand_in)."""


@overload(_passable, jit_options=overload_options)
def _passable_typed(value):
    if _stand_in(value).startswith("!"):
        return lambda value: None
    return lambda value: value


# A module-level function, not the overload's closure, so that Numba's cache keeps it: a fresh
# process then compiles only the caller and the thin overload around this.
@compiled
def checked_update(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered,
                   maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                   momentum_buffer, grad_avg, grad_scale, backend):
    """rmsprop_update's checks and update, compiled (the argument types were sorted already)."""
    ok, values, flags = _checked_coefficients(
        _is_float32(param), lr, alpha, eps, weight_decay, momentum, centered, maximize,
        eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay, grad_scale)
    if ok:
        ok = (streams_ok(param, grad, square_avg, momentum_buffer, grad_avg,
                          (flags & MOMENTUM) != 0, (flags & CENTERED) != 0)
              and _backend_ok(backend)
              and memory_ok(param, grad, square_avg, momentum_buffer, grad_avg))
    if not ok:
        _refuse(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered,
                maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay,
                momentum_buffer, grad_avg, grad_scale, backend,
                "the compiled checks refused a call that Python's accept (a fastrms bug)", "")
        return
    if param.size == 0:
        return
    unscale, coefficients, forms = _kernel_arguments_of(_in_dtype_of(param, values), flags,
                                                        _in_dtype_of(param, 1.0),
                                                        _in_dtype_of(param, -0.0))
    # Contiguous arrays are used as they are; others are gathered into copies, updated and
    # scattered back (the Python path's design), which gives the same bits.
    P = gather(param)
    G = gather(grad)
    S = gather(square_avg)
    if momentum_buffer is None:
        B = P[:0]
    else:
        B = gather(momentum_buffer)
    if grad_avg is None:
        A = P[:0]
    else:
        A = gather(grad_avg)
    _update_serial(P, G, S, B, A, unscale, coefficients, forms)
    scatter(param, P)
    scatter(square_avg, S)
    if momentum_buffer is not None:
        scatter(momentum_buffer, B)
    if grad_avg is not None:
        scatter(grad_avg, A)


@compiled(nogil=False)  # it takes the GIL (nogil would only add a warning)
def _refuse(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, centered, maximize,
            eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay, momentum_buffer,
            grad_avg, grad_scale, backend, otherwise, stand_ins):
    """Raise the Python entry's exception for a call the compiled checks refused."""
    with objmode():
        raise_as_python_would(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum,
                              centered, maximize, eps_in_sqrt, lr_in_momentum, nesterov,
                              decoupled_weight_decay, momentum_buffer, grad_avg, grad_scale,
                              backend, otherwise, stand_ins)


def _is_float32(param) -> bool:
    """Whether param is float32 (else float64), known from its type."""


@overload(_is_float32, jit_options=overload_options)
def _is_float32_typed(param):
    float32 = param.dtype == types.float32
    return lambda param: float32


def _in_dtype_of(param, values):
    """A float, or a tuple of floats, as scalars of param's dtype (exact for these values)."""


@overload(_in_dtype_of, jit_options=overload_options)
def _in_dtype_of_typed(param, values):
    to = np.float32 if param.dtype == types.float32 else np.float64
    if isinstance(values, types.BaseTuple):
        return lambda param, values: (to(values[0]), to(values[1]), to(values[2]),
                                      to(values[3]), to(values[4]), to(values[5]),
                                      to(values[6]), to(values[7]), to(values[8]),
                                      to(values[9]))
    return lambda param, values: to(values)


def raise_as_python_would(*arguments):
    """Run the Python entry's checks on a call, in its order, writing nothing: they raise its
    exception. ``arguments``: those of ARGUMENT_NAMES, then ``otherwise``, the TypeError's
    message if none of the checks raises (a call Python accepts, with types compiled code does
    not take, or a fastrms bug), then the stand-ins (see _stand_in)."""
    *values, otherwise, stand_ins = arguments
    given = dict(zip(ARGUMENT_NAMES, values))
    for item in filter(None, stand_ins.split(";")):
        name, kind = item.split("=")
        if kind.startswith("!"):
            kind = kind[1:]
            given[name] = {"list": list, "set": set, "dict": dict}.get(
                kind, type(kind, (), {}))()
        else:
            given[name] = getattr(np, kind)(given[name])
    param, grad, square_avg = given["param"], given["grad"], given["square_avg"]
    momentum_buffer, grad_avg, backend = (given["momentum_buffer"], given["grad_avg"],
                                          given["backend"])
    # Python's message (rmsprop_update also takes 16-bit parameters; compiled callers do not yet).
    dtype = check_param(param, accepted="float32, float64, float16 or bfloat16")
    coeffs = _coefficients.kernel_coefficients(
        dtype, *(given[name] for name in ARGUMENT_NAMES[3:14]), grad_scale=given["grad_scale"])
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

@compiled
def _optional_real(value):
    """(True, value as float), or (False, 0.0) for None."""
    if value is None:
        return False, 0.0
    return True, float(value)


@compiled
def _in_range(value, bounds) -> bool:
    return _range_violation(value, bounds[0], bounds[1], bounds[2]) == 0


@compiled
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


@compiled
def _backend_ok(backend) -> bool:
    if backend is None:
        return True
    return backend == "numba"
