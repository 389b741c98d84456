"""fastrms: the fused RMSProp optimizer update for CPU training.

One pass over memory updates the parameters, the mean-square accumulator and, when asked, the
momentum buffer and the centered gradient average. Three backends give the same bits: ``"c"``
(cffi, OpenMP, SIMD chosen at run time), ``"numba"`` and ``"numpy"`` (the reference).

>>> import numpy as np, fastrms
>>> param = np.ones(1000, np.float32); grad = np.full(1000, 0.5, np.float32)
>>> square_avg = np.zeros_like(param)
>>> fastrms.rmsprop_update(param, grad, square_avg, lr=0.01)
"""
from ._blockwise import Blockwise8
from ._c_api import get_include
from ._coefficients import Coefficients, kernel_coefficients
from ._dispatch import (BackendFallbackWarning, BackendUnavailableError, automatic_choice,
                        set_backend, use_backend)
from ._info import info
from ._threads import get_num_threads, set_num_threads
from ._update import rmsprop_update
from ._version import __version__
from .backends import BACKEND_NAMES
from .flat import FlatParams
from .optimizer import RMSprop, state_dict_from_arrays, state_dict_to_arrays

__all__ = [
    "BACKEND_NAMES",
    "BackendFallbackWarning",
    "BackendUnavailableError",
    "Blockwise8",
    "Coefficients",
    "FlatParams",
    "RMSprop",
    "__version__",
    "automatic_choice",
    "get_include",
    "get_num_threads",
    "info",
    "kernel_coefficients",
    "rmsprop_update",
    "set_backend",
    "set_num_threads",
    "state_dict_from_arrays",
    "state_dict_to_arrays",
    "use_backend",
]


def __getattr__(name: str):
    # fastrms._C_API (fastrms/_c_api.py) is made on first use, so that import stays quick.
    if name == "_C_API":
        from . import _c_api

        capsule = globals()["_C_API"] = _c_api.capsule()
        return capsule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
