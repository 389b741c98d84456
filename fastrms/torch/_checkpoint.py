"""Checks on a torch-layout checkpoint before ``fastrms.torch.RMSprop`` loads it: the state must
fit the parameters it is mapped to, since the kernel walks each state tensor alongside its
parameter and torch's own ops would broadcast a tensor of another shape silently."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..engine import STATE_BUFFERS
from ..engine.precision import MASTER


def check_checkpoint(param_groups: list, state_dict, formats=None) -> None:
    """Raise ``ValueError`` / ``KeyError`` / ``TypeError`` naming the entry that does not fit;
    read only. Group-size mismatches are left to torch's own check, which raises first.
    ``formats``: each group's ``state_format`` (compact state, :mod:`._compact`); a saved group
    naming another format is refused."""
    from ._compact import check_entry, check_no_compact_keys  # _compact imports this module
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or \
            "param_groups" not in state_dict:
        raise ValueError("state_dict must be a mapping with 'state' and 'param_groups' "
                         "(what Optimizer.state_dict() returns)")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, param_groups)):
        return  # torch's load_state_dict raises its own ValueError for this
    formats = formats or ["float32"] * len(param_groups)
    for g, (saved, state_format) in enumerate(zip(saved_groups, formats)):
        saved_format = saved.get("state_format") if isinstance(saved, Mapping) else None
        if saved_format is not None and saved_format != state_format:
            raise ValueError(f"state_dict['param_groups'][{g}] has state_format "
                             f"{saved_format!r} but this optimizer's group {g} has state_format "
                             f"{state_format!r}; build the optimizer with "
                             f"state_format={saved_format!r}, or save with "
                             f"state_dict(state_layout='float32') to convert")
    where_of = {}
    for g, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        for k, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            where_of[saved_id] = (p, f"param_groups[{g}]['params'][{k}]", formats[g])
    for saved_id, entry in state_dict["state"].items():
        if saved_id not in where_of:
            continue  # torch ignores state of ids no group names
        p, where, state_format = where_of[saved_id]
        if not isinstance(entry, Mapping):
            raise TypeError(f"state_dict['state'][{saved_id!r}] must be a mapping, got "
                            f"{type(entry).__name__}")
        if not entry:
            continue
        label = f"state_dict['state'][{saved_id!r}]"
        if state_format != "float32":
            check_entry(entry, p, state_format, label, f"its parameter {where}", ValueError)
        else:
            check_no_compact_keys(entry, label, ValueError)
            check_state_entry(entry, p, label, f"its parameter {where}", ValueError)


def check_state_entry(entry: Mapping, p: torch.Tensor, where: str, owner: str,
                      wrong_shape: type[Exception]) -> None:
    """One parameter's state: ``step`` and ``square_avg`` present, every buffer a tensor of the
    parameter's shape (``wrong_shape`` is the exception to raise otherwise: ValueError when a
    checkpoint is loaded, RuntimeError at a step, where torch raises its shape errors)."""
    for key in ("step", "square_avg"):
        if key not in entry:
            raise KeyError(f"{where} (the state of {owner}) has no {key!r}")
    for name in STATE_BUFFERS + (MASTER,):
        value = entry.get(name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != p.shape:
            raise wrong_shape(f"{where}[{name!r}] has shape {tuple(value.shape)} but {owner} "
                              f"has shape {tuple(p.shape)}")
