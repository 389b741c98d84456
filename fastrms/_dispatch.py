"""Which backend runs a call: the argument, then ``use_backend``, then ``set_backend``, then the
``FASTRMS_BACKEND`` environment variable (read at import), then the automatic choice.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

from . import backends
from ._coefficients import CENTERED, MOMENTUM


class BackendUnavailableError(ValueError):
    """A backend was asked for by name but cannot run here; the message says why."""


class BackendFallbackWarning(RuntimeWarning):
    """Automatic choice fell back from the C backend; the message names the cause.

    Emitted once per process, at the first call that the fallback serves. To silence it,
    choose the backend explicitly (``FASTRMS_BACKEND=numba``, :func:`set_backend`) or filter
    this category.
    """


_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastrms_backend", default=None)
_global_choice: str | None = None
ENV_VARIABLE = "FASTRMS_BACKEND"
_env_choice = os.environ.get(ENV_VARIABLE) or None

#: Sizes below which the reference would still lose: the compiled backends win at every size
#: measured (docs/performance.md, "How automatic choice decides"), so the only question is which
#: compiled backend, and the C backend was never measurably slower than Numba.
AUTO_ORDER = ("c", "numba", "numpy")


def set_backend(name: str | None) -> None:
    """Make ``name`` the process-wide default backend (``None`` restores automatic choice).

    >>> import fastrms
    >>> fastrms.set_backend("numpy")
    >>> fastrms.info()["requested_backend"]
    {'name': 'numpy', 'source': 'set_backend()'}
    >>> fastrms.set_backend(None)
    """
    global _global_choice
    if name is not None:
        backends.check_name(name)
    _global_choice = name
    _refresh_auto_module()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` for calls inside the ``with`` block (this thread / task only).

    It outranks :func:`set_backend` and ``FASTRMS_BACKEND``; a ``backend=`` argument
    outranks it.

    >>> import numpy as np, fastrms
    >>> p, g, s = np.ones(4), np.full(4, 0.5), np.zeros(4)
    >>> with fastrms.use_backend("numpy"):
    ...     fastrms.rmsprop_update(p, g, s, lr=0.01)
    >>> p.round(6)
    array([0.9, 0.9, 0.9, 0.9])
    """
    backends.check_name(name)
    token = _context_choice.set(name)
    try:
        yield
    finally:
        _context_choice.reset(token)


def requested_backend(argument: str | None) -> tuple[str | None, str]:
    """The backend asked for explicitly, if any, and where the request came from."""
    if argument is not None:
        return argument, "backend argument"
    name = _context_choice.get()
    if name is not None:
        return name, "use_backend()"
    if _global_choice is not None:
        return _global_choice, "set_backend()"
    if _env_choice is not None:
        return _env_choice, f"{ENV_VARIABLE} environment variable"
    return None, "automatic"


def load_requested(name: str, source: str) -> ModuleType:
    try:
        backends.check_name(name)
    except ValueError as exc:
        raise ValueError(f"{exc} (from {source})") from None
    try:
        return backends.load(name)
    except RuntimeError as exc:
        raise BackendUnavailableError(f"{exc} (requested by {source})") from None


def automatic_choice(size: int, dtype: DTypeLike = np.float32, flags: int = 0) -> tuple[str, str]:
    """The backend automatic choice picks for ``size`` elements of ``dtype``, and why.

    ``flags`` are :class:`fastrms.Coefficients` flags (0: the plain variant).

    >>> import fastrms
    >>> name, why = fastrms.automatic_choice(10**6)
    >>> name in fastrms.BACKEND_NAMES
    True
    """
    for name in AUTO_ORDER:
        available, reason = backends.availability(name)
        if available:
            variant = _variant_name(flags)
            if name == "c":
                why = (f"C is the fastest available backend for {variant} {np.dtype(dtype)} at "
                       f"{size} elements (lowest call overhead in cache, at the roofline out of it)")
            elif name == "numba":
                c_reason = backends.availability("c")[1].strip().splitlines()[0]
                why = (f"C backend unavailable ({c_reason}); Numba beats the NumPy reference "
                       f"at every size")
            else:
                why = "no compiled backend is available; the NumPy reference serves"
            return name, why
    raise AssertionError("the numpy backend is always available")  # pragma: no cover


#: The automatically chosen module once resolved, None while set_backend or FASTRMS_BACKEND is
#: in force. The per-call fast path (see rmsprop_update) reads it after checking that no
#: use_backend() is in force in the calling context (a context variable: asyncio tasks and
#: copied contexts inherit it).
auto_module = None
context_choice = _context_choice.get


def _refresh_auto_module() -> None:
    """Forget the cached automatic module; resolve() caches it again when nothing overrides it."""
    global auto_module
    auto_module = None


def resolve(argument: str | None, size: int, dtype: DTypeLike, flags: int) -> ModuleType:
    """Return the backend module that should run a call."""
    global auto_module
    name, source = requested_backend(argument)
    if name is not None:
        return load_requested(name, source)
    if auto_module is not None:
        return auto_module
    chosen = automatic_choice(size, dtype, flags)[0]
    module = backends.load(chosen)
    if chosen != AUTO_ORDER[0]:
        _warn_fallback_once(chosen)
    if _global_choice is None and _env_choice is None:
        # The automatic choice does not depend on size, dtype or variant on the machines
        # measured so far (see automatic_choice), so it is cached for the fast path.
        auto_module = module
    return module


_fallback_warned = False


def _warn_fallback_once(chosen: str) -> None:
    """One BackendFallbackWarning per process, naming why C is unavailable."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    reason = backends.availability("c")[1].strip().splitlines()[0]
    if len(reason) > 400:
        reason = reason[:400] + " ..."
    warnings.warn(f"fastrms: the C backend is unavailable, so automatic choice uses {chosen!r} "
                  f"(slower on small arrays). Cause: {reason}. fastrms.info() gives the full "
                  f"reason; choosing a backend explicitly (FASTRMS_BACKEND={chosen}) silences "
                  f"this warning.", BackendFallbackWarning, stacklevel=4)


def _variant_name(flags: int) -> str:
    if flags & CENTERED and flags & MOMENTUM:
        return "centered+momentum"
    if flags & CENTERED:
        return "centered"
    if flags & MOMENTUM:
        return "momentum"
    return "plain"
