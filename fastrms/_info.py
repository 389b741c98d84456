"""``fastrms.info()``: what is available, what automatic choice picks, and why."""
from __future__ import annotations

import platform
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

from . import _dispatch, _threads, backends
from ._coefficients import CENTERED, MOMENTUM
from ._version import __version__


def info(size: int = 10**6, dtype: DTypeLike = np.float32) -> dict[str, Any]:
    """A plain dict describing this installation.

    It lists each backend (available or not, and why: not built, the compiler's error recorded
    when the build failed, or the error loading the extension), what automatic choice picks for
    ``size`` elements of ``dtype`` in each variant (and why), the thread count, the SIMD level
    the C kernel selected at run time, and the Numba threading layer once a parallel Numba
    kernel has run (``fastrms info --load-numba`` runs one). ``fastrms info`` prints it.

    >>> import fastrms
    >>> report = fastrms.info(size=1000)
    >>> sorted(report["backends"]) == sorted(fastrms.BACKEND_NAMES)
    True
    >>> report["backends"]["numpy"]["available"]
    True
    >>> report["automatic_choice"]["plain"]["backend"] in fastrms.BACKEND_NAMES
    True
    """
    report: dict[str, Any] = {
        "version": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "threads": _threads.get_num_threads(),
        "backends": {},
        "requested_backend": dict(zip(("name", "source"), _dispatch.requested_backend(None))),
        "automatic_choice": {},
    }
    for name in backends.BACKEND_NAMES:
        available, reason = backends.availability(name)
        entry = {"available": available, "reason": reason}
        module = backends.loaded_backends().get(name)
        if module is not None:
            entry.update(module.describe())
        report["backends"][name] = entry
    c_entry = report["backends"]["c"]
    report["simd_level"] = c_entry.get("simd_level", "n/a (C backend unavailable)")
    numba_entry = report["backends"]["numba"]
    report["numba_threading_layer"] = numba_entry.get("threading_layer", "numba not loaded yet")
    for variant, flags in (("plain", 0), ("momentum", MOMENTUM), ("centered", CENTERED)):
        name, why = _dispatch.automatic_choice(size, dtype, flags)
        report["automatic_choice"][variant] = {"size": size, "dtype": str(np.dtype(dtype)),
                                               "backend": name, "why": why}
    return report
