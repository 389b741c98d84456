"""Facts about torch tensors that the drop-in's plan and checks need: which tensors the fused
kernel can walk, their layouts, zero-copy NumPy views of their memory, and cheap C-level passes
over lists of them."""
from __future__ import annotations

import operator
import sys

import numpy as np
import torch

from .._codecs import BFLOAT16, FLOAT16

KERNEL_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
                 torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}
#: The 16-bit kernel dtypes: float32 state and arithmetic, param_rounding on the way back.
LOW_PRECISION = (torch.bfloat16, torch.float16)
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
SPARSE = "RMSprop does not support sparse gradients"  # torch's message, for code that matches it

get_grad = operator.attrgetter("grad")
get_shape = operator.attrgetter("shape")
get_dtype = operator.attrgetter("dtype")
get_is_cpu = operator.attrgetter("is_cpu")
data_ptr = torch.Tensor.data_ptr
numel = torch.Tensor.numel
stride_of = torch.Tensor.stride
is_contiguous = torch.Tensor.is_contiguous
is_neg = torch.Tensor.is_neg
same = operator.is_


def dtensor_class():
    """torch's ``DTensor`` class when ``torch.distributed.tensor`` is loaded, else None: no
    DTensor can exist before that module is imported, so a plain model never pays for it."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's part of a DTensor (its shard, or its replica). Read as
    the attribute: ``to_local()`` is an autograd function and may hand back a tensor whose
    communication is still in flight, while the optimizer needs the memory itself."""
    return t._local_tensor


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
    """A zero-copy NumPy view of a dense tensor's block, C-contiguous (reshaped or flat). A
    bfloat16 tensor (NumPy has no such dtype) is viewed as int16 by torch, then as
    ``ml_dtypes.bfloat16`` by NumPy: the same memory, no copy."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.as_strided((t.numel(),), (1,))
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


class TensorLayouts:
    """Where a list of tensors lay when a plan was made, compared at every step with a few
    C-level passes: a tensor's memory and layout can change under the same Python object
    (``p.data = ...``, ``set_``, ``resize_``, ``t_``), and any such change makes
    :meth:`unchanged` False.

    Compared: data addresses (a new tensor, ``set_``, a device move), element counts (a slice at
    the same address, a dtype view, ``resize_``) and, for contiguous tensors, contiguity (a
    transposed view at the same address), else the strides. The count is a cheaper pass than the
    shape, and a reshaped view of the same memory is walked alike. ``addresses_only`` keeps the
    first pass alone, for state tensors, whose identity in ``opt.state`` is checked besides.
    """

    __slots__ = ("ptrs", "sizes", "strides", "contiguous")

    def __init__(self, tensors: list, addresses_only: bool = False):
        self.ptrs = list(map(data_ptr, tensors))
        self.sizes = None if addresses_only else list(map(numel, tensors))
        # Contiguous tensors (the usual case) are re-checked with is_contiguous, which is cheaper
        # than comparing stride tuples and proves the same with the shape known.
        self.contiguous = addresses_only or all(map(is_contiguous, tensors))
        self.strides = None if self.contiguous else list(map(stride_of, tensors))

    def unchanged(self, tensors: list) -> bool:
        try:
            if list(map(data_ptr, tensors)) != self.ptrs:
                return False
            if self.sizes is None:
                return True
            return (list(map(numel, tensors)) == self.sizes
                    and (all(map(is_contiguous, tensors)) if self.contiguous
                         else list(map(stride_of, tensors)) == self.strides))
        except RuntimeError:  # a tensor without storage (sparse, or set_ to nothing usable)
            return False


def fallback_reason(p: torch.Tensor, group: dict):
    """Why torch's implementation must update ``p`` (None when the kernel can)."""
    if group["differentiable"]:
        return "differentiable=True (torch's implementation keeps the update visible to autograd)"
    if type(p) not in PLAIN_TYPES:
        if is_dtensor(p):
            return dtensor_fallback_reason(p, group)
        return f"a tensor subclass ({type(p).__name__})"
    if p.device.type != "cpu":
        return f"on device {p.device} (the fused kernel runs on CPU)"
    if p.dtype not in KERNEL_DTYPES:
        return (f"dtype {p.dtype} (the fused kernel takes float32, float64, bfloat16 and "
                f"float16)")
    if p.layout != torch.strided:
        return f"layout {p.layout}"
    if p.is_neg() or p.is_conj() or layout_key(p) is None:
        return "not dense in memory (a strided view; the kernel walks each tensor as one block)"
    return None


def dtensor_fallback_reason(p, group: dict):
    """:func:`fallback_reason` for a DTensor parameter: the kernel updates its local tensor
    (a shard under FSDP2's ``fully_shard``, or a replica) when that tensor could be a
    parameter itself and no placement is a pending reduction."""
    if any(placement.is_partial() for placement in p.placements):
        return "a DTensor with a Partial placement (a pending reduction, not a value)"
    local = local_tensor(p)
    if type(local) not in PLAIN_TYPES:
        return f"a DTensor whose local tensor is a {type(local).__name__}"
    reason = fallback_reason(local, group)
    return None if reason is None else f"a DTensor whose local tensor is {reason}"


def memory_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory the kernel walks for ``t``: its local tensor for a DTensor."""
    return local_tensor(t) if type(t) not in PLAIN_TYPES and is_dtensor(t) else t


def sharing_memory(params) -> set:
    """ids of the parameters whose memory overlaps another parameter's (a DTensor's memory is
    its local tensor's)."""
    spans = sorted((m.data_ptr(), m.data_ptr() + m.numel() * m.element_size(), id(p))
                   for p, m in zip(params, map(memory_of, params)) if m.numel())
    shared = set()
    end, owner = -1, None
    for lo, hi, key in spans:
        if lo < end:
            shared.update((key, owner))
        if hi > end:
            end, owner = hi, key
    return shared
