"""One thread count for both compiled backends."""
from __future__ import annotations

import os

from . import backends

_num_threads: int | None = None


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Set the number of threads the C and Numba kernels use (both, now and when loaded later).

    >>> fastrms.set_num_threads(1)   # for example, when the caller runs its own thread pool
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    _num_threads = n
    for module in backends.loaded_backends().values():
        module.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the compiled kernels use."""
    if _num_threads is not None:
        return _num_threads
    c_backend = backends.loaded_backends().get("c")
    return c_backend.get_num_threads() if c_backend is not None else _default_threads()


def apply_to(module) -> None:
    """Give a freshly loaded backend the thread count chosen before it was loaded."""
    if _num_threads is not None:
        module.set_num_threads(_num_threads)
