"""The array checks and copies of the compiled ``rmsprop_update`` (fastrms/_numba_entry.py),
and how that entry compiles and caches.

The checks are those the Python path makes with NumPy, compiled: shapes and the optional
buffers, overlap between arrays (exact, as ``np.shares_memory``), and outputs overlapping
themselves (fastrms/_validation.py's test). Each has a general form and, where the types tell
the answer (C-contiguous arrays, far the most common), a trivial one: every caller compiles
what it calls anew, so what a call does not need costs compile time only.
"""
from __future__ import annotations

import hashlib

import numpy as np
from numba import njit, types
from numba.core.caching import FunctionCache
from numba.extending import overload

from . import _coefficients
from .backends import numba_backend
from .backends.numba_backend import _jit  # the one place for Numba's compilation settings

#: Options of the overloads here: no fastmath, whatever the calling function's (Numba would
#: otherwise let a caller's fastmath=True reach them).
overload_options = {"fastmath": False, "error_model": "numpy"}


class _DependencyKeyedCache(FunctionCache):
    """Numba's on-disk cache, its entries keyed also on the sources of the other files whose
    functions get compiled into ours: Numba's own key covers only the function's file, so an
    edited (or upgraded) _coefficients.py or numba_backend.py would otherwise leave their old
    code inside our cached functions."""

    fingerprint = ""

    def _index_key(self, sig, codegen):
        return (*super()._index_key(sig, codegen), self.fingerprint)


def _sources_fingerprint(*modules) -> str:
    digest = hashlib.sha256()
    for module in modules:
        with open(module.__file__, "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()


_DependencyKeyedCache.fingerprint = _sources_fingerprint(_coefficients, numba_backend)


def compiled(function=None, **options):
    """numba.njit with the backend's settings (and ``options``), cached with
    :class:`_DependencyKeyedCache`."""
    if function is None:
        return lambda function: compiled(function, **options)
    settings = dict(_jit, **options)
    cache = settings.pop("cache")
    dispatcher = njit(cache=False, **settings)(function)
    if cache:
        dispatcher._cache = _DependencyKeyedCache(dispatcher.py_func)
    return dispatcher


@compiled
def _optional_stream_ok(array, shape, used) -> bool:
    if array is None:
        return not used
    return used and array.shape == shape


@compiled
def streams_ok(param, grad, square_avg, momentum_buffer, grad_avg, uses_momentum, centered):
    shape = param.shape
    return (grad.shape == shape and square_avg.shape == shape
            and _optional_stream_ok(momentum_buffer, shape, uses_momentum)
            and _optional_stream_ok(grad_avg, shape, centered))


def _layout_c(array) -> bool:
    return isinstance(array, types.Array) and array.layout == "C"


@compiled
def _address(array) -> int:
    return np.int64(array.ctypes.data)


@compiled
def _extent(array):
    """[lo, hi): the bytes between the array's first and last byte (a non-empty array)."""
    lo = _address(array)
    hi = lo
    for d in range(array.ndim):
        reach = array.strides[d] * (array.shape[d] - 1)
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo, hi + array.itemsize


@compiled
def _dense(array) -> bool:
    return array.flags.c_contiguous or array.flags.f_contiguous


@compiled
def _element_addresses(array):
    addresses = np.empty(array.size, np.int64)
    base = _address(array)
    k = 0
    for index in np.ndindex(array.shape):
        offset = 0
        for d in range(array.ndim):
            offset += index[d] * array.strides[d]
        addresses[k] = base + offset
        k += 1
    return addresses


def _share_memory(a, b) -> bool:
    """np.shares_memory(a, b) for two arrays of one dtype: exact, any strides."""


@overload(_share_memory, jit_options=overload_options)
def _share_memory_typed(a, b):
    if _layout_c(a) and _layout_c(b):
        return lambda a, b: _contiguous_share_memory(a, b)
    return lambda a, b: _strided_share_memory(a, b)


@compiled
def _contiguous_share_memory(a, b) -> bool:
    if a.size == 0 or b.size == 0:
        return False
    a_lo = _address(a)
    b_lo = _address(b)
    return a_lo < b_lo + b.nbytes and b_lo < a_lo + a.nbytes


@compiled
def _strided_share_memory(a, b) -> bool:
    if a.size == 0 or b.size == 0:
        return False
    a_lo, a_hi = _extent(a)
    b_lo, b_hi = _extent(b)
    if a_hi <= b_lo or b_hi <= a_lo:
        return False
    if _dense(a) and _dense(b):  # each covers its whole extent
        return True
    # Strided arrays may interleave without sharing a byte: look at every element's bytes.
    size = a.itemsize
    others = np.sort(_element_addresses(b))
    for start in _element_addresses(a):
        j = np.searchsorted(others, start - size + 1)
        if j < others.size and others[j] < start + size:
            return True
    return False


@compiled
def _disjoint(a, b) -> bool:
    if a is None:
        return True
    if b is None:
        return True
    return not _share_memory(a, b)


def _overlaps_itself(array) -> bool:
    """_validation.check_no_internal_overlap's test: strides sorted, each must step over
    everything inside it."""


@overload(_overlaps_itself, jit_options=overload_options)
def _overlaps_itself_typed(array):
    if _layout_c(array) or not isinstance(array, types.Array):  # or None: no array
        return lambda array: False
    return lambda array: _strided_overlaps_itself(array)


@compiled
def _strided_overlaps_itself(array) -> bool:
    if array.size <= 1 or _dense(array):
        return False
    strides = np.empty(array.ndim, np.int64)
    lengths = np.empty(array.ndim, np.int64)
    k = 0
    for d in range(array.ndim):
        if array.shape[d] > 1:
            strides[k] = abs(array.strides[d])
            lengths[k] = array.shape[d]
            k += 1
    for i in range(1, k):  # insertion sort by (stride, length), as Python sorts the pairs
        stride, length = strides[i], lengths[i]
        j = i - 1
        while j >= 0 and (strides[j] > stride or (strides[j] == stride and lengths[j] > length)):
            strides[j + 1] = strides[j]
            lengths[j + 1] = lengths[j]
            j -= 1
        strides[j + 1] = stride
        lengths[j + 1] = length
    extent = array.itemsize
    for i in range(k):
        if strides[i] < extent:
            return True
        extent += strides[i] * (lengths[i] - 1)
    return False


@compiled
def memory_ok(param, grad, square_avg, momentum_buffer, grad_avg) -> bool:
    if (_overlaps_itself(param) or _overlaps_itself(square_avg)
            or _overlaps_itself(momentum_buffer) or _overlaps_itself(grad_avg)):
        return False
    return (_disjoint(param, grad) and _disjoint(param, square_avg)
            and _disjoint(param, momentum_buffer) and _disjoint(param, grad_avg)
            and _disjoint(grad, square_avg) and _disjoint(grad, momentum_buffer)
            and _disjoint(grad, grad_avg) and _disjoint(square_avg, momentum_buffer)
            and _disjoint(square_avg, grad_avg) and _disjoint(momentum_buffer, grad_avg))


def gather(array):
    """The array's elements as a flat C-contiguous array: a view if it is contiguous, else a copy."""


@overload(gather, jit_options=overload_options)
def _gather_typed(array):
    if _layout_c(array):
        return lambda array: array.reshape(-1)
    return lambda array: np.ascontiguousarray(array).reshape(-1)


def scatter(array, flat) -> None:
    """Write a gathered copy back into its array (nothing where gather gave a view)."""


@overload(scatter, jit_options=overload_options)
def _scatter_typed(array, flat):
    if _layout_c(array):
        return lambda array, flat: None

    def scatter(array, flat):
        if _address(flat) != _address(array):
            array[...] = flat.reshape(array.shape)
    return scatter
