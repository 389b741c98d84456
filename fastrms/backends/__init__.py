"""The backend registry: every implementation of the fused update, by name.

Each backend module provides

- ``update(coeffs, param, grad, square_avg, momentum_buffer, grad_avg)``: one step on
  C-contiguous, aligned arrays of one shape (``momentum_buffer`` / ``grad_avg`` are None when
  their flag is off). It may assume the arrays passed validation, except for overlap, which it
  must check itself before writing.
- ``update_if_ready(coeffs, param, grad, square_avg, momentum_buffer, grad_avg) -> bool``: an
  optional cheaper path for the common case. It returns False, having written nothing, when the
  arrays are not C-contiguous, aligned, non-empty and writeable; the caller then checks and
  gathers as needed and calls ``update``.
- ``update_many(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs, *,
  cache=None)``: the same over lists of arrays of one dtype, in as few kernel calls as the
  backend can manage. ``cache`` is a dict the caller keeps between calls with the same list
  objects (all but the gradients): a backend may keep per-list conversions in it.
- ``roofline(flags, param, grad, square_avg, momentum_buffer, grad_avg)`` (compiled backends):
  the same streams with trivial arithmetic, for benchmarks.
- 16-bit parameters (float16, ``ml_dtypes.bfloat16``), with the float32 coefficients
  ``kernel_coefficients(param.dtype, ...)`` returns for them:
  ``update_low_precision(coeffs, param, grad, square_avg, momentum_buffer, grad_avg,
  master_param=None, key=None)``: ``grad`` of the param's dtype or float32, the state and
  ``master_param`` float32, all C-contiguous and aligned (the reference takes any strides);
  ``key`` (an int from ``fastrms._codecs.stochastic_key``) asks for stochastic rounding, None
  for nearest; ``master_param`` excludes ``key``. ``update_many_low_precision(coeffs, params,
  grads, square_avgs, momentum_buffers, grad_avgs, master_params=None, keys=None, *,
  cache=None)``: the same over lists (params of one dtype; ``keys`` one per array).
  ``all_finite`` takes 16-bit gradients with float32 coefficients.
  ``decode_low_precision(values)`` / ``encode_low_precision(values, dtype, key=None,
  first_index=0)``: the codecs alone; ``roofline_low_precision`` (compiled backends).
- ``set_num_threads(n)`` and ``describe()``, a dict for :func:`fastrms.info`.

Modules are imported on first use, so ``import fastrms`` never imports Numba. Tests take their
list of backends from :data:`BACKEND_NAMES`, so a backend added here is tested automatically.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: name -> module, in order of preference when several are equally fast.
_MODULES = {
    "c": "fastrms.backends.c_backend",
    "numba": "fastrms.backends.numba_backend",
    "numpy": "fastrms.backends.numpy_reference",
}
BACKEND_NAMES = tuple(_MODULES)

_loaded: dict[str, ModuleType] = {}
_load_errors: dict[str, str] = {}


def check_name(name) -> str:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKEND_NAMES))}")
    return name


def load(name: str) -> ModuleType:
    """Import the backend module, raising RuntimeError with the reason if it is unavailable."""
    module = _loaded.get(name)
    if module is not None:
        return module
    check_name(name)
    if name in _load_errors:
        raise RuntimeError(f"backend {name!r} is unavailable: {_load_errors[name]}")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        raise RuntimeError(f"backend {name!r} is unavailable: {_load_errors[name]}") from exc
    _loaded[name] = module
    from .._threads import apply_to  # late: _threads imports this module

    apply_to(module)
    return module


def availability(name: str) -> tuple[bool, str]:
    """Whether a backend can be used, and why (without importing Numba if it is not loaded yet)."""
    check_name(name)
    if name in _loaded:
        return True, "loaded"
    if name in _load_errors:
        return False, _load_errors[name]
    if name == "numba":
        if importlib.util.find_spec("numba") is None:
            return False, "numba is not installed (pip install numba)"
        return True, "installed; imported and compiled on first use"
    try:
        load(name)
    except RuntimeError as exc:
        return False, str(exc.__cause__ or exc)
    return True, "loaded"


def loaded_backends() -> dict[str, ModuleType]:
    return dict(_loaded)
