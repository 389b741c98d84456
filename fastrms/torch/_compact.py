"""Compact state (``state_format="bfloat16"`` / ``"blockwise8"``) in ``fastrms.torch.RMSprop``: the
state keys a parameter's ``opt.state`` entry holds, their tensors, their checks, the quantization
of float32 state (a ``torch.optim.RMSprop`` checkpoint) into them, and torch's float32 layout.

``"bfloat16"``: ``square_avg``, ``momentum_buffer``, ``grad_avg`` are bfloat16 tensors of the
parameter's shape and layout. ``"blockwise8"``: each buffer ``name`` is two tensors,
``name_codes`` (uint8, one per element, in the parameter's memory order) and ``name_scales``
(float32, one per block of 256 elements), zero-copy the :class:`fastrms.Blockwise8` the kernel
updates in place. Quantizing uses fastrms's own encoders (round to nearest even for bfloat16,
:meth:`fastrms.Blockwise8.from_float32`), so the result is the same bits wherever it runs.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .._blockwise import BLOCK, Blockwise8, block_count
from .._codecs import BFLOAT16
from ..engine import STATE_BUFFERS
from ..engine.compact import CODES, DEFAULT_STATE_FORMAT, SCALES, STATE_FORMAT, is_signed
from ..engine.precision import MASTER
from ._tensors import flat_array

#: ``state_dict(state_layout=...)``: the state as the optimizer stores it, or torch's layout.
STATE_LAYOUTS = ("stored", "float32")


def state_keys(state_format: str, low_precision: bool) -> tuple:
    """The state tensors' keys of a kernel parameter, besides ``step``."""
    if state_format == "blockwise8":
        keys = tuple(name + part for name in STATE_BUFFERS for part in (CODES, SCALES))
    else:
        keys = STATE_BUFFERS
    return keys + ((MASTER,) if low_precision else ())


def buffer_of(key: str) -> tuple[str, str]:
    """``("square_avg", "_codes")`` for ``"square_avg_codes"``; ``(key, "")`` otherwise."""
    for part in (CODES, SCALES):
        if key.endswith(part) and key[:-len(part)] in STATE_BUFFERS:
            return key[:-len(part)], part
    return key, ""


def new_tensor(state_format: str, key: str, p: torch.Tensor) -> torch.Tensor:
    """A zero state tensor for ``key`` (not the master copy)."""
    if state_format == "blockwise8":
        n = p.numel()
        if key.endswith(CODES):
            return torch.zeros(n, dtype=torch.uint8)
        return torch.zeros(block_count(n), dtype=torch.float32)
    return torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)


def usable(state_format: str, key: str, p: torch.Tensor, tensor, layout_key) -> bool:
    """Whether the kernel can take ``tensor`` as it is for ``key``."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != "cpu" \
            or tensor.requires_grad or tensor.is_neg():
        return False
    if state_format == "blockwise8":
        codes = key.endswith(CODES)
        return (tensor.dtype == (torch.uint8 if codes else torch.float32) and tensor.dim() == 1
                and tensor.is_contiguous()
                and tensor.numel() == (p.numel() if codes else block_count(p.numel()))
                and tensor.data_ptr() % tensor.element_size() == 0)
    return (tensor.dtype == torch.bfloat16 and layout_key(tensor) == layout_key(p)
            and tensor.data_ptr() % 2 == 0)


def blockwise(codes: torch.Tensor, scales: torch.Tensor, key: str) -> Blockwise8:
    """The Blockwise8 over the memory of two state tensors (no copy)."""
    return Blockwise8(codes.numpy(), scales.numpy(), signed=is_signed(key))


def _memory_order(p: torch.Tensor, value: torch.Tensor) -> np.ndarray:
    """``value`` (of ``p``'s shape) as a float32 array in ``p``'s memory order."""
    like = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    with torch.no_grad():
        like.copy_(value.detach())
    return flat_array(like)


def quantize(state_format: str, name: str, p: torch.Tensor, value: torch.Tensor) -> dict:
    """The compact tensors of a dense state tensor ``value`` (of ``p``'s shape): ``{key:
    tensor}``. ``ValueError`` for values the format cannot hold (checked by :func:`check_entry`
    before anything is loaded)."""
    values = _memory_order(p, value)
    if state_format == "bfloat16":
        out = torch.empty_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
        flat_array(out).reshape(-1)[...] = values.reshape(-1).astype(BFLOAT16)
        return {name: out}
    encoded = Blockwise8.from_float32(values, signed=is_signed(name))
    return {name + CODES: torch.from_numpy(encoded.codes),
            name + SCALES: torch.from_numpy(encoded.scales)}


def decode(state_format: str, entry: Mapping, name: str, p: torch.Tensor):
    """The float32 tensor (``p``'s shape and layout) of buffer ``name`` in ``entry``, or None."""
    out = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    if state_format == "blockwise8":
        if name + CODES not in entry:
            return None
        codes = entry[name + CODES].detach().cpu().to(torch.uint8).numpy()
        scales = entry[name + SCALES].detach().cpu().to(torch.float32).numpy()
        flat_array(out).reshape(-1)[...] = Blockwise8(codes, scales,
                                                      signed=is_signed(name)).to_float32()
        return out
    if name not in entry:
        return None
    with torch.no_grad():
        out.copy_(entry[name].detach())
    return out


def check_entry(entry: Mapping, p: torch.Tensor, state_format: str, where: str, owner: str,
                error: type[Exception]) -> None:
    """A kernel parameter's state in a compact group: ``step``, and each buffer either in the
    group's format or dense of the parameter's shape (then quantized: finite, and
    ``square_avg`` >= 0 for blockwise8). ``error`` is raised for sizes and values."""
    if "step" not in entry:
        raise KeyError(f"{where} (the state of {owner}) has no 'step'")
    n = p.numel()
    for name in STATE_BUFFERS:
        dense = entry.get(name)
        if state_format == "blockwise8":
            codes, scales = entry.get(name + CODES), entry.get(name + SCALES)
            if (codes is None) != (scales is None):
                have, lack = (CODES, SCALES) if scales is None else (SCALES, CODES)
                raise error(f"{where} has {name + have!r} but not {name + lack!r}; a "
                            f"blockwise8 buffer is both")
            if codes is not None:
                if dense is not None:
                    raise error(f"{where} has both {name!r} and {name + CODES!r}; keep one")
                _check_blockwise(where, name, codes, scales, n, error)
                continue
        if dense is None:
            if name == "square_avg":
                raise KeyError(f"{where} (the state of {owner}) has no 'square_avg'"
                               + (f" (nor {name + CODES!r})" if state_format == "blockwise8"
                                  else ""))
            continue
        _check_dense(where, name, dense, p, owner, state_format, error)
    value = entry.get(MASTER)
    if value is not None:
        _check_dense(where, MASTER, value, p, owner, DEFAULT_STATE_FORMAT, error)


def _check_dense(where, name, value, p, owner, state_format, error) -> None:
    label = f"{where}[{name!r}]"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{label} must be a tensor, got {type(value).__name__}")
    if value.shape != p.shape:
        raise error(f"{label} has shape {tuple(value.shape)} but {owner} has shape "
                    f"{tuple(p.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{label} has dtype {value.dtype}; a dense state tensor is floating "
                        f"point")
    if state_format == DEFAULT_STATE_FORMAT or value.dtype == torch.bfloat16:
        return
    if state_format == "blockwise8":  # to be quantized
        values = value.detach().cpu().float()
        if not torch.isfinite(values).all():
            raise error(f"{label} has non-finite values; blockwise8 state holds finite values "
                        f"only")
        if name == "square_avg" and (values < 0).any():
            raise error(f"{label} has negative values; square_avg is >= 0")


def _check_blockwise(where, name, codes, scales, n, error) -> None:
    for part, tensor, dtype, size in ((CODES, codes, torch.uint8, n),
                                      (SCALES, scales, torch.float32, block_count(n))):
        label = f"{where}[{name + part!r}]"
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype or tensor.dim() != 1:
            raise TypeError(f"{label} must be a 1-D {dtype} tensor, got a {tensor.dim()}-D "
                            f"{tensor.dtype} tensor")
        if tensor.numel() != size:
            if part == CODES:
                raise error(f"{label} has {tensor.numel()} codes but its parameter has {n} "
                            f"elements")
            raise error(f"{label} has {tensor.numel()} scales but blockwise8 keeps one per block "
                        f"of {BLOCK} elements: {size} for {n} elements (a checkpoint of another "
                        f"block size does not fit)")
    values = scales.detach().cpu()
    bad = ~(values >= 0) | ~torch.isfinite(values)
    if bad.any():
        k = int(torch.nonzero(bad)[0])
        raise error(f"{where}[{name + SCALES!r}][{k}] is {float(values[k])}: scales must be "
                    f"finite and >= 0")


def check_no_compact_keys(entry: Mapping, where: str, error: type[Exception]) -> None:
    """A float32 group's entry with blockwise8 keys: the checkpoint's format is not ours."""
    for key in entry:
        if isinstance(key, str) and buffer_of(key)[1]:
            raise error(f"{where} has {key!r}, a blockwise8 state tensor, but its group has "
                        f"state_format 'float32'; build the optimizer with "
                        f"state_format='blockwise8' to load it")


def float32_layout(state_dict: dict, formats: dict) -> dict:
    """``state_dict`` in torch.optim.RMSprop's layout: every compact buffer decoded to a float32
    tensor of its parameter's shape, no ``state_format`` in the groups. ``formats``: saved id
    -> (state_format, parameter) of the kernel parameters of compact groups."""
    state = {}
    for saved_id, entry in state_dict["state"].items():
        found = formats.get(saved_id)
        if found is None or found[0] == DEFAULT_STATE_FORMAT:
            state[saved_id] = entry
            continue
        state_format, p = found
        out = {"step": entry["step"]}
        for name in STATE_BUFFERS:
            value = decode(state_format, entry, name, p)
            if value is not None:
                out[name] = value
        if MASTER in entry:
            out[MASTER] = entry[MASTER]
        state[saved_id] = out
    groups = [{k: v for k, v in group.items() if k != STATE_FORMAT}
              for group in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}
