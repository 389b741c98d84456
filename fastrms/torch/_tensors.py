"""Facts about torch tensors that the drop-in's plan and checks need: which tensors the fused
kernel can walk, their layouts, zero-copy NumPy views of their memory, and cheap C-level passes
over lists of them."""
from __future__ import annotations

import operator

import numpy as np
import torch

KERNEL_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
SPARSE = "RMSprop does not support sparse gradients"  # torch's message, for code that matches it

get_grad = operator.attrgetter("grad")
get_shape = operator.attrgetter("shape")
get_dtype = operator.attrgetter("dtype")
get_is_cpu = operator.attrgetter("is_cpu")
data_ptr = torch.Tensor.data_ptr
stride_of = torch.Tensor.stride
is_contiguous = torch.Tensor.is_contiguous
is_neg = torch.Tensor.is_neg
same = operator.is_


def layout_key(t: torch.Tensor):
    """(size, stride) of each dimension longer than 1, in dimension order, when ``t`` covers one
    block of memory without gaps (dense); None otherwise. Two dense tensors of one shape with
    equal keys map each index to the same position in their blocks, so the kernel can walk both
    as flat. (A transposed square matrix has the contiguous one's strides, permuted: a
    different key.)"""
    dims = tuple((size, stride) for size, stride in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in dims):
        if stride != expected:
            return None
        expected *= size
    return dims


def flat_array(t: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a dense tensor's block, C-contiguous (reshaped or flat)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.as_strided((t.numel(),), (1,))
    return t.numpy()


class TensorLayouts:
    """Where a list of tensors lay when a plan was made: data addresses, shapes, strides and
    dtypes, compared at every step with a few C-level passes. A tensor's memory and layout can
    change under the same Python object (``p.data = ...``, ``set_``, ``resize_``, ``t_``); any
    such change makes :meth:`unchanged` False."""

    __slots__ = ("ptrs", "shapes", "strides", "dtypes", "contiguous")

    def __init__(self, tensors: list):
        self.ptrs = list(map(data_ptr, tensors))
        self.shapes = list(map(get_shape, tensors))
        self.dtypes = list(map(get_dtype, tensors))
        # Contiguous tensors (the usual case) are re-checked with is_contiguous, which is cheaper
        # than comparing stride tuples and proves the same with the shape known.
        self.contiguous = all(map(is_contiguous, tensors))
        self.strides = None if self.contiguous else list(map(stride_of, tensors))

    def unchanged(self, tensors: list) -> bool:
        try:
            return (list(map(data_ptr, tensors)) == self.ptrs
                    and list(map(get_shape, tensors)) == self.shapes
                    and list(map(get_dtype, tensors)) == self.dtypes
                    and (all(map(is_contiguous, tensors)) if self.contiguous
                         else list(map(stride_of, tensors)) == self.strides))
        except RuntimeError:  # a tensor without storage (sparse, or set_ to nothing usable)
            return False


def fallback_reason(p: torch.Tensor, group: dict):
    """Why torch's implementation must update ``p`` (None when the kernel can)."""
    if group["differentiable"]:
        return "differentiable=True (torch's implementation keeps the update visible to autograd)"
    if type(p) not in PLAIN_TYPES:
        return f"a tensor subclass ({type(p).__name__})"
    if p.device.type != "cpu":
        return f"on device {p.device} (the fused kernel runs on CPU)"
    if p.dtype not in KERNEL_DTYPES:
        return f"dtype {p.dtype} (the fused kernel takes float32 and float64)"
    if p.layout != torch.strided:
        return f"layout {p.layout}"
    if p.is_neg() or p.is_conj() or layout_key(p) is None:
        return "not dense in memory (a strided view; the kernel walks each tensor as one block)"
    return None


def sharing_memory(params) -> set:
    """ids of the parameters whose memory overlaps another parameter's."""
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), id(p))
                   for p in params if p.numel())
    shared = set()
    end, owner = -1, None
    for lo, hi, key in spans:
        if lo < end:
            shared.update((key, owner))
        if hi > end:
            end, owner = hi, key
    return shared
