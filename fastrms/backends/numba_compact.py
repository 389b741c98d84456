"""The Numba backend's compact-state update (bfloat16 arrays, blockwise8 buffers), the twin of
csrc/compact_state.h: whole blocks of 256 elements, 8 at a time, each stream decoded into
float32 scratch (or used in place when float32), the float32 loop of numba_backend.py, then
encoded (blockwise8 with a new absmax scale). Every format and option is a run-time argument:
one compiled signature.

Registered for the "numba" backend by fastrms/backends/__init__.py (``compact_module``), since
numba_backend.py is at its size limit. Not cached on disk (``cache=False``): Numba would not
notice an edit of the float32 loop it calls in numba_backend.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._blockwise import Blockwise8
from .._codecs import BFLOAT16, FLOAT32
from . import numba_backend as nb
from ._numba_codecs import JIT, bits_of_float32, decode_into, encode_into, float32_from_bits

_jit = dict(JIT, cache=False)
_inline = dict(_jit, inline="always")
U = np.uint64
BLOCK = 256
#: Elements per call of the float32 loop (8 blockwise8 blocks): a Numba call with array
#: arguments has a fixed cost (reference counting), paid here once per 2048 elements.
CHUNK = 2048
_EMPTY_F32 = np.zeros(0, np.float32)
_EMPTY_U16 = np.zeros(0, np.uint16)
_EMPTY_U8 = np.zeros(0, np.uint8)
STATE_F32, STATE_BF16, STATE_B8 = 0, 1, 2


@njit(**_inline)
def b8_decode_into(codes, scale, out, signed):
    base = U(112 << 23)
    for i in range(codes.size):
        c = U(codes[i])
        if signed:
            m = c & U(127)
            bits = ((m << U(20)) + base if m else U(0)) | ((c >> U(7)) << U(31))
        else:
            bits = (c << U(19)) + base if c else U(0)
        out[i] = float32_from_bits(bits) * scale


@njit(**_inline)
def b8_encode_from(values, codes, signed):
    """Encode float32 ``values`` into ``codes``; return the block's scale (as _blockwise.py)."""
    top = U(0)
    for i in range(values.size):
        b = bits_of_float32(values[i]) & U(0x7FFFFFFF)
        top = b if b > top else top
    if top >= U(0x7F800000) or top == U(0):
        codes[:] = 0
        return float32_from_bits(U(0x7FC00000)) if top else np.float32(0.0)
    scale = float32_from_bits(top)
    inv = np.float32(1.0) / scale
    for i in range(values.size):
        x = values[i]
        rb = bits_of_float32(x * inv) & U(0x7FFFFFFF)
        if signed:
            m = np.int64((rb + U(0x7FFFF) + ((rb >> U(20)) & U(1))) >> U(20)) - 896
            m = 0 if m < 0 else (120 if m > 120 else m)
            sign = (bits_of_float32(x) >> U(31)) if m else U(0)
            codes[i] = np.uint8(U(m) | (sign << U(7)))
        else:
            c = np.int64((rb + U(0x3FFFF) + ((rb >> U(19)) & U(1))) >> U(19)) - 1792
            c = 1 if c < 1 else (240 if c > 240 else c)
            codes[i] = np.uint8(c) if x > np.float32(0.0) else np.uint8(0)
    return scale


@njit(**_inline)
def _load_state(kind, dense, half, codes, scales, lo, hi, scratch_bits, signed):
    size = hi - lo
    if kind == STATE_F32:
        return dense[lo:hi]
    out = scratch_bits[:size].view(np.float32)
    if kind == STATE_BF16:
        decode_into(half[lo:hi], scratch_bits[:size], True)
    else:
        for q in range(0, size, BLOCK):
            end = min(size, q + BLOCK)
            b8_decode_into(codes[lo + q:lo + end], scales[(lo + q) // BLOCK], out[q:end], signed)
    return out


@njit(**_inline)
def _store_state(kind, values, half, codes, scales, lo, hi, scratch_bits, signed):
    if kind == STATE_BF16:
        encode_into(scratch_bits[:hi - lo], half[lo:hi], True, False, U(0), U(0), 0)
    elif kind == STATE_B8:
        for q in range(0, hi - lo, BLOCK):
            end = min(hi - lo, q + BLOCK)
            scales[(lo + q) // BLOCK] = b8_encode_from(values[q:end], codes[lo + q:lo + end],
                                                       signed)


@njit(**_jit)
def _compact_blocks(P32, P16, G32, G16, M, S32, S16, S8, Ss, B32, B16, B8, Bs, A32, A16, A8, As,
                    kinds, formats, key, unscale, coefficients, forms, block_lo, block_hi):
    """Blocks [block_lo, block_hi) of the update; unused arrays are empty."""
    f32_param, bf16, grad32, stochastic, master = formats
    k0, k1 = key
    unscale_form, grad_scale, grad_scale_inverse = unscale
    n = max(P32.size, P16.size)
    param_bits = np.empty(CHUNK, np.uint32)
    grad_bits = np.empty(CHUNK, np.uint32)
    s_bits = np.empty(CHUNK, np.uint32)
    b_bits = np.empty(CHUNK, np.uint32)
    a_bits = np.empty(CHUNK, np.uint32)
    master_bits = M.view(np.uint32)
    with_momentum, centered = forms[2], forms[1]
    end = min(n, block_hi * BLOCK)
    for lo in range(block_lo * BLOCK, end, CHUNK):
        hi = min(end, lo + CHUNK)
        size = hi - lo
        if f32_param:
            p = P32[lo:hi]
            p_bits = param_bits[:size]
        elif master:
            p, p_bits = M[lo:hi], master_bits[lo:hi]
        else:
            p, p_bits = param_bits[:size].view(np.float32), param_bits[:size]
            decode_into(P16[lo:hi], p_bits, bf16)
        if grad32:
            g = G32[lo:hi]
        else:
            decode_into(G16[lo:hi], grad_bits[:size], bf16)
            g = grad_bits[:size].view(np.float32)
        if unscale_form != 0:
            unscaled = grad_bits[:size].view(np.float32)
            if unscale_form == 1:
                for i in range(size):
                    unscaled[i] = g[i] * grad_scale_inverse
            else:
                for i in range(size):
                    unscaled[i] = g[i] / grad_scale
            g = unscaled
        s = _load_state(kinds[0], S32, S16, S8, Ss, lo, hi, s_bits, False)
        b = B32[:0]
        a = A32[:0]
        if with_momentum:
            b = _load_state(kinds[1], B32, B16, B8, Bs, lo, hi, b_bits, True)
        if centered:
            a = _load_state(kinds[2], A32, A16, A8, As, lo, hi, a_bits, True)
        nb._update_flat(p, g, s, b, a, coefficients, forms)
        if not f32_param:
            encode_into(p_bits, P16[lo:hi], bf16, stochastic, k0, k1, lo)
        _store_state(kinds[0], s, S16, S8, Ss, lo, hi, s_bits, False)
        if with_momentum:
            _store_state(kinds[1], b, B16, B8, Bs, lo, hi, b_bits, True)
        if centered:
            _store_state(kinds[2], a, A16, A8, As, lo, hi, a_bits, True)


@njit(parallel=True, **_jit)
def _compact_parallel(P32, P16, G32, G16, M, S32, S16, S8, Ss, B32, B16, B8, Bs, A32, A16, A8,
                      As, kinds, formats, key, unscale, coefficients, forms, chunk_blocks):
    blocks = (max(P32.size, P16.size) + BLOCK - 1) // BLOCK
    for c in prange((blocks + chunk_blocks - 1) // chunk_blocks):
        lo = c * chunk_blocks
        _compact_blocks(P32, P16, G32, G16, M, S32, S16, S8, Ss, B32, B16, B8, Bs, A32, A16, A8,
                        As, kinds, formats, key, unscale, coefficients, forms, lo,
                        min(blocks, lo + chunk_blocks))


def _state_arrays(state):
    """(kind, float32 array, bfloat16 bits, codes, scales), unused ones empty."""
    if state is None:
        return STATE_F32, _EMPTY_F32, _EMPTY_U16, _EMPTY_U8, _EMPTY_F32
    if isinstance(state, Blockwise8):
        return STATE_B8, _EMPTY_F32, _EMPTY_U16, state.codes, state.scales
    if state.dtype == BFLOAT16:
        return STATE_BF16, _EMPTY_F32, state.reshape(-1).view(np.uint16), _EMPTY_U8, _EMPTY_F32
    return STATE_F32, state.reshape(-1), _EMPTY_U16, _EMPTY_U8, _EMPTY_F32


def update_compact(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None,
                   master_param=None, key=None):
    """One step with compact state (the registry's contract, fastrms/backends/__init__.py);
    the caller has checked overlap (fastrms/_compact_state.py)."""
    n = param.size
    if n == 0:
        return
    f32_param = param.dtype == FLOAT32
    flat_param, flat_grad = param.reshape(-1), grad.reshape(-1)
    grad32 = grad.dtype == FLOAT32
    arrays = [flat_param if f32_param else _EMPTY_F32,
              _EMPTY_U16 if f32_param else flat_param.view(np.uint16),
              flat_grad if grad32 else _EMPTY_F32,
              _EMPTY_U16 if grad32 else flat_grad.view(np.uint16),
              _EMPTY_F32 if master_param is None else master_param.reshape(-1)]
    kinds = []
    for state in (square_avg, momentum_buffer, grad_avg):
        kind, *parts = _state_arrays(state)
        kinds.append(kind)
        arrays += parts
    formats = (f32_param, param.dtype == BFLOAT16, grad32, key is not None,
               master_param is not None)
    key = 0 if key is None else int(key)
    words = (np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32))
    arguments = (tuple(kinds), formats, words, *nb._kernel_arguments(coeffs))
    blocks = -(-n // BLOCK)
    threads = 1 if n < nb.PARALLEL_THRESHOLD or nb._serial_only else nb._thread_count()
    if threads == 1:
        _compact_blocks(*arrays, *arguments, 0, blocks)
    else:
        nb._mark_parallel_used(threads)
        _compact_parallel(*arrays, *arguments, -(-blocks // (4 * threads)))
