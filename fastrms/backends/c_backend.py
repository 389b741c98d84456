"""The C backend: csrc/rmsprop.c through cffi (out-of-line API mode).

cffi releases the GIL around every call. The kernel checks flags and buffer overlap itself before
it writes, so the Python side only turns arrays into pointers.
"""
from __future__ import annotations

import os

import numpy as np

from .._codecs import BFLOAT16, FLOAT32, LOW_PRECISION_DTYPES
from .._coefficients import CENTERED, MOMENTUM, Coefficients
from .._validation import check_no_overlap

try:
    from .._fastrms_c import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised when the extension was not built
    raise ImportError(
        "the C extension fastrms._fastrms_c was not built (install with `pip install .` and a C "
        "compiler; inside the source tree, `pip install -e .`, since the tree's own fastrms/ "
        f"shadows the installed package there; {exc})") from exc

SIMD_NAMES = ("sse2", "avx2", "avx512")
_F32 = np.dtype(np.float32)
# Per dtype: update, multi-tensor update, roofline, buffer ctype (resolved once: from_buffer
# with a ctype object and positional arguments costs about half of the string/keyword form),
# pointer-array type, coefficient struct type, multi-tensor finiteness check.
_ENTRY = {
    _F32: (lib.fastrms_update_f32, lib.fastrms_update_multi_f32, lib.fastrms_roofline_f32,
           ffi.typeof("float[]"), "float *[]", "struct fastrms_coeffs_f32 *",
           lib.fastrms_all_finite_multi_f32),
    np.dtype(np.float64): (lib.fastrms_update_f64, lib.fastrms_update_multi_f64,
                           lib.fastrms_roofline_f64, ffi.typeof("double[]"), "double *[]",
                           "struct fastrms_coeffs_f64 *", lib.fastrms_all_finite_multi_f64),
}
_from_buffer = ffi.from_buffer
_NULL = ffi.NULL
_MISALIGNED = lib.FASTRMS_MISALIGNED
_U16 = ffi.typeof("uint16_t[]")
_F32_BUFFER = _ENTRY[_F32][3]
_PARAM_BF16 = lib.FASTRMS_PARAM_BF16
_ONLY_F32 = {_F32}


def _get_dtype(array):
    return array.dtype


def _prepared(coeffs: Coefficients) -> tuple:
    """(kernel, buffer ctype, coefficient struct, flags), built once per Coefficients."""
    prepared = coeffs.backend_cache.get("c")
    if prepared is None:
        entry = _ENTRY[coeffs.dtype]
        prepared = (entry[0], entry[3], ffi.new(entry[5], coeffs.values), coeffs.flags)
        coeffs.backend_cache["c"] = prepared
    return prepared


def _raise_for(status: int, arrays) -> None:
    if status == lib.FASTRMS_OVERLAP:
        check_no_overlap(*arrays)  # names the pair
        raise ValueError("two of the arrays overlap in memory")  # pragma: no cover
    raise RuntimeError(f"fastrms C kernel rejected the call (status {status})")


def update_if_ready(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None) -> bool:
    """The per-call fast path: False, with nothing written, unless every array is non-empty,
    C-contiguous, aligned and (outputs) writeable. cffi's buffer request proves contiguity and
    writability; the kernel checks alignment and overlap before it writes. Every line here is
    paid on every call, which is the whole cost on small arrays.
    """
    prepared = coeffs.backend_cache.get("c") or _prepared(coeffs)
    kernel, buffer_type, struct, flags = prepared
    n = param.size
    if n == 0:
        return False
    try:
        status = kernel(
            struct, flags,
            _from_buffer(buffer_type, param, True),
            _from_buffer(buffer_type, grad, False),
            _from_buffer(buffer_type, square_avg, True),
            _NULL if momentum_buffer is None else _from_buffer(buffer_type, momentum_buffer, True),
            _NULL if grad_avg is None else _from_buffer(buffer_type, grad_avg, True),
            n)
    except ValueError:  # not C-contiguous, or read-only: the checked slow path
        return False
    if status == 0:
        return True
    if status == _MISALIGNED:
        return False
    _raise_for(status, (param, grad, square_avg, momentum_buffer, grad_avg))


def update(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    """The registry's contract: the arrays are checked and kernel-ready (C-contiguous, aligned,
    outputs writeable), so the fast path can only decline an empty call."""
    if param.size and not update_if_ready(coeffs, param, grad, square_avg, momentum_buffer,
                                          grad_avg):
        raise ValueError("the C backend needs C-contiguous, aligned, writeable arrays")


def _pointer_array(pointer_array_type, buffer_type, arrays, keep):
    cdatas = [_from_buffer(buffer_type, a) if a.size else _NULL for a in arrays]
    keep.append(cdatas)
    return ffi.new(pointer_array_type, cdatas)


def update_many(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs, *, cache=None):
    """One C call and one thread team for all the arrays (all of dtype coeffs.dtype).

    ``cache``: an optional dict the caller keeps between calls. The pointer arrays of params,
    square_avgs, momentum_buffers and grad_avgs (and the lengths) are kept in it and reused while
    the caller passes the same list objects; the caller must empty it if it changes what such a
    list holds. Gradients are converted on every call. With 200 small arrays this halves the
    Python cost of a call (the per-array from_buffer calls are most of it).
    """
    if not params:
        return
    keep = []
    grad_pointers = _pointer_array(_ENTRY[coeffs.dtype][4], _ENTRY[coeffs.dtype][3], grads, keep)
    _update_many(coeffs, params, grad_pointers, square_avgs, momentum_buffers, grad_avgs, cache,
                 lambda k: grads[k])


def update_many_at_addresses(coeffs, params, grad_addresses, square_avgs, momentum_buffers,
                             grad_avgs, *, cache=None):
    """:func:`update_many` with the gradients given as their data addresses (an ``np.uintp``
    array), for a caller holding them as another library's tensors (``fastrms.torch``): one
    conversion for all of them instead of a NumPy view and a buffer request each, which is most
    of a step's cost on a model of many small tensors.

    The caller guarantees that gradient k is alive, C-contiguous, of ``coeffs.dtype`` and
    ``params[k].size`` elements, in this process's memory. The kernel still checks alignment
    and overlap with the other streams of the same entry before it writes.
    """
    if not params:
        return
    grad_pointers = ffi.from_buffer(_ENTRY[coeffs.dtype][4], grad_addresses)
    _update_many(coeffs, params, grad_pointers, square_avgs, momentum_buffers, grad_avgs, cache,
                 None)


def _update_many(coeffs, params, grad_pointers, square_avgs, momentum_buffers, grad_avgs, cache,
                 grad_array):
    count = len(params)
    _, fn, _, buffer_type, pointer_array_type, _, _ = _ENTRY[coeffs.dtype]
    keep = []
    streams = [grad_pointers if index == 1 else
               _cached_pointer_array(cache, index, pointer_array_type, buffer_type, arrays, keep)
               if arrays is not None else _NULL
               for index, arrays in enumerate((params, None, square_avgs, momentum_buffers,
                                               grad_avgs))]
    lengths = cache.get("lengths") if cache is not None else None
    if lengths is None or lengths[0] is not params:
        lengths = (params, ffi.new("size_t[]", [a.size for a in params]))
        if cache is not None:
            cache["lengths"] = lengths
    status = fn(_prepared(coeffs)[2], coeffs.flags, *streams, lengths[1], count)
    if status:
        if status == _MISALIGNED:
            raise ValueError("a gradient is not aligned to its element size")
        if grad_array is not None:
            for k in range(count):
                check_no_overlap(params[k], grad_array(k), square_avgs[k],
                                 momentum_buffers[k] if momentum_buffers is not None else None,
                                 grad_avgs[k] if grad_avgs is not None else None)
        raise RuntimeError(f"fastrms C kernel rejected the call (status {status})")


def all_finite(coeffs, grads) -> bool:
    """True when every gradient, divided by the loss scale (1 for none), is finite: one C call,
    one thread team, reading only. The gradients are C-contiguous arrays of coeffs.dtype; with
    float32 coefficients (those of a 16-bit parameter) they may also be float16 or bfloat16,
    mixed in any way."""
    if not grads:
        return True
    if coeffs.dtype is _F32:
        dtypes = set(map(_get_dtype, grads))
        if dtypes != _ONLY_F32:
            return _all_finite_mixed(coeffs, grads, dtypes)
    _, _, _, buffer_type, pointer_array_type, _, fn = _ENTRY[coeffs.dtype]
    keep = []
    pointers = _pointer_array(pointer_array_type, buffer_type, grads, keep)
    status = fn(pointers, ffi.new("size_t[]", [g.size for g in grads]), len(grads),
                coeffs.values[-2])
    if status < 0:
        raise RuntimeError(f"fastrms C finiteness check rejected the call (status {status})")
    return status == 1


def _all_finite_mixed(coeffs, grads, dtypes) -> bool:
    for dtype in dtypes:
        group = [g for g in grads if g.dtype == dtype]
        if dtype not in LOW_PRECISION_DTYPES:
            if not all_finite(coeffs, group):
                return False
            continue
        keep = []
        pointers = _pointer_array("uint16_t *[]", _U16, group, keep)
        status = lib.fastrms_all_finite_multi_p16(
            pointers, ffi.new("size_t[]", [g.size for g in group]), len(group),
            _PARAM_BF16 if dtype == BFLOAT16 else 0, coeffs.values[-2])
        if status < 0:
            raise RuntimeError(f"fastrms C finiteness check rejected the call (status {status})")
        if status == 0:
            return False
    return True


def _cached_pointer_array(cache, index, pointer_array_type, buffer_type, arrays, keep):
    if cache is None:
        return _pointer_array(pointer_array_type, buffer_type, arrays, keep)
    entry = cache.get(index)
    if entry is None or entry[0] is not arrays:
        held = []  # the cdata buffers must live as long as the cached pointer array
        entry = cache[index] = (arrays, _pointer_array(pointer_array_type, buffer_type, arrays,
                                                       held), held)
    return entry[1]


def roofline(flags, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    """The same streams as the update (chosen by flags), trivial arithmetic: the speed limit."""
    _, _, fn, buffer_type, _, _, _ = _ENTRY[param.dtype]
    if param.size == 0:
        return
    status = fn(flags & (CENTERED | MOMENTUM), _from_buffer(buffer_type, param),
                _from_buffer(buffer_type, grad), _from_buffer(buffer_type, square_avg),
                _NULL if momentum_buffer is None else _from_buffer(buffer_type, momentum_buffer),
                _NULL if grad_avg is None else _from_buffer(buffer_type, grad_avg), param.size)
    if status:
        _raise_for(status, (param, grad, square_avg, momentum_buffer, grad_avg))


# -- 16-bit parameters (float16 / bfloat16) with float32 state --------------------------------


def _formats(param_dtype, grad_dtype, stochastic: bool, master: bool) -> int:
    formats = _PARAM_BF16 if param_dtype == BFLOAT16 else 0
    if grad_dtype == FLOAT32:
        formats |= lib.FASTRMS_GRAD_F32
    if stochastic:
        formats |= lib.FASTRMS_STOCHASTIC
    if master:
        formats |= lib.FASTRMS_MASTER
    return formats


def _buffer_type(array):
    return _F32_BUFFER if array.dtype == FLOAT32 else _U16


def update_low_precision(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None,
                         master_param=None, key=None):
    """One step of a float16 / bfloat16 ``param`` (the registry's contract, see
    fastrms/backends/__init__.py): ``coeffs`` are float32; ``grad`` has the param's dtype or
    float32; the state and ``master_param`` are float32; every array is C-contiguous, aligned
    and (outputs) writeable. ``key`` (an int, fastrms._codecs.stochastic_key) asks for
    stochastic rounding, None for nearest. The kernel checks alignment and overlap before it
    writes."""
    n = param.size
    if n == 0:
        return
    status = lib.fastrms_update_p16(
        _prepared(coeffs)[2], coeffs.flags,
        _formats(param.dtype, grad.dtype, key is not None, master_param is not None),
        0 if key is None else key,
        _from_buffer(_U16, param, True), _from_buffer(_buffer_type(grad), grad, False),
        _from_buffer(_F32_BUFFER, square_avg, True),
        _NULL if momentum_buffer is None else _from_buffer(_F32_BUFFER, momentum_buffer, True),
        _NULL if grad_avg is None else _from_buffer(_F32_BUFFER, grad_avg, True),
        _NULL if master_param is None else _from_buffer(_F32_BUFFER, master_param, True), n)
    if status:
        _raise_for_low_precision(status, (param, grad, square_avg, momentum_buffer, grad_avg,
                                          master_param))


def _raise_for_low_precision(status, arrays):
    if status == lib.FASTRMS_OVERLAP:
        check_no_overlap(*arrays)  # names the pair
        raise ValueError("two of the arrays overlap in memory")  # pragma: no cover
    if status == _MISALIGNED:
        raise ValueError("an array is not aligned to its element size")
    raise RuntimeError(f"fastrms C kernel rejected the call (status {status})")


def update_many_low_precision(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs,
                              master_params=None, keys=None, *, cache=None):
    """:func:`update_low_precision` over lists, one C call and one thread team per gradient
    dtype (the params all float16 or all bfloat16). ``keys``: None (nearest) or one int per
    array (an ``np.uint64`` array serves as it is). ``cache``: as for :func:`update_many`, kept
    by the caller while the lists other than ``grads`` are the same objects."""
    count = len(params)
    if not count:
        return
    param_dtype = params[0].dtype
    if any(p.dtype != param_dtype for p in params):
        raise TypeError("update_many_low_precision takes params of one dtype per call")
    grad_dtypes = set(map(_get_dtype, grads))
    if len(grad_dtypes) > 1:  # a float32 gradient among 16-bit ones: one call per dtype
        for dtype in grad_dtypes:
            ks = [k for k in range(count) if grads[k].dtype == dtype]

            def pick(arrays):
                return None if arrays is None else [arrays[k] for k in ks]

            update_many_low_precision(coeffs, pick(params), pick(grads), pick(square_avgs),
                                      pick(momentum_buffers), pick(grad_avgs),
                                      pick(master_params),
                                      None if keys is None else [int(keys[k]) for k in ks])
        return
    formats = _formats(param_dtype, grads[0].dtype, keys is not None, master_params is not None)
    keep = []
    grad_pointers = _pointer_array("void *[]", _buffer_type(grads[0]), grads, keep)
    streams = []
    for index, (arrays, pointer_type, buffer_type) in enumerate((
            (params, "uint16_t *[]", _U16), (square_avgs, "float *[]", _F32_BUFFER),
            (momentum_buffers, "float *[]", _F32_BUFFER), (grad_avgs, "float *[]", _F32_BUFFER),
            (master_params, "float *[]", _F32_BUFFER))):
        streams.append(_NULL if arrays is None else _cached_pointer_array(
            cache, ("p16", index), pointer_type, buffer_type, arrays, keep))
    lengths = cache.get("p16 lengths") if cache is not None else None
    if lengths is None or lengths[0] is not params:
        lengths = (params, ffi.new("size_t[]", [a.size for a in params]))
        if cache is not None:
            cache["p16 lengths"] = lengths
    key_array = _NULL
    if keys is not None:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if keys.shape != (count,):
            raise ValueError(f"keys must hold one key per array ({count}), got shape {keys.shape}")
        key_array = ffi.from_buffer("uint64_t[]", keys)
    status = lib.fastrms_update_multi_p16(
        _prepared(coeffs)[2], coeffs.flags, formats, key_array, streams[0], grad_pointers,
        streams[1], streams[2], streams[3], streams[4], lengths[1], count)
    if status:
        if status == lib.FASTRMS_OVERLAP:
            for k in range(count):
                check_no_overlap(params[k], grads[k], square_avgs[k],
                                 momentum_buffers[k] if momentum_buffers is not None else None,
                                 grad_avgs[k] if grad_avgs is not None else None,
                                 master_params[k] if master_params is not None else None)
        _raise_for_low_precision(status, ())


def roofline_low_precision(flags, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    """The 16-bit update's streams (16-bit param and grad, float32 state), trivial arithmetic."""
    if param.size == 0:
        return
    status = lib.fastrms_roofline_p16(
        flags & (CENTERED | MOMENTUM), _from_buffer(_U16, param), _from_buffer(_U16, grad),
        _from_buffer(_F32_BUFFER, square_avg),
        _NULL if momentum_buffer is None else _from_buffer(_F32_BUFFER, momentum_buffer),
        _NULL if grad_avg is None else _from_buffer(_F32_BUFFER, grad_avg), param.size)
    if status:
        _raise_for_low_precision(status, (param, grad, square_avg, momentum_buffer, grad_avg))


def decode_low_precision(values: np.ndarray) -> np.ndarray:
    """A float16 / bfloat16 array widened to float32 by the kernel's codec."""
    values = np.asarray(values, order="C")
    out = np.empty(values.shape, np.float32)
    if values.size:
        status = lib.fastrms_decode_p16(_PARAM_BF16 if values.dtype == BFLOAT16 else 0,
                                        _from_buffer(_U16, values), _from_buffer(_F32_BUFFER,
                                                                                 out, True),
                                        values.size)
        if status:
            _raise_for_low_precision(status, ())
    return out


def encode_low_precision(values: np.ndarray, dtype, key=None, first_index: int = 0) -> np.ndarray:
    """float32 ``values`` narrowed to ``dtype`` by the kernel's codec: nearest even, or
    stochastic rounding with ``key``, element i taking the random bits of first_index + i."""
    values = np.asarray(values, np.float32, order="C")
    out = np.empty(values.shape, dtype)
    if values.size:
        formats = _formats(out.dtype, None, key is not None, False)
        status = lib.fastrms_encode_p16(formats, 0 if key is None else key, first_index,
                                        _from_buffer(_F32_BUFFER, values),
                                        _from_buffer(_U16, out, True), values.size)
        if status:
            _raise_for_low_precision(status, ())
    return out


def set_conversion_instructions(enabled: bool) -> bool:
    """Allow (default) or forbid F16C / AVX512-BF16 conversion instructions (tests use it to
    prove that both give the same bits); returns the setting."""
    return bool(lib.fastrms_set_conversion_instructions(1 if enabled else 0))


def conversion_instructions() -> tuple[str, ...]:
    """The conversion instructions the kernels use now (SIMD level and CPU allowing)."""
    used = lib.fastrms_conversion_instructions()
    return tuple(name for bit, name in ((1, "f16c"), (2, "avx512bf16")) if used & bit)


def set_num_threads(n: int | None) -> None:
    """n threads, or None to follow OpenMP's own setting call by call."""
    lib.fastrms_set_num_threads(0 if n is None else n)


def get_num_threads() -> int:
    return lib.fastrms_get_num_threads()


def simd_level() -> str:
    return SIMD_NAMES[lib.fastrms_simd_level()]


def set_simd_level(name: str) -> str:
    """Cap the SIMD level (tests use it to prove every level gives the same bits)."""
    if name not in SIMD_NAMES:
        raise ValueError(f"unknown SIMD level {name!r}; choose one of {SIMD_NAMES}")
    return SIMD_NAMES[lib.fastrms_set_simd_level(SIMD_NAMES.index(name))]


def describe() -> dict:
    return {
        "available": True,
        "reason": "C extension loaded",
        "threads": lib.fastrms_get_num_threads(),
        "openmp": bool(lib.fastrms_openmp_enabled()),
        "simd_level": simd_level(),
        "simd_level_max": SIMD_NAMES[lib.fastrms_max_simd_level()],
        "parallel_threshold": int(lib.fastrms_parallel_threshold()),
        "conversion_instructions": list(conversion_instructions()),
    }


# GNU OpenMP's thread pool does not survive fork(); a forked child runs the kernel serially.
os.register_at_fork(after_in_child=lib.fastrms_after_fork_in_child)
_simd_cap = os.environ.get("FASTRMS_SIMD")
if _simd_cap:
    if _simd_cap not in SIMD_NAMES:
        # An ImportError makes the registry record the backend as unavailable, with this reason.
        raise ImportError(f"FASTRMS_SIMD={_simd_cap!r} is not one of {', '.join(SIMD_NAMES)}")
    set_simd_level(_simd_cap)

# Compact state (bfloat16, blockwise8): its own module, to keep this one readable.
from .c_compact import (decode_blockwise8, encode_blockwise8, roofline_compact,  # noqa: E402
                        update_compact)
