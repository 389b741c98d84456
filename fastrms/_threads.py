"""One thread count for both compiled backends.

Until :func:`set_num_threads` is called, the count follows OpenMP's own setting call by call
(``OMP_NUM_THREADS``, ``omp_set_num_threads``), so ``threadpoolctl.threadpool_limits(n,
user_api="openmp")`` limits fastrms as it limits the other OpenMP libraries in the process.
Either way the count never exceeds the CPUs this process may run on: more threads than cores
would only make a memory-bound kernel wait for itself.
"""
from __future__ import annotations

import os

from . import backends

_num_threads: int | None = None


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_num_threads(n: int | None) -> None:
    """Set the number of threads the C and Numba kernels use (both, now and when loaded later),
    at most the number of usable CPUs. ``None`` goes back to following OpenMP's setting.

    >>> fastrms.set_num_threads(1)   # for example, when the caller runs its own thread pool
    """
    global _num_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1 or None, got {n!r}")
        n = min(n, _default_threads())
    _num_threads = n
    for module in backends.loaded_backends().values():
        module.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the compiled kernels use now."""
    if _num_threads is not None:
        return _num_threads
    c_backend = backends.loaded_backends().get("c")
    cores = _default_threads()
    return min(c_backend.get_num_threads(), cores) if c_backend is not None else cores


def apply_to(module) -> None:
    """Give a freshly loaded backend the thread count chosen before it was loaded."""
    module.set_num_threads(_num_threads)


backends.on_load.append(apply_to)
