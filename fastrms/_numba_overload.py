"""Registers ``fastrms.rmsprop_update`` with Numba, so that users' ``@njit`` code can call it.

numba-scipy's design: a ``numba.extending.overload`` of the Python function itself, so that the
same name, with the same keyword arguments and defaults, works in Python and in nopython mode.
:func:`init` registers it. Numba calls it through the ``numba_extensions`` entry point of the
installed package when it first compiles anything (code running from a source tree that was
not installed can call :func:`init` itself), so ``import fastrms`` alone never imports Numba. The typing function here only sorts
the argument types; what compiles is in fastrms/_numba_entry.py, imported on first use.

>>> import numba, numpy as np, fastrms
>>> @numba.njit
... def steps(p, g, s, n):
...     for _ in range(n):
...         fastrms.rmsprop_update(p, g, s, lr=0.01, alpha=0.9, eps_in_sqrt=True)
>>> p = np.array([0.2, 0.4, 0.6]); s = np.zeros(3)
>>> steps(p, np.array([-0.5, 0.3, 0.24]), s, 1)
>>> p.round(8)
array([0.23162277, 0.36837724, 0.56837725])
"""
from __future__ import annotations

_registered = False


def init() -> None:
    """Register the overload (idempotent). The ``numba_extensions`` entry point."""
    global _registered
    if _registered:
        return
    from numba.extending import overload

    from ._update import rmsprop_update

    # strict=False: the typing function mirrors the keyword-only signature (so a positional lr is
    # refused, as in Python), while the implementation takes the same names positionally, since
    # Numba cannot fold keyword-only arguments into a compiled function's arguments.
    overload(rmsprop_update, jit_options={"fastmath": False, "error_model": "numpy"},
             strict=False)(_type_rmsprop_update)
    _registered = True


def _type_rmsprop_update(param, grad, square_avg, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
                         momentum=0.0, centered=False, maximize=False, eps_in_sqrt=False,
                         lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
                         momentum_buffer=None, grad_avg=None, grad_scale=None, backend=None):
    """Numba's typing call: the implementation for these argument types (an argument left out
    arrives as its default value, not as a type)."""
    from . import _numba_entry

    return _numba_entry.implementation(
        param, grad, square_avg, momentum_buffer, grad_avg, backend,
        reals={"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay,
               "momentum": momentum, "grad_scale": grad_scale},
        flags={"centered": centered, "maximize": maximize, "eps_in_sqrt": eps_in_sqrt,
               "lr_in_momentum": lr_in_momentum, "nesterov": nesterov,
               "decoupled_weight_decay": decoupled_weight_decay})
