"""The C backend's compact-state entry points (csrc/compact_state.h through cffi): bfloat16 and
blockwise8 state with float32 or 16-bit params. fastrms/backends/c_backend.py re-exports them.
"""
from __future__ import annotations

import numpy as np

from .._blockwise import Blockwise8, block_count
from .._codecs import BFLOAT16, FLOAT32
from .._fastrms_c import ffi, lib

_from_buffer = ffi.from_buffer
_NULL = ffi.NULL
_F32 = ffi.typeof("float[]")
_U16 = ffi.typeof("uint16_t[]")
_U8 = ffi.typeof("uint8_t[]")
#: Per state stream: (bfloat16 bit, blockwise8 bit).
_STATE_BITS = ((lib.FASTRMS_SQUARE_AVG_BF16, lib.FASTRMS_SQUARE_AVG_B8),
               (lib.FASTRMS_MOMENTUM_BUFFER_BF16, lib.FASTRMS_MOMENTUM_BUFFER_B8),
               (lib.FASTRMS_GRAD_AVG_BF16, lib.FASTRMS_GRAD_AVG_B8))


def _struct(coeffs):
    struct = coeffs.backend_cache.get("c-compact")
    if struct is None:
        struct = coeffs.backend_cache["c-compact"] = ffi.new("struct fastrms_coeffs_f32 *",
                                                             coeffs.values)
    return struct


def _streams(param, grad, states, key, master_param):
    """(formats, param pointer, grad pointer, states void*[3], scales float*[3], keep-alive)."""
    if param.dtype == FLOAT32:
        formats = lib.FASTRMS_PARAM_F32
        param_ptr, grad_ptr = _from_buffer(_F32, param, True), _from_buffer(_F32, grad)
    else:
        formats = lib.FASTRMS_PARAM_BF16 if param.dtype == BFLOAT16 else 0
        param_ptr = _from_buffer(_U16, param, True)
        if grad.dtype == FLOAT32:
            formats |= lib.FASTRMS_GRAD_F32
            grad_ptr = _from_buffer(_F32, grad)
        else:
            grad_ptr = _from_buffer(_U16, grad)
        if key is not None:
            formats |= lib.FASTRMS_STOCHASTIC
        if master_param is not None:
            formats |= lib.FASTRMS_MASTER
    state_ptrs = ffi.new("void *[3]")
    scale_ptrs = ffi.new("float *[3]")
    keep = [param_ptr, grad_ptr]
    for j, state in enumerate(states):
        if state is None:
            continue
        if isinstance(state, Blockwise8):
            formats |= _STATE_BITS[j][1]
            codes, scales = _from_buffer(_U8, state.codes, True), _from_buffer(_F32, state.scales,
                                                                               True)
            keep += [codes, scales]
            state_ptrs[j], scale_ptrs[j] = codes, scales
        elif state.dtype == BFLOAT16:
            formats |= _STATE_BITS[j][0]
            buffer = _from_buffer(_U16, state, True)
            keep.append(buffer)
            state_ptrs[j] = buffer
        else:
            buffer = _from_buffer(_F32, state, True)
            keep.append(buffer)
            state_ptrs[j] = buffer
    return formats, param_ptr, grad_ptr, state_ptrs, scale_ptrs, keep


def _raise(status, param, grad, states, master_param):
    if status == lib.FASTRMS_OVERLAP:
        from .._compact_state import check_no_overlap_named, memory

        check_no_overlap_named(memory(param, grad, states, master_param))
        raise ValueError("two of the arrays overlap in memory")  # pragma: no cover
    if status == lib.FASTRMS_MISALIGNED:
        raise ValueError("an array is not aligned to its element size")
    raise RuntimeError(f"fastrms C kernel rejected the call (status {status})")


def update_compact(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None,
                   master_param=None, key=None):
    """One step with compact state (the registry's contract, fastrms/backends/__init__.py):
    dense arrays C-contiguous and aligned; the kernel checks alignment and overlap again
    before it writes."""
    n = param.size
    if n == 0:
        return
    states = (square_avg, momentum_buffer, grad_avg)
    formats, p, g, state_ptrs, scale_ptrs, _keep = _streams(param, grad, states, key,
                                                            master_param)
    status = lib.fastrms_update_compact(
        _struct(coeffs), coeffs.flags, formats, 0 if key is None else key, p, g, state_ptrs,
        scale_ptrs, _NULL if master_param is None else _from_buffer(_F32, master_param, True),
        n)
    if status:
        _raise(status, param, grad, states, master_param)


def roofline_compact(flags, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    """The compact update's streams (param and grad as they are, each state in its format),
    trivial arithmetic: the speed limit for benchmarks."""
    if param.size == 0:
        return
    states = (square_avg, momentum_buffer, grad_avg)
    formats, p, g, state_ptrs, scale_ptrs, _keep = _streams(param, grad, states, None, None)
    status = lib.fastrms_roofline_compact(flags & (lib.FASTRMS_CENTERED | lib.FASTRMS_MOMENTUM),
                                          formats, p, g, state_ptrs, scale_ptrs, param.size)
    if status:
        _raise(status, param, grad, states, None)


def decode_blockwise8(codes: np.ndarray, scales: np.ndarray, signed: bool) -> np.ndarray:
    """The kernel's blockwise8 decoder on a whole buffer."""
    codes = np.ascontiguousarray(codes, np.uint8)
    scales = np.ascontiguousarray(scales, np.float32)
    if scales.size != block_count(codes.size):
        raise ValueError("scales must have ceil(len(codes) / 256) entries")
    out = np.empty(codes.size, np.float32)
    if codes.size:
        lib.fastrms_decode_b8(int(bool(signed)), _from_buffer(_U8, codes),
                              _from_buffer(_F32, scales), _from_buffer(_F32, out, True),
                              codes.size)
    return out


def encode_blockwise8(values: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's blockwise8 encoder: (codes, scales) of float32 ``values`` (C order)."""
    values = np.ascontiguousarray(values, np.float32).reshape(-1)
    codes = np.empty(values.size, np.uint8)
    scales = np.empty(block_count(values.size), np.float32)
    if values.size:
        lib.fastrms_encode_b8(int(bool(signed)), _from_buffer(_F32, values),
                              _from_buffer(_U8, codes, True), _from_buffer(_F32, scales, True),
                              values.size)
    return codes, scales
