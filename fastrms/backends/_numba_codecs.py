"""The 16-bit codecs and stochastic rounding bits for the Numba backend, element by element.

fastrms/_codecs.py defines the bits and csrc/codecs16.h has the same functions in C; these are
their Numba twins, inlined into the loops of numba_backend.py. 16-bit arrays arrive as uint16
views. Numba widens 32-bit integer arithmetic to 64 bits, so every value here is a uint64
holding 32 bits, and sums, differences and products that could pass 2^32 are masked back (LLVM
narrows the masked operations to 32-bit vector code). Float bits move through two LLVM bitcasts.
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from .._codecs import BFLOAT16

#: The Numba backend's compilation settings (numba_backend.py imports them): never fastmath.
CACHE = os.environ.get("FASTRMS_NUMBA_CACHE", "1") != "0"
JIT = dict(nogil=True, cache=CACHE, fastmath=False, error_model="numpy")
_inline = dict(JIT, cache=False, inline="always")

U = np.uint64
MASK32 = U(0xFFFFFFFF)


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bits are the low 32 of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        width = bits.bitwidth
        if width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def bits_of_float32(typingctx, value):
    """The bits of a float32, as a uint64."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.uint64(types.float32), codegen


@njit(**_inline)
def f16_widen(h):
    """float16 bits -> float32 bits, exact; NaN payloads kept."""
    sign = (h & U(0x8000)) << U(16)
    e = (h >> U(10)) & U(0x1F)
    m = h & U(0x3FF)
    normal = ((e + U(112)) << U(23)) | (m << U(13))
    special = U(0x7F800000) | (m << U(13))
    subnormal = bits_of_float32(np.float32(np.int32(m)) * np.float32(2.0 ** -24))
    return sign | (special if e == U(31) else (subnormal if e == U(0) else normal))


@njit(**_inline)
def f16_nan(x):
    payload = (x & U(0x7FFFFF)) >> U(13)
    return ((x >> U(16)) & U(0x8000)) | U(0x7C00) | payload | U(payload == U(0))


@njit(**_inline)
def f16_nearest(x):
    sign = (x >> U(16)) & U(0x8000)
    a = x & U(0x7FFFFFFF)
    normal = ((a - U(0x38000000) + U(0xFFF) + ((a >> U(13)) & U(1))) & MASK32) >> U(13)
    e = a >> U(23)
    shift = U(25) if (e < U(102) or e > U(112)) else U(126) - e
    m = (a & U(0x7FFFFF)) | U(0x800000)
    subnormal = (m + (U(1) << (shift - U(1))) - U(1) + ((m >> shift) & U(1))) >> shift
    value = U(0x7C00) if a >= U(0x477FF000) else (normal if a >= U(0x38800000) else subnormal)
    return f16_nan(x) if a > U(0x7F800000) else sign | value


@njit(**_inline)
def bf16_nearest(x):
    rounded = ((x + U(0x7FFF) + ((x >> U(16)) & U(1))) & MASK32) >> U(16)
    nan = ((x >> U(16)) & U(0x8000)) | U(0x7FC0)
    return nan if (x & U(0x7FFFFFFF)) > U(0x7F800000) else rounded


@njit(**_inline)
def bf16_stochastic(x, r):
    rounded = ((x + (r & U(0xFFFF))) & MASK32) >> U(16)
    nan = ((x >> U(16)) & U(0x8000)) | U(0x7FC0)
    return nan if (x & U(0x7FFFFFFF)) > U(0x7F800000) else rounded


@njit(**_inline)
def f16_stochastic(x, r):
    sign = (x >> U(16)) & U(0x8000)
    a = x & U(0x7FFFFFFF)
    truncated = (a + (r & U(0x1FFF))) & U(0xFFFFE000)
    normal = (U(0x7C00) if truncated >= U(0x47800000)
              else ((truncated - U(0x38000000)) & MASK32) >> U(13))
    e = a >> U(23)
    m = (a & U(0x7FFFFF)) | (U(0x800000) if e != U(0) else U(0))
    s = (U(126) - (e if e != U(0) else U(1))) & MASK32
    kept = s if s < U(31) else U(31)
    excess = s - kept
    dropped = excess if excess < U(31) else U(31)
    units = ((m >> dropped) + (r & ((U(1) << kept) - U(1)))) >> kept
    value = normal if a >= U(0x38800000) else units
    return f16_nan(x) if a > U(0x7F800000) else sign | value


@njit(**_inline)
def triple32(x):
    x = x ^ (x >> U(17))
    x = (x * U(0xED5AD4BB)) & MASK32
    x = x ^ (x >> U(11))
    x = (x * U(0xAC4C1B51)) & MASK32
    x = x ^ (x >> U(15))
    x = (x * U(0x31848BAB)) & MASK32
    return x ^ (x >> U(14))


@njit(**_inline)
def random_bits(k0, k1, counter):
    """32 random bits of a 64-bit counter (k0, k1: the key's low and high words)."""
    high = (counter >> U(32)) * U(0x9E3779B9) & MASK32
    return triple32((counter & MASK32) ^ k0 ^ high) ^ k1


@njit(**_inline)
def decode_into(source, out_bits, bf16):
    """Widen uint16 bits into the float32 bits of out_bits (same length)."""
    if bf16:
        for i in range(source.size):
            out_bits[i] = U(source[i]) << U(16)
    else:
        for i in range(source.size):
            out_bits[i] = f16_widen(U(source[i]))


@njit(**_inline)
def encode_into(source_bits, out, bf16, stochastic, k0, k1, first):
    """Narrow float32 bits into uint16 bits; element i is element first + i of its array
    (float16: the bits of counter first + i; bfloat16: a half of those of (first + i) // 2)."""
    if stochastic:
        if bf16:
            for i in range(source_bits.size):
                index = first + i
                r = random_bits(k0, k1, U(index >> 1)) >> (U(16) * U(index & 1))
                out[i] = bf16_stochastic(U(source_bits[i]), r)
        else:
            for i in range(source_bits.size):
                out[i] = f16_stochastic(U(source_bits[i]), random_bits(k0, k1, U(first + i)))
    elif bf16:
        for i in range(source_bits.size):
            out[i] = bf16_nearest(U(source_bits[i]))
    else:
        for i in range(source_bits.size):
            out[i] = f16_nearest(U(source_bits[i]))


@njit(**JIT)
def _decode_array(source, out_bits, bf16):
    decode_into(source, out_bits, bf16)


@njit(**JIT)
def _encode_array(source_bits, out, bf16, stochastic, key, first):
    encode_into(source_bits, out, bf16, stochastic, key[0], key[1], first)


def decode_low_precision(values: np.ndarray) -> np.ndarray:
    """A float16 / bfloat16 array widened to float32 (the backend's codec entry point)."""
    values = np.asarray(values, order="C")
    out = np.empty(values.shape, np.uint32)
    _decode_array(values.reshape(-1).view(np.uint16), out.reshape(-1),
                  values.dtype == BFLOAT16)
    return out.view(np.float32)


def encode_low_precision(values: np.ndarray, dtype, key=None, first_index: int = 0) -> np.ndarray:
    """float32 narrowed to ``dtype``: nearest even, or stochastic rounding with ``key``."""
    values = np.asarray(values, np.float32, order="C")
    out = np.empty(values.shape, dtype)
    key_value = 0 if key is None else int(key)
    _encode_array(values.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16),
                  out.dtype == BFLOAT16, key is not None,
                  (np.uint64(key_value & 0xFFFFFFFF), np.uint64(key_value >> 32)),
                  int(first_index))
    return out
