"""The 16-bit storage formats, defined in NumPy: what every backend's codecs must equal bit for bit.

float16 and bfloat16 widen to float32 exactly. Narrowing is the only rounding a format adds
(docs/contract.md, "Storage formats"):

- ``encode_nearest``: round to nearest even, exactly as ``ndarray.astype`` converts (NumPy for
  float16, ml_dtypes for bfloat16), NaN, infinities, overflow to infinity and subnormals
  included. ml_dtypes writes every bfloat16 NaN as the quiet NaN of its sign (0x7FC0 / 0xFFC0);
  NumPy keeps the top ten payload bits of a float16 NaN (never the infinity pattern).
- ``encode_stochastic``: round to one of the two neighbouring 16-bit values (the one toward zero
  and the one away from it, infinity being the neighbour above the largest finite value), away
  from zero with probability equal to the distance from the neighbour toward zero in units of
  their gap. The random bits are those of (key, element index), so they do not depend on how
  the work is split: float16 element i takes the 32 bits of counter i, bfloat16 element i the
  low (even i) or high (odd i) 16 bits of counter i // 2 (:func:`element_bits`). NaN and
  infinities convert as ``encode_nearest`` does.

The rounding is exactly unbiased wherever the dropped part fits the random bits: always for
bfloat16 (16 random bits, 16 dropped bits) and for float16 results of magnitude >= 2^-32
(13 to 31 random bits). Below 2^-32, float16 rounds up with probability floor(|x| 2^55) / 2^31
instead of |x| 2^24: low by less than 2^-31, an absolute bias below 2^-55.

The random bits: :func:`stochastic_key` mixes (seed, step, stream) into a 64-bit key with
splitmix64 (Steele, Lea and Flood 2014); :func:`random_bits` hashes a 32-bit counter XOR the
key's low word (the counter's high word folded in) with "triple32", a 32-bit integer permutation
of near-ideal avalanche (C. Wellons' hash-prospector, bias 0.021), and XORs the key's high word
onto the result. One hash serves two bfloat16 elements.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
#: The 16-bit parameter dtypes; their compute dtype (and that of their coefficients) is float32.
LOW_PRECISION_DTYPES = (FLOAT16, BFLOAT16)
FLOAT32 = np.dtype(np.float32)

_M64 = (1 << 64) - 1
_U32 = np.uint32


# --------------------------------------------------------------------------------------------
# random bits


def splitmix64(x: int) -> int:
    """splitmix64's output function applied to ``x + golden gamma`` (Python ints, mod 2^64)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stochastic_key(seed: int, step: int, stream: int = 0) -> int:
    """The 64-bit key of (seed, step, stream); each argument an int in [0, 2^64), unchecked.

    ``stream`` tells apart arrays that share a seed and a step (an optimizer's parameters).

    >>> hex(stochastic_key(0, 0))
    '0x238275bc38fcbe91'
    """
    return splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ step)


def stochastic_keys(seed: int, step: int, count: int) -> np.ndarray:
    """``[stochastic_key(seed, step, k) for k in range(count)]`` as a uint64 array, vectorised."""
    with np.errstate(over="ignore"):
        base = np.uint64(splitmix64(seed))
        streams = np.arange(count, dtype=np.uint64) ^ base
        return _splitmix64_array(_splitmix64_array(streams) ^ np.uint64(step))


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _triple32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _U32(17))
    x = x * _U32(0xED5AD4BB)
    x = x ^ (x >> _U32(11))
    x = x * _U32(0xAC4C1B51)
    x = x ^ (x >> _U32(15))
    x = x * _U32(0x31848BAB)
    return x ^ (x >> _U32(14))


def random_bits(key: int, first: int, count: int) -> np.ndarray:
    """32 random bits (uint32) for each counter in ``[first, first + count)``."""
    index = np.arange(first, first + count, dtype=np.uint64)
    low = (index & np.uint64(0xFFFFFFFF)).astype(_U32)
    high = (index >> np.uint64(32)).astype(_U32)
    k0, k1 = _U32(key & 0xFFFFFFFF), _U32(key >> 32)
    with np.errstate(over="ignore"):
        return _triple32(low ^ k0 ^ (high * _U32(0x9E3779B9))) ^ k1


def element_bits(dtype, key: int, first: int, count: int) -> np.ndarray:
    """The random bits (uint32) stochastic rounding to ``dtype`` uses for the elements of index
    ``[first, first + count)``."""
    if np.dtype(dtype) == FLOAT16:
        return random_bits(key, first, count)
    pairs = random_bits(key, first >> 1, ((first + count + 1) >> 1) - (first >> 1))
    halves = np.stack([pairs & _U32(0xFFFF), pairs >> _U32(16)], axis=1).reshape(-1)
    return halves[first & 1:(first & 1) + count]


# --------------------------------------------------------------------------------------------
# conversions


def decode(values: np.ndarray) -> np.ndarray:
    """A 16-bit array widened to float32 (exact; NaN payloads kept)."""
    return values.astype(FLOAT32)


def encode_nearest(values: np.ndarray, dtype) -> np.ndarray:
    """float32 to ``dtype`` (float16 or bfloat16), round to nearest even, as astype does."""
    with np.errstate(all="ignore"):
        return np.asarray(values, FLOAT32).astype(dtype)


def encode_stochastic(values: np.ndarray, dtype, key: int, first: int = 0) -> np.ndarray:
    """float32 to ``dtype`` by stochastic rounding, element ``i`` (C order) with the random
    bits of index ``first + i``."""
    dtype = np.dtype(dtype)
    values = np.asarray(values, FLOAT32, order="C")
    bits = values.reshape(-1).view(_U32)
    r = element_bits(dtype, key, first, bits.size)
    magnitude = bits & _U32(0x7FFFFFFF)
    nan = magnitude > _U32(0x7F800000)
    if dtype == BFLOAT16:
        # bfloat16 keeps float32's exponent: its gap is 2^16 float32 steps everywhere, so adding
        # 16 random bits below the kept ones and truncating rounds up with the exact probability.
        with np.errstate(over="ignore"):
            out = ((bits + (r & _U32(0xFFFF))) >> _U32(16)).astype(np.uint16)
    elif dtype == FLOAT16:
        out = _float16_stochastic(bits, magnitude, r)
    else:
        raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
    out = out.view(dtype)
    if nan.any():
        out[nan] = encode_nearest(values.reshape(-1)[nan], dtype)
    return out.reshape(values.shape)


def _float16_stochastic(bits, magnitude, r) -> np.ndarray:
    sign = ((bits >> _U32(16)) & _U32(0x8000)).astype(np.uint16)
    # Normal float16 range (|x| >= 2^-14, infinities too): 13 dropped bits; add 13 random bits,
    # truncate, and the result is a float16 value (or 2^16 and beyond: infinity).
    truncated = (magnitude + (r & _U32(0x1FFF))) & _U32(0xFFFFE000)
    normal = np.where(truncated >= _U32(0x47800000), _U32(0x7C00),
                      (truncated - _U32(0x38000000)) >> _U32(13))
    # Subnormal float16 range: the result is n units of 2^-24, n = |x| / 2^-24 = m / 2^s, with
    # m the float32 significand; round with s random bits (at most 31, see the module docstring).
    exponent = magnitude >> _U32(23)
    significand = (magnitude & _U32(0x7FFFFF)) | np.where(exponent > 0, _U32(0x800000), _U32(0))
    s = _U32(126) - np.maximum(exponent, _U32(1))
    kept = np.minimum(s, _U32(31))
    dropped = np.minimum(s - kept, _U32(31))
    mask = (_U32(1) << kept) - _U32(1)
    units = ((significand >> dropped) + (r & mask)) >> kept
    out = np.where(magnitude >= _U32(0x38800000), normal, units)
    return out.astype(np.uint16) | sign
