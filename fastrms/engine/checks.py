"""The engine's per-step checks: parameters that must not share memory, and gradients that must fit
their parameters and must not lie in memory the step writes. Everything here runs before the
first write of a step.

The checks are C-level passes over lists (``map``, list ``==``, one NumPy call per list), so a
step over hundreds of arrays costs microseconds; the loops that can name a culprit run only when
a pass fails.
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Callable

import cffi
import numpy as np

from .._codecs import FLOAT32, LOW_PRECISION_DTYPES

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # pragma: no cover - NumPy < 2
    byte_bounds = np.byte_bounds

# cffi only to read the data pointers of many arrays at once: from_buffer into one pointer array
# costs ~0.2 us per array, where ndarray.__array_interface__ or .ctypes costs over 1 us.
# from_buffer also refuses arrays that are not C-contiguous, the other thing a step must know.
# The compiled module's FFI does this in C; a plain cffi.FFI() (Python-level methods, ~1.5x
# slower) serves when the C extension was not built.
try:
    from .._fastrms_c import ffi as _ffi
except ImportError:  # pragma: no cover - C extension not built
    _ffi = cffi.FFI()
_CHAR_ARRAY = _ffi.typeof("char[]")
_CHAR_ARRAYS = itertools.repeat(_CHAR_ARRAY)  # map(_from_buffer, _CHAR_ARRAYS, arrays): a C loop
_POINTER_ARRAY = _ffi.typeof("char *[]")
_from_buffer = _ffi.from_buffer
_NULL = _ffi.NULL
_ndarray = np.ndarray
_NDARRAY_ONLY = {np.ndarray}
get_dtype = operator.attrgetter("dtype")
get_shape = operator.attrgetter("shape")


def check_params_disjoint(params: list, describe: Callable[[int, int], str]) -> None:
    """Parameters must not share memory: the multi-tensor kernel writes them concurrently.
    A sweep over byte ranges; exact (any strides) only where ranges meet. ``describe(j, i)``
    words the error for parameters ``j < i``."""
    spans = sorted((*byte_bounds(p), i) for i, p in enumerate(params) if p.size)
    active: list[tuple[int, int]] = []
    for lo, hi, i in spans:
        active = [(end, j) for end, j in active if end > lo]
        for _, j in active:
            if np.shares_memory(params[i], params[j]):
                raise ValueError(describe(min(i, j), max(i, j)))
        active.append((hi, i))


class WrittenRegions:
    """The memory a step writes, as sorted disjoint byte ranges, to test gradients against.

    ``arrays`` are every array a step writes; ``describe(array)`` names one of them in an error.
    """

    __slots__ = ("arrays", "describe", "lo", "hi", "clean")

    def __init__(self, arrays: list, describe: Callable[[np.ndarray], str]):
        self.arrays = arrays
        self.describe = describe
        merged: list[list[int]] = []
        for lo, hi in sorted(byte_bounds(a) for a in arrays):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.lo = np.array([m[0] for m in merged], dtype=np.uintp)
        self.hi = np.array([m[1] for m in merged], dtype=np.uintp)
        #: Gradient addresses that last passed the checks against these regions.
        self.clean = None

    def may_overlap(self, addresses: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Per gradient (start address, size in bytes): True where its byte range meets a
        written range (exact for contiguous gradients, conservative for others)."""
        if not self.lo.size:
            return np.zeros(addresses.shape, bool)
        hi = addresses + nbytes
        last = np.searchsorted(self.lo, hi, side="left").astype(np.int64) - 1
        return (last >= 0) & (self.hi[last] > addresses) & (nbytes != 0)

    def check(self, label: str, grad: np.ndarray) -> None:
        """Raise ``ValueError`` when ``grad`` shares memory with an array the step writes."""
        if grad.size == 0:
            return
        for array in self.arrays:
            if np.may_share_memory(grad, array) and np.shares_memory(grad, array):
                raise ValueError(f"{label} shares memory with {self.describe(array)}; every "
                                 f"gradient must be its own buffer")


class ArrayGradients:
    """Checks a list of NumPy gradients against their parameters' dtypes and shapes and against
    the memory the step writes, and reads their data addresses.

    ``label(k)`` names gradient k in errors; ``owner.regions`` is the memory the step writes
    (an :class:`~fastrms.engine.Engine`'s, rebuilt when a buffer is added). :meth:`check`
    returns the gradients (strided or misaligned ones replaced by C-contiguous copies;
    subclasses viewed as plain arrays) and their data addresses as an ``np.uintp`` array, or
    raises with nothing written. A float16 / bfloat16 parameter's gradient has its dtype or
    float32.
    """

    __slots__ = ("dtypes", "shapes", "nbytes", "align_mask", "owner", "label")

    def __init__(self, dtypes: list, shapes: list, itemsizes: list, owner,
                 label: Callable[[int], str]):
        self.dtypes = list(dtypes)
        self.shapes = list(shapes)
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        self.nbytes = np.array([n * i for n, i in zip(sizes, itemsizes)], dtype=np.uintp)
        self.align_mask = np.array([i - 1 for i in itemsizes], dtype=np.uintp)
        self.owner = owner  # its .regions: the WrittenRegions in force (an Engine's)
        self.label = label

    def check(self, grads: list) -> tuple[list, np.ndarray]:
        if len(grads) != len(self.dtypes):
            raise ValueError(f"got {len(grads)} gradients for {len(self.dtypes)} parameters")
        try:
            fits = (list(map(get_dtype, grads)) == self.dtypes
                    and list(map(get_shape, grads)) == self.shapes
                    and set(map(type, grads)) == _NDARRAY_ONLY)
        except AttributeError:
            fits = False
        nbytes, align_mask = self.nbytes, self.align_mask
        if not fits:
            for k, (g, dtype, shape) in enumerate(zip(grads, self.dtypes, self.shapes)):
                self._check_one(k, g, dtype, shape)
            # Subclasses (np.matrix, masked arrays) are read as the plain memory they hold.
            grads = [g if type(g) is _ndarray else g.view(_ndarray) for g in grads]
            if list(map(get_dtype, grads)) != self.dtypes:  # float32 gradients of 16-bit params
                nbytes = np.array([g.nbytes for g in grads], dtype=np.uintp)
                align_mask = np.array([g.itemsize - 1 for g in grads], dtype=np.uintp)
        try:
            keep = _ffi.new(_POINTER_ARRAY, list(map(_from_buffer, _CHAR_ARRAYS, grads)))
        except (ValueError, BufferError):  # some are not C-contiguous: NULL marks them
            keep = _ffi.new(_POINTER_ARRAY, [_pointer_or_null(g) for g in grads])
        lo = np.frombuffer(_ffi.buffer(keep), dtype=np.uintp)
        # The same addresses as a step that passed: the same verdict (the sizes are fixed by the
        # checks above, the regions until they are rebuilt). A loop that reuses its gradient
        # buffers skips a dozen NumPy calls per step.
        regions = self.owner.regions
        clean = regions.clean
        same_sizes = nbytes is self.nbytes  # the verdict of `clean` is for these sizes only
        if same_sizes and clean is not None and np.array_equal(lo, clean):
            return grads, lo
        strided = lo == 0
        misaligned = (lo & align_mask) != 0
        suspects = strided | misaligned | regions.may_overlap(lo, nbytes)
        if not suspects.any():
            if same_sizes:
                regions.clean = lo.copy()
            return grads, lo
        # The rare path: exact checks, then copies of what the kernels cannot read directly.
        grads = list(grads)
        lo = lo.copy()  # a view of `keep` until now
        for k in np.flatnonzero(suspects).tolist():
            g = grads[k]
            regions.check(self.label(k), g)
            if strided[k] or misaligned[k]:
                grads[k] = np.array(g, order="C", copy=True)
                lo[k] = int(_ffi.cast("uintptr_t", _from_buffer(_CHAR_ARRAY, grads[k])))
        return grads, lo

    def _check_one(self, k: int, g, dtype, shape) -> None:
        """Raise the precise error, or accept (an ndarray subclass, or an equal dtype that is
        not the same object)."""
        label = self.label(k)
        if not isinstance(g, np.ndarray):
            raise TypeError(f"{label} must be a numpy.ndarray, got {type(g).__name__}")
        if g.dtype != dtype and not (dtype in LOW_PRECISION_DTYPES and g.dtype == FLOAT32):
            if dtype in LOW_PRECISION_DTYPES:
                raise TypeError(f"{label} has dtype {g.dtype} but its parameter has dtype "
                                f"{dtype}: a {dtype} parameter takes a gradient of dtype "
                                f"{dtype} or float32")
            raise TypeError(f"{label} has dtype {g.dtype} but its parameter has dtype {dtype}")
        if g.shape != shape:
            raise ValueError(f"{label} has shape {g.shape} but its parameter has shape {shape}")


def _pointer_or_null(g):
    try:
        return _from_buffer(_CHAR_ARRAY, g)
    except (ValueError, BufferError):
        return _NULL
