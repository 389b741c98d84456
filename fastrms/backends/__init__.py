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
- compact state (bfloat16 arrays, :class:`fastrms.Blockwise8`), in the module
  :func:`compact_module` names (the backend's own, or a companion when the backend's file is
  full): ``update_compact(coeffs, param, grad, square_avg, momentum_buffer, grad_avg,
  master_param=None, key=None)``, float32 coefficients; param float32, float16 or bfloat16;
  each state a float32 / bfloat16 array of param's shape or a Blockwise8; dense arrays
  C-contiguous and aligned (the reference takes any strides); ``decode_blockwise8(codes,
  scales, signed)`` / ``encode_blockwise8(values, signed)``; ``roofline_compact`` (C).
- ``set_num_threads(n)`` and ``describe()``, a dict for :func:`fastrms.info`.

Modules are imported on first use, so ``import fastrms`` never imports Numba. Tests take their
list of backends from :data:`BACKEND_NAMES`, so a backend added here is tested automatically.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
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
#: Called with each backend module when it is first loaded (fastrms._threads registers the one
#: that gives it the thread count chosen before it was loaded).
on_load: list = []


def check_name(name: object) -> str:
    """``name`` if it names a backend, else ValueError naming the choices."""
    if not isinstance(name, str) or name not in _MODULES:
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
    except (ImportError, AttributeError, OSError) as exc:
        _load_errors[name] = _c_reason(exc) if name == "c" else f"{type(exc).__name__}: {exc}"
        raise RuntimeError(f"backend {name!r} is unavailable: {_load_errors[name]}") from exc
    _loaded[name] = module
    for hook in on_load:
        hook(module)
    return module


#: Left beside the package by the build (csrc/setup_commands.py) when the C extension failed to
#: compile: the compiler's error, as the install saw it.
BUILD_ERROR_FILE = "_fastrms_c.build-error.txt"
_EXTENSION = "fastrms._fastrms_c"


def _c_reason(exc: BaseException) -> str:
    """Why the C backend did not load: never built, failed to build (the compiler's error,
    recorded at install time), or built but failed to load (a corrupt or foreign .so)."""
    package_dir = Path(__file__).resolve().parent.parent
    try:
        spec = importlib.util.find_spec(_EXTENSION)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        recorded = package_dir / BUILD_ERROR_FILE
        if recorded.is_file():
            return recorded.read_text(errors="replace").strip()
        return (f"the C extension {_EXTENSION} is not built in {package_dir} (install with "
                f"`pip install .` and a C compiler; inside the source tree, `pip install -e .` "
                f"or `python setup.py build_ext --inplace`, since the tree's own fastrms/ "
                f"shadows an installed copy there)")
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return f"the C extension {spec.origin} failed to load: {type(cause).__name__}: {cause}"


#: Companion modules holding a backend's compact-state functions (see the module docstring).
_COMPACT_MODULES = {"numba": "fastrms.backends.numba_compact"}


def compact_module(module: ModuleType) -> ModuleType:
    """The module with ``update_compact`` for a loaded backend module."""
    if hasattr(module, "update_compact"):
        return module
    for name, loaded in _loaded.items():
        if loaded is module and name in _COMPACT_MODULES:
            return importlib.import_module(_COMPACT_MODULES[name])
    raise RuntimeError(f"backend {module.__name__} has no compact-state update")


def compact_checks_overlap(module: ModuleType) -> bool:
    """Whether a compact module's ``update_compact`` itself refuses overlapping buffers before
    it writes (the C kernel does; the Numba and NumPy ones rely on the caller's check)."""
    return module is _loaded.get("c")


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
    except RuntimeError:
        return False, _load_errors[name]
    return True, "loaded"


def loaded_backends() -> dict[str, ModuleType]:
    """The backends imported so far, by name."""
    return dict(_loaded)
