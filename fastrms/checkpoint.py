"""Checkpoints of :class:`fastrms.RMSprop`: its state dict (builtins and arrays, torch's layout),
loading one back with every entry checked before the first write, and the flat ``{name: array}``
form that ``np.savez`` / ``np.load(allow_pickle=False)`` carry.

Kept apart from the stepping code: these functions read and write an optimizer's buckets
(:mod:`fastrms.engine`) through the few attributes named below, nothing else.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np

from ._blockwise import BLOCK, Blockwise8, block_count
from ._codecs import BFLOAT16
from .engine import HYPERPARAMETERS, OPTIONAL_BUFFERS, STATE_BUFFERS, check_hyperparameters
from .engine.compact import (CODES, DEFAULT_STATE_FORMAT, SCALES, STATE_FORMAT,
                             check_state_format)
from .engine.precision import (MASTER, PRECISION_OPTIONS, check_master_has_targets,
                               check_precision_options)

_GROUP_KEYS = HYPERPARAMETERS + PRECISION_OPTIONS
_STATE_NAMES = STATE_BUFFERS + (MASTER,)
_STATE_KEYS = frozenset(("step",) + STATE_BUFFERS)
_ENTRY_KEYS = _STATE_KEYS | {MASTER}
_VOID2 = np.dtype("V2")
#: Steps are saved as int64.
_STEP_LIMIT = 2 ** 63


def group_keys(opt) -> tuple:
    """The keys of every saved group: the 16-bit options too when the optimizer holds a float16
    / bfloat16 parameter (a float32 / float64 optimizer's checkpoints keep the layout they had
    before those options, the sharded optimizer's), and ``state_format`` when a group has
    compact state."""
    keys = HYPERPARAMETERS
    if any(bucket.low_precision for bucket in opt._engine.buckets):
        keys = _GROUP_KEYS
    if any(group.get(STATE_FORMAT, DEFAULT_STATE_FORMAT) != DEFAULT_STATE_FORMAT
           for group in opt.param_groups):
        keys = keys + (STATE_FORMAT,)
    return keys


def group_entry(group: Mapping, keys, where: str) -> dict:
    """A parameter group's ``keys`` as a state dict stores them: a callable lr as None,
    ``state_format`` and the 16-bit options as a str, an int and a bool, the rest as Python
    numbers."""
    entry = {}
    for key in keys:
        value = group[key]
        if key == "lr" and callable(value):
            entry[key] = None
        elif key == STATE_FORMAT:
            entry[key] = str(value)
        elif key in PRECISION_OPTIONS:  # checked at every step: a str, an int, a bool
            entry[key] = value if isinstance(value, str) else \
                (bool(value) if key == "master_weights" else int(value))
        else:
            entry[key] = _as_builtin(value, f"{where}[{key!r}]")
    return entry


def state_dict(opt) -> dict:
    """:meth:`fastrms.RMSprop.state_dict`."""
    groups = []
    keys = group_keys(opt)
    for g, group in enumerate(opt.param_groups):
        entry = group_entry(group, keys, f"param_groups[{g}]")
        entry["params"] = list(opt._group_indices[g])
        groups.append(entry)
    state: dict[int, dict] = {}
    for bucket, indices in zip(opt._engine.buckets, opt._bucket_indices):
        for pos, i in enumerate(indices):
            entry = {"step": int(bucket.step_count(pos))}
            for name in _STATE_NAMES:
                arrays = bucket.state[name]
                if arrays is None:
                    continue
                if isinstance(arrays[pos], Blockwise8):  # saved as it is: codes and scales
                    entry[name + CODES] = arrays[pos].codes.copy()
                    entry[name + SCALES] = arrays[pos].scales.copy()
                else:
                    entry[name] = arrays[pos].copy()
            state[i] = entry
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_state_dict(opt, saved: Mapping) -> None:
    """:meth:`fastrms.RMSprop.load_state_dict`: check everything, then copy into the buffers."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(saved).__name__}")
    _exact_keys(saved, ("state", "param_groups"), "state_dict")
    new_hyper, index_of = _checked_groups(opt, saved["param_groups"])

    saved_state = saved["state"]
    if not isinstance(saved_state, Mapping):
        raise TypeError("state_dict['state'] must be a mapping from parameter id to state")
    keys = {int(k) if isinstance(k, Integral) and not isinstance(k, bool) else k
            for k in saved_state}
    if keys != set(index_of):
        missing = sorted(set(index_of) - keys, key=repr)
        extra = sorted(keys - set(index_of), key=repr)
        raise ValueError(f"state_dict['state'] does not fit: missing ids {missing}, "
                         f"unexpected ids {extra}")
    entry_of = {index_of[int(k)]: v for k, v in saved_state.items()}
    saved_id_of = {i: saved_id for saved_id, i in index_of.items()}

    buckets = opt._engine.buckets
    own_buffers = [a for bucket in buckets for a in bucket.flat.values() if a is not None]
    own_buffers += [a for bucket in buckets if bucket.compact for a in bucket.written()]
    group_step: dict[int, tuple[int, int]] = {}
    new_buffers = []  # per bucket: name -> list of arrays (or None)
    for bucket, indices in zip(buckets, opt._bucket_indices):
        hyper = new_hyper[bucket.group]
        required = {"momentum_buffer": hyper["momentum"] != 0 or opt._always_momentum,
                    "grad_avg": bool(hyper["centered"])}
        master = bucket.low_precision and hyper["master_weights"]  # its optimizer saves it
        arrays = {name: [] for name in _STATE_NAMES}
        present: dict[str, bool] = {}
        blockwise = bucket.state_format == "blockwise8"
        for pos, i in enumerate(indices):
            where = f"state_dict['state'][{saved_id_of[i]}]"
            entry = entry_of[i]
            if not isinstance(entry, Mapping):
                raise TypeError(f"{where} must be a mapping, got {type(entry).__name__}")
            if blockwise:
                entry = _joined_blockwise(entry, where)
            unknown = set(entry) - _ENTRY_KEYS
            if unknown:
                raise ValueError(f"{where} has unexpected keys {sorted(map(repr, unknown))} "
                                 f"for state_format {bucket.state_format!r}")
            for name in ("step", "square_avg"):
                if name not in entry:
                    raise ValueError(f"{where} is missing "
                                     f"{_saved_names(name, blockwise and name != 'step')}")
            step = _check_step(entry["step"], where)
            first = group_step.setdefault(bucket.group, (step, i))
            if first[0] != step:
                raise ValueError(f"{where} has step {step} but parameter {first[1]} of the "
                                 f"same group has step {first[0]}; a group steps together")
            for name in OPTIONAL_BUFFERS:
                has = name in entry
                if required[name] and not has:
                    raise ValueError(f"{where} is missing {name!r}, which the saved "
                                     f"hyperparameters need")
                if present.setdefault(name, has) != has:
                    raise ValueError(f"{where}: {name!r} is present for some parameters of "
                                     f"its group and dtype but not others")
            if (MASTER in entry) != master:
                raise ValueError(f"{where} {'lacks' if master else 'has'} {MASTER!r}, but "
                                 f"the saved group has master_weights={bool(master)} and the "
                                 f"parameter is {bucket.dtype}")
            param = bucket.params[pos]
            for name in _STATE_NAMES:
                if name not in entry:
                    continue
                if blockwise and name != MASTER:
                    arrays[name].append(_check_blockwise_entry(entry[name], name, param, where,
                                                               own_buffers))
                    continue
                dtype = BFLOAT16 if bucket.state_format == "bfloat16" and name != MASTER \
                    else bucket.state_dtype
                arrays[name].append(_check_state_array(entry[name], param, dtype,
                                                       f"{where}[{name!r}]", own_buffers))
        new_buffers.append({name: (arrays[name] or None) for name in _STATE_NAMES})

    # Everything fits: write.
    for group, hyper in zip(opt.param_groups, new_hyper):
        group.update(hyper)
    changed = False
    for bucket, buffers in zip(buckets, new_buffers):
        for name in OPTIONAL_BUFFERS + (MASTER,):
            if buffers[name] is None and bucket.state[name] is not None:
                bucket.set_state(name, None)
                changed = True
            elif buffers[name] is not None and bucket.state[name] is None:
                bucket.allocate(name, 0.0)
                changed = True
        for name in _STATE_NAMES:
            if buffers[name] is not None:
                for view, array in zip(bucket.state[name], buffers[name]):
                    if isinstance(view, Blockwise8):
                        np.copyto(view.codes, array[0])
                        np.copyto(view.scales, array[1])
                    else:
                        np.copyto(view, array)
        step = group_step[bucket.group][0]
        for slot in bucket.slots:
            bucket.counts.set(slot, step)
    if changed:
        opt._engine.refresh_regions()


def _checked_groups(opt, saved_groups) -> tuple[list[dict], dict[int, int]]:
    """The saved groups' hyperparameters, checked, and saved parameter id -> our index."""
    if not isinstance(saved_groups, (list, tuple)):
        raise TypeError("state_dict['param_groups'] must be a list")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this "
                         f"optimizer has {len(opt.param_groups)}")
    new_hyper = []
    index_of: dict[int, int] = {}
    keys = group_keys(opt)
    for g, saved in enumerate(saved_groups):
        where = f"state_dict['param_groups'][{g}]"
        if not isinstance(saved, Mapping):
            raise TypeError(f"{where} must be a mapping, got {type(saved).__name__}")
        ours_format = opt.param_groups[g].get(STATE_FORMAT, DEFAULT_STATE_FORMAT)
        saved_format = saved.get(STATE_FORMAT, DEFAULT_STATE_FORMAT) \
            if isinstance(saved, Mapping) else None
        # state_format may be absent (float32) or present whatever ours is: a mismatch is
        # named below rather than as a missing or unexpected key.
        _exact_keys(saved, tuple(k for k in keys if k != STATE_FORMAT) + ("params",)
                    + ((STATE_FORMAT,) if STATE_FORMAT in saved else ()), where)
        saved_format = check_state_format(saved_format, where)
        if saved_format != ours_format:
            raise ValueError(f"{where} has state_format {saved_format!r} but this optimizer's "
                             f"group {g} has state_format {ours_format!r}; build the optimizer "
                             f"with state_format={saved_format!r} to load this checkpoint")
        ids = saved["params"]
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"{where}['params'] must be a list of parameter ids")
        ours = opt._group_indices[g]
        if len(ids) != len(ours):
            raise ValueError(f"{where} has {len(ids)} parameters, this optimizer's group {g} "
                             f"has {len(ours)}")
        for saved_id, i in zip(ids, ours):
            if isinstance(saved_id, bool) or not isinstance(saved_id, Integral):
                raise TypeError(f"{where}['params'] must hold integers, got {saved_id!r}")
            if int(saved_id) in index_of:
                raise ValueError(f"parameter id {saved_id} appears twice in state_dict")
            index_of[int(saved_id)] = i
        hyper = {key: saved[key] for key in keys if key != STATE_FORMAT}
        if hyper["lr"] is None:
            hyper["lr"] = opt.param_groups[g]["lr"]
        check_hyperparameters(hyper, where)
        check_precision_options(hyper, where)
        check_master_has_targets(hyper, [p.dtype for p in opt.param_groups[g]["params"]], where)
        new_hyper.append(hyper)
    return new_hyper, index_of


def _saved_names(name: str, blockwise: bool) -> str:
    return f"{name + CODES!r} and {name + SCALES!r}" if blockwise else repr(name)


def _joined_blockwise(entry: Mapping, where: str) -> dict:
    """A blockwise8 entry with each ``name_codes`` / ``name_scales`` pair as one ``name`` key
    holding ``(codes, scales)``; a pair with one half missing is an error."""
    out = {}
    for key, value in entry.items():
        for name in STATE_BUFFERS:
            if key in (name + CODES, name + SCALES):
                other = name + (SCALES if key.endswith(CODES) else CODES)
                if other not in entry:
                    raise ValueError(f"{where} has {key!r} but not {other!r}; a blockwise8 "
                                     f"buffer is saved as both")
                out[name] = (entry[name + CODES], entry[name + SCALES])
                break
        else:
            if key in STATE_BUFFERS:
                raise ValueError(f"{where}[{key!r}] is a dense state array, but this "
                                 f"optimizer's state_format is 'blockwise8' (saved as "
                                 f"{key + CODES!r} and {key + SCALES!r})")
            out[key] = value
    return out


def _check_blockwise_entry(pair, name: str, param, where: str, own_buffers: list):
    """(codes, scales) of one saved blockwise8 buffer, checked against its parameter."""
    codes, scales = pair
    n = param.size
    for part, array, dtype, size in ((CODES, codes, np.uint8, n),
                                     (SCALES, scales, np.float32, block_count(n))):
        label = f"{where}[{name + part!r}]"
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{label} must be a numpy.ndarray, got {type(array).__name__}")
        if array.dtype != dtype or array.ndim != 1:
            raise TypeError(f"{label} must be a 1-D {np.dtype(dtype)} array, got a "
                            f"{array.ndim}-D {array.dtype} array")
        if array.size != size:
            if part == CODES:
                raise ValueError(f"{label} has {array.size} codes but its parameter has {n} "
                                 f"elements")
            raise ValueError(f"{label} has {array.size} scales but blockwise8 keeps one per "
                             f"block of {BLOCK} elements: {size} for {n} elements (a "
                             f"checkpoint of another block size does not fit)")
    bad = ~(scales >= 0) | ~np.isfinite(scales)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"{where}[{name + SCALES!r}][{k}] is {scales[k]}: scales must be "
                         f"finite and >= 0")
    out = []
    for array in (codes, scales):
        if any(np.may_share_memory(array, buffer) for buffer in own_buffers):
            array = array.copy()
        out.append(array)
    return tuple(out)


def _as_builtin(value, where: str):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, Real):
        return float(value)
    raise TypeError(f"{where} is a {type(value).__name__}; state_dict can store only numbers "
                    f"and bools (and a callable lr, saved as None)")


def _exact_keys(mapping: Mapping, expected: tuple, where: str) -> None:
    keys = set(mapping)
    if keys != set(expected):
        missing = sorted(set(expected) - keys)
        extra = sorted(map(repr, keys - set(expected)))
        raise ValueError(f"{where} does not fit: missing keys {missing}, unexpected keys {extra}")


def _check_step(step, where: str) -> int:
    """An exact non-negative step count that np.savez stores as int64 (so below 2**63)."""
    if isinstance(step, np.ndarray) and step.ndim == 0:
        step = step.item()
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, Real):
        raise TypeError(f"{where}['step'] must be a number, got {type(step).__name__}")
    if isinstance(step, Integral):
        value = operator.index(step)  # exact: no trip through float
    else:
        try:
            as_float = float(step)
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ValueError(f"{where}['step'] must be a finite non-negative integer, "
                             f"got {step!r}")
        value = int(as_float)
    if not 0 <= value < _STEP_LIMIT:
        raise ValueError(f"{where}['step'] must be an integer in [0, 2**63), got {step!r}")
    return value


def _check_state_array(array, param, dtype, where: str, own_buffers: list):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != dtype:
        if dtype != param.dtype:
            raise TypeError(f"{where} has dtype {array.dtype} but the state of a "
                            f"{param.dtype} parameter is {dtype}")
        raise TypeError(f"{where} has dtype {array.dtype} but its parameter has dtype "
                        f"{param.dtype}")
    if array.shape != param.shape:
        raise ValueError(f"{where} has shape {array.shape} but its parameter has shape "
                         f"{param.shape}")
    # Loading arrays that alias this optimizer's own buffers (its live views, say) must not
    # read what an earlier copy already overwrote.
    for buffer in own_buffers:
        if np.may_share_memory(array, buffer):
            return array.copy()
    return array


# -- state_dict <-> flat arrays (np.savez) -----------------------------------------------------

def state_dict_to_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Flatten :meth:`RMSprop.state_dict` into ``{name: ndarray}`` for ``np.savez``.

    Layout: ``"state/<id>/<key>"`` holds a state array, or the step as a 0-d int64 array;
    ``"param_groups/<g>/params"`` is a 1-d int64 array of ids; ``"param_groups/<g>/<key>"`` is a
    0-d array for a hyperparameter (float64 or bool), or an empty float64 array of shape (0,)
    for ``None`` (a callable lr). Nothing needs pickle. :func:`state_dict_from_arrays` inverts it.

    Example:
        >>> import io, numpy as np, fastrms
        >>> opt = fastrms.RMSprop([np.ones(3)], lr=0.1)
        >>> _ = opt.step([np.ones(3)])
        >>> file = io.BytesIO()
        >>> np.savez(file, **fastrms.state_dict_to_arrays(opt.state_dict()))
        >>> _ = file.seek(0)
        >>> with np.load(file, allow_pickle=False) as saved:
        ...     opt.load_state_dict(fastrms.state_dict_from_arrays(saved))
        >>> opt.state[0]["step"]
        1
    """
    out: dict[str, np.ndarray] = {}
    for g, group in enumerate(state_dict["param_groups"]):
        for key, value in group.items():
            name = f"param_groups/{g}/{key}"
            if key == "params":
                out[name] = np.asarray(list(value), dtype=np.int64).reshape(-1)
            elif value is None:
                out[name] = np.empty(0, np.float64)
            else:
                out[name] = np.asarray(value)
    for i, entry in state_dict["state"].items():
        for key, value in entry.items():
            out[f"state/{int(i)}/{key}"] = np.asarray(value)
    return out


def state_dict_from_arrays(arrays: Mapping) -> dict:
    """Rebuild a state dict from :func:`state_dict_to_arrays`'s mapping (for instance the
    ``NpzFile`` of ``np.load(path, allow_pickle=False)``); arrays are read into memory."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"state_dict_from_arrays needs a mapping of names to arrays (the NpzFile "
                        f"of np.load on a file written with np.savez), got "
                        f"{type(arrays).__name__}")
    groups: dict[int, dict] = {}
    state: dict[int, dict] = {}
    for name in arrays.keys():
        if not isinstance(name, str):
            raise TypeError(f"state_dict_from_arrays: keys must be strings, got {name!r}")
        parts = name.split("/")
        if len(parts) != 3 or parts[0] not in ("state", "param_groups") or not parts[1].isdigit():
            raise ValueError(f"unexpected key {name!r}; expected 'state/<id>/<key>' or "
                             f"'param_groups/<index>/<key>'")
        section, index, key = parts[0], int(parts[1]), parts[2]
        value = np.asarray(arrays[name])
        if section == "state" and value.dtype == _VOID2:
            value = value.view(BFLOAT16)  # np.savez writes bfloat16 as 2-byte void
        if section == "state":
            if key == "step" and value.ndim == 0:
                value = value.item()
            state.setdefault(index, {})[key] = value
        elif key == "params":
            if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
                raise ValueError(f"{name!r} must be a 1-d integer array")
            groups.setdefault(index, {})[key] = [int(x) for x in value.tolist()]
        elif value.shape == (0,):
            groups.setdefault(index, {})[key] = None
        elif value.ndim == 0:
            groups.setdefault(index, {})[key] = value.item()
        else:
            raise ValueError(f"{name!r} must be a 0-d array (or shape (0,) for None), "
                             f"got shape {value.shape}")
    if sorted(groups) != list(range(len(groups))):
        raise ValueError(f"parameter groups must be numbered 0..n-1, got {sorted(groups)}")
    return {"state": dict(sorted(state.items())),
            "param_groups": [groups[g] for g in range(len(groups))]}
