"""Compact optimizer state in the engine: the ``state_format`` group option (``"float32"``,
``"bfloat16"``, ``"blockwise8"``), the state buffers of a compact bucket, and its step through the
backend's ``update_compact`` (docs/compact-state.md, "In the optimizers").

Design: a compact bucket keeps, per parameter, a bfloat16 array of the parameter's shape
(``"bfloat16"``; in the flat layout a view of one flat bfloat16 buffer) or a
:class:`~fastrms.Blockwise8` of its own (``"blockwise8"``: blocks never straddle two
parameters, so each parameter's state is saved, loaded and stepped alone, and a torch parameter
without a gradient simply skips its call). A step is one ``update_compact`` call per parameter,
or one call over the flat buffers for a flat bfloat16 bucket stepping every parameter with
nearest rounding. The float32 buckets never enter this module.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .._blockwise import Blockwise8
from .._codecs import BFLOAT16, FLOAT32
from .._validation import is_kernel_ready
from ..backends import compact_module
from .precision import MASTER, is_low_precision

#: The group key, and its values; the first is the default.
STATE_FORMAT = "state_format"
STATE_FORMATS = ("float32", "bfloat16", "blockwise8")
DEFAULT_STATE_FORMAT = "float32"
#: A blockwise8 buffer ``name`` is saved as ``name + CODES`` and ``name + SCALES``.
CODES, SCALES = "_codes", "_scales"


def check_state_format(value, where: str) -> str:
    """The checked ``state_format`` (``ValueError`` prefixed with ``where`` otherwise)."""
    if value is DEFAULT_STATE_FORMAT:
        return value
    if not isinstance(value, str) or value not in STATE_FORMATS:
        raise ValueError(f"{where}: state_format must be one of "
                         f"{', '.join(map(repr, STATE_FORMATS))}, got {value!r}")
    return STATE_FORMATS[STATE_FORMATS.index(value)]


def group_state_format(group: Mapping, where: str) -> str:
    """A group's checked ``state_format`` (a group without the key has float32 state)."""
    return check_state_format(group.get(STATE_FORMAT, DEFAULT_STATE_FORMAT), where)


def check_format_fits(state_format: str, dtypes, where: str) -> None:
    """Compact state goes with float32 and 16-bit parameters (the compact kernel computes in
    float32); a float64 parameter in a compact group is refused."""
    if state_format == DEFAULT_STATE_FORMAT:
        return
    for dtype in dtypes:
        if dtype is not None and np.dtype(dtype) != FLOAT32 and not is_low_precision(dtype):
            raise ValueError(f"{where}: state_format={state_format!r} goes with float32, "
                             f"float16 and bfloat16 parameters (the compact kernel computes in "
                             f"float32), but the group holds a {np.dtype(dtype)} parameter; "
                             f"put it in a group with state_format='float32'")


def is_signed(name: str) -> bool:
    """momentum_buffer and grad_avg take the signed 8-bit code, square_avg the unsigned one."""
    return name != "square_avg"


def new_states(state_format: str, name: str, shapes: list, fill) -> tuple[list, object]:
    """Per-parameter state buffers at ``fill`` (a float32 value) and the flat buffer they are
    views of (None for blockwise8)."""
    fill = FLOAT32.type(fill)
    if state_format == "bfloat16":
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        flat = np.full(sum(sizes), fill.astype(BFLOAT16), BFLOAT16)
        views, lo = [], 0
        for size, shape in zip(sizes, shapes):
            views.append(flat[lo:lo + size].reshape(shape))
            lo += size
        return views, flat
    signed = is_signed(name)
    out = []
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        out.append(Blockwise8.zeros(n, signed=signed) if fill == 0 else
                   Blockwise8.from_float32(np.full(n, fill, FLOAT32), signed=signed))
    return out, None


def state_arrays(state) -> list:
    """The arrays a state buffer's step writes (a Blockwise8's codes and scales)."""
    if isinstance(state, Blockwise8):
        return [state.codes, state.scales]
    return [state]


def check_not_diverged(bucket) -> None:
    """``ValueError`` when a chosen parameter's blockwise8 buffer holds a NaN scale (a block
    whose values diverged: :func:`fastrms.rmsprop_update` refuses it too). Run before the
    step's first write."""
    chosen = range(bucket.count) if bucket.chosen is None else bucket.chosen
    for name, states in bucket.state.items():
        if states is None or name == MASTER:
            continue
        for k in chosen:
            state = states[k]
            if isinstance(state, Blockwise8) and not np.isfinite(state.scales).all():
                block = int(np.argmax(~np.isfinite(state.scales)))
                raise ValueError(f"param_groups[{bucket.group}]: the blockwise8 {name} of "
                                 f"parameter {bucket.ids[k]} has scale {state.scales[block]} "
                                 f"in block {block}: its values diverged (8-bit state and "
                                 f"centered=True: see docs/compact-state.md); nothing was "
                                 f"written")


def run_compact(bucket, coeffs, module, grads) -> None:
    """One step of a compact bucket's chosen parameters: ``grads`` are the chosen parameters'
    gradient arrays (read from the flat gradient buffer in the flat layout)."""
    update = compact_module(module).update_compact
    momentum, centered = coeffs.uses_momentum, coeffs.centered
    stochastic = bucket.low_precision and bucket.precision[0] == "stochastic"
    flat, state = bucket.flat, bucket.state
    if (flat["param"] is not None and bucket.chosen is None and not stochastic
            and flat["square_avg"] is not None
            and (flat["momentum_buffer"] is not None or not momentum)
            and (flat["grad_avg"] is not None or not centered)
            and (flat[MASTER] is not None or state[MASTER] is None)):
        update(coeffs, flat["param"], flat["grad"], flat["square_avg"],
               flat["momentum_buffer"] if momentum else None,
               flat["grad_avg"] if centered else None, flat[MASTER], None)
        return
    chosen = range(bucket.count) if bucket.chosen is None else bucket.chosen
    keys = bucket.keys(bucket.precision[1]).tolist() if stochastic else None
    offsets = bucket.offsets
    master = state[MASTER]
    for j, k in enumerate(chosen):
        param = bucket.params[k]
        if flat["param"] is not None:
            grad = flat["grad"][offsets[k]:offsets[k + 1]].reshape(param.shape)
        else:
            grad = grads[j]
        ready = is_kernel_ready(param)
        target = param if ready else np.array(param, order="C", copy=True)
        update(coeffs, target, grad, state["square_avg"][k],
               state["momentum_buffer"][k] if momentum else None,
               state["grad_avg"][k] if centered else None,
               None if master is None else master[k], None if keys is None else keys[j])
        if not ready:
            param[...] = target
