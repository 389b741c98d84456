"""The 8-bit blockwise state format ("blockwise8"), defined in NumPy: :class:`Blockwise8` and
the encode / decode every backend must equal bit for bit (docs/compact-state.md has the why).

A buffer of ``n`` float32 values is stored as ``n`` uint8 codes and ``ceil(n / 256)`` float32
scales, one per block of :data:`BLOCK` consecutive elements (the last block may be partial).
A code is an 8-bit float *relative to its block's scale*; it converts with integer bit
operations on the float32 pattern (no table search).

- unsigned (``square_avg``): code 0 is 0.0; code ``c`` in 1..255 is
  ``2**((c >> 4) - 15) * (1 + (c & 15) / 16)`` (4 exponent bits, 4 mantissa bits, no zero
  exponent special case). Code 240 is 1.0, the largest code the encoder writes.
- signed (``momentum_buffer``, ``grad_avg``): bit 7 is the sign, ``m = c & 127``; m 0 is zero
  (code 128 decodes to -0.0; the encoder writes only code 0 for zero); m in 1..127 is
  ``2**((m >> 3) - 15) * (1 + (m & 7) / 8)`` (4 exponent bits, 3 mantissa bits). m 120 is 1.0,
  the largest the encoder writes.

Decoding: value = code's value * scale, one float32 multiply (every code decodes, including
those the encoder never writes). Encoding a block of updated float32 values ``x``:

1. ``scale`` = max |x| over the block (exact, a float32 value). A block holding a NaN or an
   infinity gets scale NaN and all codes 0: it decodes to NaN, and :func:`fastrms.rmsprop_update`
   refuses it ("the state diverged"). A block of zeros gets scale 0 and codes 0.
2. ``r = x * inv`` in float32, with ``inv = 1 / scale`` rounded to float32 once per block.
3. The float32 bits of |r| are rounded to the code's mantissa bits (4 unsigned, 3 signed),
   round half to even, carrying into the exponent as a float's rounding does (signed:
   ``(bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20``; unsigned the same with 0x3FFFF and 19),
   and the exponent rebased (- 112 * 16 unsigned, - 112 * 8 signed), then clamped:
   unsigned to [1, 240] for x > 0 (**a positive value never rounds to zero**: RMSprop divides by
   sqrt(square_avg)) and 0 for x <= 0 (the update never makes a negative square_avg);
   signed to [0, 120] (magnitudes below about 2^-15 of the scale flush to zero), sign bit set
   only on a nonzero magnitude.
"""
from __future__ import annotations

import numpy as np

#: Elements per block, one float32 scale each.
BLOCK = 256
FLOAT32 = np.dtype(np.float32)
UINT8 = np.dtype(np.uint8)
_INF = np.float32(np.inf)
_U32 = np.uint32
UNSIGNED_MAX_CODE = 240
SIGNED_MAX_MAGNITUDE = 120
UNSIGNED_BIAS = 112 * 16    # code exponent 15 <-> float32 biased exponent 127
SIGNED_BIAS = 112 * 8       # code exponent 15 <-> float32 biased exponent 127
_NAN_BITS = 0x7FC00000


def block_count(n: int) -> int:
    """The number of scales of an ``n``-element buffer: ceil(n / 256)."""
    return -(-n // BLOCK)


def _padded(values: np.ndarray, fill=0) -> np.ndarray:
    n = values.size
    padded = np.full(block_count(n) * BLOCK, fill, values.dtype)
    padded[:n] = values.reshape(-1)
    return padded.reshape(-1, BLOCK)


def code_values(codes: np.ndarray, signed: bool) -> np.ndarray:
    """The float32 value of each code relative to its scale (the format's table, by bits)."""
    c = np.asarray(codes, UINT8).astype(_U32)
    if signed:
        magnitude = c & _U32(127)
        bits = np.where(magnitude == 0, _U32(0), (magnitude << _U32(20)) + _U32(112 << 23))
        bits = bits | ((c >> _U32(7)) << _U32(31))
    else:
        bits = np.where(c == 0, _U32(0), (c << _U32(19)) + _U32(112 << 23))
    return bits.view(FLOAT32)


def decode(codes: np.ndarray, scales: np.ndarray, signed: bool) -> np.ndarray:
    """float32 values of a blockwise8 buffer (codes of length n, scales of ceil(n / 256))."""
    n = codes.size
    values = code_values(codes, signed)
    if n == 0:
        return values
    with np.errstate(all="ignore"):
        return (_padded(values) * scales.astype(FLOAT32)[:, None]).reshape(-1)[:n]


def block_scales(values: np.ndarray) -> np.ndarray:
    """Each block's absmax (NaN where the block holds a NaN or an infinity)."""
    bits = _padded(np.ascontiguousarray(values, FLOAT32).reshape(-1)).view(_U32)
    top = (bits & _U32(0x7FFFFFFF)).max(axis=1) if bits.size else np.zeros(0, _U32)
    top = np.where(top >= _U32(0x7F800000), _U32(_NAN_BITS), top)
    return top.view(FLOAT32)


def encode(values: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of float32 ``values`` by the rules of the module docstring."""
    x = np.ascontiguousarray(values, FLOAT32).reshape(-1)
    n = x.size
    scales = block_scales(x)
    if n == 0:
        return np.zeros(0, UINT8), scales
    usable = (scales > 0) & np.isfinite(scales)
    with np.errstate(all="ignore"):
        inv = np.where(usable, np.float32(1) / scales, np.float32(0)).astype(FLOAT32)
        r = (_padded(x) * inv[:, None]).reshape(-1)[:n]
    bits = r.view(_U32) & _U32(0x7FFFFFFF)
    shift = _U32(20 if signed else 19)
    half = _U32((1 << (int(shift) - 1)) - 1)
    rounded = ((bits + half + ((bits >> shift) & _U32(1))) >> shift).astype(np.int64)
    if signed:
        magnitude = np.clip(rounded - SIGNED_BIAS, 0, SIGNED_MAX_MAGNITUDE)
        negative = (x.view(_U32) >> _U32(31)).astype(np.int64)
        codes = magnitude | ((negative & (magnitude != 0)) << 7)
    else:
        codes = np.where(x > 0, np.clip(rounded - UNSIGNED_BIAS, 1, UNSIGNED_MAX_CODE), 0)
    codes = codes.astype(UINT8)
    codes[~np.repeat(usable, BLOCK)[:n]] = 0
    return codes, scales


class Blockwise8:
    """One optimizer state buffer in the blockwise8 format: ``codes`` (uint8, one per element)
    and ``scales`` (float32, one per block of 256 elements), ``signed`` choosing the code
    (unsigned for ``square_avg``, signed for ``momentum_buffer`` / ``grad_avg``).
    :func:`fastrms.rmsprop_update` takes one in place of any state array and updates
    ``codes`` and ``scales`` in place. The format: docs/compact-state.md.

    Example:
        >>> import numpy as np, fastrms
        >>> s = fastrms.Blockwise8.zeros(300)
        >>> len(s), s.codes.dtype, s.scales.shape
        (300, dtype('uint8'), (2,))
        >>> p = np.ones(300, np.float32); g = np.full(300, 0.5, np.float32)
        >>> fastrms.rmsprop_update(p, g, s, lr=0.01)
        >>> s.to_float32()[:2], s.scales
        (array([0.0025, 0.0025], dtype=float32), array([0.0025, 0.0025], dtype=float32))
        >>> b = fastrms.Blockwise8.from_float32(np.array([-1.0, 0.5, 0.3], np.float32),
        ...                                     signed=True)
        >>> b.to_float32()
        array([-1.   ,  0.5  ,  0.3125], dtype=float32)
    """

    __slots__ = ("codes", "scales", "signed")

    def __init__(self, codes: np.ndarray, scales: np.ndarray, *, signed: bool = False):
        self.codes = codes
        self.scales = scales
        self.signed = bool(signed)
        check_blockwise("Blockwise8", self)

    @classmethod
    def zeros(cls, n: int, *, signed: bool = False) -> "Blockwise8":
        """An ``n``-element buffer of zeros (codes 0, scales 0)."""
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return cls(np.zeros(n, UINT8), np.zeros(block_count(n), FLOAT32), signed=signed)

    @classmethod
    def from_float32(cls, x, *, signed: bool = False) -> "Blockwise8":
        """Quantize float32 values (any shape, read in C order); negative values need
        ``signed=True`` and every value must be finite."""
        x = np.asarray(x)
        if x.dtype != FLOAT32:
            raise TypeError(f"x must have dtype float32, got {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError("x has non-finite values; blockwise8 stores finite values only")
        if not signed and (x < 0).any():
            raise ValueError("x has negative values; pass signed=True (the unsigned code, for "
                             "square_avg, has no sign)")
        codes, scales = encode(x, signed)
        return cls(codes, scales, signed=signed)

    def to_float32(self) -> np.ndarray:
        """The decoded values as a new float32 array of length ``len(self)``."""
        return decode(self.codes, self.scales, self.signed)

    def __len__(self) -> int:
        return self.codes.size

    @property
    def size(self) -> int:
        return self.codes.size

    @property
    def shape(self) -> tuple[int]:
        return (self.codes.size,)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def copy(self) -> "Blockwise8":
        """A deep copy, as it is (a diverged block's NaN scale included)."""
        twin = object.__new__(Blockwise8)
        twin.codes, twin.scales, twin.signed = self.codes.copy(), self.scales.copy(), self.signed
        return twin

    def __repr__(self) -> str:
        return (f"Blockwise8(n={self.codes.size}, blocks={self.scales.size}, "
                f"signed={self.signed})")


def check_blockwise(name: str, state, n: int | None = None, signed: bool | None = None,
                    check_scales: bool = True) -> None:
    """TypeError / ValueError naming ``name`` unless ``state`` is a well-formed Blockwise8
    (of ``n`` elements and the given signedness when those are given)."""
    codes, scales = state.codes, state.scales
    if not isinstance(codes, np.ndarray) or codes.dtype != UINT8 or codes.ndim != 1:
        raise TypeError(f"{name}.codes must be a 1-D uint8 numpy array, got "
                        f"{_describe(codes)}")
    if not isinstance(scales, np.ndarray) or scales.dtype != FLOAT32 or scales.ndim != 1:
        raise TypeError(f"{name}.scales must be a 1-D float32 numpy array, got "
                        f"{_describe(scales)}")
    if scales.size != block_count(codes.size):
        raise ValueError(f"{name}.scales has {scales.size} entries but {codes.size} codes in "
                         f"blocks of {BLOCK} need {block_count(codes.size)}")
    if n is not None and codes.size != n:
        raise ValueError(f"{name} has {codes.size} elements but param has {n}")
    if signed is not None and state.signed != signed:
        want = "signed" if signed else "unsigned"
        raise TypeError(f"{name} must be a {want} Blockwise8 (signed=True for momentum_buffer "
                        f"and grad_avg, signed=False for square_avg)")
    # min() and max() propagate a NaN: two reductions find a NaN, an infinity or a negative.
    if check_scales and scales.size and not (scales.min() >= 0 and scales.max() < _INF):
        bad = ~(scales >= 0) | ~np.isfinite(scales)
        if bad.any():
            k = int(np.argmax(bad))
            raise ValueError(f"{name}.scales[{k}] is {scales[k]}: scales must be finite and "
                             f">= 0 (a NaN scale marks a block whose values diverged)")


def _describe(array) -> str:
    if isinstance(array, np.ndarray):
        return f"{array.ndim}-D {array.dtype}"
    return type(array).__name__
