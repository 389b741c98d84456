"""Parameters packed into one contiguous buffer per dtype, so that an optimizer step is one fused
kernel call per dtype however many arrays a model has.
"""
from __future__ import annotations

import numpy as np

from ._codecs import LOW_PRECISION_DTYPES
from ._coefficients import FLOAT_DTYPES

#: The dtypes FlatParams packs: float32, float64, float16 and bfloat16.
PARAM_DTYPES = FLOAT_DTYPES + LOW_PRECISION_DTYPES


class FlatParams:
    """Copies of ``arrays`` packed into one contiguous buffer per dtype, with a matching gradient
    buffer.

    ``params[i]`` is a view shaped like ``arrays[i]`` into the parameter buffer of its dtype:
    writing to it writes the buffer, and the optimizer's updates show through it. The input
    arrays themselves are only copied, never updated. ``grads[i]`` is the matching view into the
    gradient buffer (zeros at first): fill it in place (``flat.grads[i][...] = g``), then call
    ``step()`` on an optimizer built from this object. ``params`` and ``grads`` are tuples, so a
    view cannot be replaced by another array by mistake.

    float32, float64, float16 and bfloat16 (``ml_dtypes.bfloat16``) arrays may mix; each dtype
    gets its own pair of buffers (a 16-bit dtype's gradient buffer has that dtype too), in
    :attr:`dtypes` order, holding its arrays in input order with no padding.

    Example:
        >>> import numpy as np, fastrms
        >>> flat = fastrms.FlatParams([np.ones((2, 3), np.float32), np.zeros(4, np.float32)])
        >>> opt = fastrms.RMSprop(flat, lr=0.01)
        >>> flat.grads[0][...] = 0.5          # the caller's backward pass fills the views
        >>> opt.step()                        # one fused call for all float32 arrays
        True
        >>> bool(flat.params[0][0, 0] < 1.0)
        True
    """

    __slots__ = ("params", "grads", "dtypes", "param_buffers", "grad_buffers", "layout")

    def __init__(self, arrays):
        if isinstance(arrays, np.ndarray):
            raise TypeError("FlatParams takes a list of arrays, not a single array; "
                            "wrap it in a list")
        arrays = list(arrays)
        totals: dict[np.dtype, int] = {}
        for index, array in enumerate(arrays):
            if not isinstance(array, np.ndarray):
                raise TypeError(f"arrays[{index}] must be a numpy.ndarray, got "
                                f"{type(array).__name__}")
            if array.dtype not in PARAM_DTYPES:
                raise TypeError(f"arrays[{index}] must have dtype float32, float64, float16 or "
                                f"bfloat16 (native byte order), got {array.dtype}")
            totals[array.dtype] = totals.get(array.dtype, 0) + array.size
        #: The dtypes present, in order of first appearance.
        self.dtypes = tuple(totals)
        #: dtype -> the flat parameter buffer / the flat gradient buffer.
        self.param_buffers = {dtype: np.empty(total, dtype) for dtype, total in totals.items()}
        self.grad_buffers = {dtype: np.zeros(total, dtype) for dtype, total in totals.items()}
        #: Per array: (dtype, offset in elements into its dtype's buffers, size, shape).
        self.layout: tuple[tuple[np.dtype, int, int, tuple[int, ...]], ...]
        offsets = dict.fromkeys(totals, 0)
        layout, params, grads = [], [], []
        for array in arrays:
            dtype = array.dtype
            start = offsets[dtype]
            offsets[dtype] = stop = start + array.size
            layout.append((dtype, start, array.size, array.shape))
            view = self.param_buffers[dtype][start:stop].reshape(array.shape)
            view[...] = array
            params.append(view)
            grads.append(self.grad_buffers[dtype][start:stop].reshape(array.shape))
        self.layout = tuple(layout)
        self.params = tuple(params)
        self.grads = tuple(grads)

    def zero_grad(self) -> None:
        """Set every gradient to zero (the buffers are reused, the views stay valid)."""
        for buffer in self.grad_buffers.values():
            buffer.fill(0)

    def __reduce__(self):
        # The views must be views of the buffers again after a copy: rebuild, then restore the
        # gradients.
        return _rebuild, ([p.copy() for p in self.params], [g.copy() for g in self.grads])

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{dtype}: {buffer.size}" for dtype, buffer in self.param_buffers.items())
        return f"FlatParams({len(self.params)} arrays; elements per dtype {{{sizes}}})"


def _rebuild(params: list, grads: list) -> FlatParams:
    flat = FlatParams(params)
    for view, grad in zip(flat.grads, grads):
        view[...] = grad
    return flat
