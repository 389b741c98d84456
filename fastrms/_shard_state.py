"""Checkpoints of :class:`fastrms.distributed.ShardedRMSprop`: the two state-dict forms, checked
before anything is written, and their ``np.savez`` layout. Pure Python, no MPI.

- The *full* form is exactly what ``fastrms.RMSprop(flat).state_dict()`` gives for the same
  :class:`fastrms.FlatParams`: one entry per array, shaped like it. Any number of ranks loads
  it (each keeps its slice): this is how a run moves from N to M ranks.
- The *shard* form is what one rank saves: the state dict of its shard in the same layout (one
  entry per dtype, the shard's elements), plus ``"shard"``, which says which world size, rank
  and shard bounds it belongs to. Only that rank of a run cut the same way loads it.

Both are checked by the same function and turned into the shard form, which
:func:`fastrms.checkpoint.load_state_dict` then loads into the rank's engine buckets; the
checks are :mod:`fastrms.checkpoint`'s and the engine's own (hyperparameters, steps, keys), so a
state dict means the same thing to both optimizers.
"""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral

import numpy as np

from .checkpoint import (_ENTRY_KEYS, _STATE_NAMES, _as_builtin, _check_step, _exact_keys,
                         state_dict_from_arrays as _plain_from_arrays,
                         state_dict_to_arrays as _plain_to_arrays)
from .engine import HYPERPARAMETERS, OPTIONAL_BUFFERS, check_hyperparameters
from .engine.compact import STATE_FORMAT
from .engine.precision import MASTER, PRECISION_OPTIONS
from ._codecs import FLOAT32

#: Group keys kept as they are saved (checked by fastrms.checkpoint.load_state_dict).
_PASSED_THROUGH = PRECISION_OPTIONS + (STATE_FORMAT,)

SHARD_KEYS = ("world_size", "rank", "dtypes", "sizes", "bounds")


def shard_description(world: int, rank: int, dtypes, sizes, bounds) -> dict:
    """The ``"shard"`` entry of a shard-form state dict (builtins only)."""
    return {"world_size": int(world), "rank": int(rank), "dtypes": [str(d) for d in dtypes],
            "sizes": [int(n) for n in sizes], "bounds": [[int(lo), int(hi)] for lo, hi in bounds]}


def full_state_dict(hyper: dict, step: int, layout, dtypes, buffers: list[dict]) -> dict:
    """The unsharded optimizer's state dict from whole per-dtype state buffers
    (``buffers[d][name]``, absent names omitted), cut per array as ``layout`` says."""
    state = {}
    for i, (dtype, offset, size, shape) in enumerate(layout):
        whole = buffers[dtypes.index(dtype)]
        entry = {"step": step}
        for name in _STATE_NAMES:
            if name in whole:
                entry[name] = whole[name][offset:offset + size].reshape(shape)
        state[i] = entry
    return {"state": state, "param_groups": [{**hyper, "params": list(range(len(layout)))}]}


def checked_shard_form(state_dict, *, layout, dtypes, bounds, shard: dict, current_lr,
                       always_momentum: bool, state_dtypes=None,
                       group_keys=HYPERPARAMETERS) -> tuple[dict, dict]:
    """Check ``state_dict`` (either form) against this rank and return ``(loadable, summary)``.
    ``state_dtypes[d]``: the state's dtype for parameters of ``dtypes[d]`` (default the same;
    float32 for float16 / bfloat16). ``group_keys``: the keys of the saved group.

    ``loadable`` is the shard form :func:`fastrms.checkpoint.load_state_dict` loads (new arrays, or the given
    ones where they are already the shard's); ``summary`` holds what every rank must agree on
    (step, hyperparameters, which buffers). Raises ``TypeError`` / ``ValueError`` naming the
    offending entry; nothing is written here.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    state_dtypes = list(dtypes if state_dtypes is None else state_dtypes)
    if "shard" in state_dict:
        _exact_keys(state_dict, ("state", "param_groups", "shard"), "state_dict")
        _check_shard(state_dict["shard"], shard)
        expected = [(state_dtype, (hi - lo,)) for state_dtype, (lo, hi) in
                    zip(state_dtypes, bounds)]
        kinds = list(range(len(dtypes)))
    else:
        _exact_keys(state_dict, ("state", "param_groups"), "state_dict")
        kinds = [dtypes.index(dtype) for dtype, _, _, _ in layout]
        expected = [(state_dtypes[kind], shape) for kind, (_, _, _, shape) in
                    zip(kinds, layout)]
    hyper, step, arrays = _checked_entries(state_dict, expected, kinds, current_lr,
                                           always_momentum, group_keys)
    if "shard" in state_dict:
        pieces = arrays
    else:
        pieces = [_slice_of(arrays, layout, dtype, state_dtype, lo, hi)
                  for dtype, state_dtype, (lo, hi) in zip(dtypes, state_dtypes, bounds)]
    loadable = {"state": {d: {"step": step, **piece} for d, piece in enumerate(pieces)},
                "param_groups": [{**hyper, "params": list(range(len(dtypes)))}]}
    summary = {"step": step, "hyperparameters": hyper,
               "buffers": [sorted(piece) for piece in pieces]}
    return loadable, summary


def _check_shard(saved, ours: dict) -> None:
    where = "state_dict['shard']"
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(saved).__name__}")
    _exact_keys(saved, SHARD_KEYS, where)
    try:
        found = {"world_size": _integer(saved["world_size"]), "rank": _integer(saved["rank"]),
                 "dtypes": [str(d) for d in saved["dtypes"]],
                 "sizes": [_integer(n) for n in saved["sizes"]],
                 "bounds": [[_integer(lo), _integer(hi)] for lo, hi in saved["bounds"]]}
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} is malformed ({exc}); it is what ShardedRMSprop.state_dict() "
                        f"writes") from None
    if found["world_size"] != ours["world_size"]:
        raise ValueError(f"{where}['world_size'] is {found['world_size']}, but this run has "
                         f"{ours['world_size']} ranks; a shard-form state dict loads only into "
                         f"the same world size (load the consolidated_state_dict() form to move "
                         f"between world sizes)")
    if found["rank"] != ours["rank"]:
        raise ValueError(f"{where}['rank'] is {found['rank']}, but this is rank {ours['rank']}; "
                         f"each rank loads the state dict it saved")
    for key in ("dtypes", "sizes", "bounds"):
        if found[key] != ours[key]:
            raise ValueError(f"{where}[{key!r}] is {found[key]}, this optimizer's is {ours[key]}: "
                             f"the state dict belongs to other parameters")


def _integer(value) -> int:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _checked_entries(state_dict, expected, kinds, current_lr, always_momentum,
                     group_keys=HYPERPARAMETERS):
    """The checks of ``RMSprop.load_state_dict``, for a single group whose entries should be
    arrays of ``expected[k] = (dtype, shape)``; optional buffers present alike within each kind
    (dtype). Returns the saved hyperparameters, the step and one dict of arrays per entry."""
    groups = state_dict["param_groups"]
    if not isinstance(groups, (list, tuple)):
        raise TypeError("state_dict['param_groups'] must be a list")
    if len(groups) != 1:
        raise ValueError(f"state_dict has {len(groups)} parameter groups; an optimizer over a "
                         f"FlatParams has 1")
    where = "state_dict['param_groups'][0]"
    saved = groups[0]
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(saved).__name__}")
    _exact_keys(saved, tuple(group_keys) + ("params",), where)
    ids = saved["params"]
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{where}['params'] must be a list of parameter ids")
    if len(ids) != len(expected):
        raise ValueError(f"{where} has {len(ids)} parameters, this optimizer expects "
                         f"{len(expected)} here")
    for saved_id in ids:
        if isinstance(saved_id, bool) or not isinstance(saved_id, Integral):
            raise TypeError(f"{where}['params'] must hold integers, got {saved_id!r}")
    ids = [int(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}['params'] names a parameter id twice")
    hyper = {key: saved[key] for key in HYPERPARAMETERS}
    checked = dict(hyper)
    if checked["lr"] is None:
        checked["lr"] = current_lr
    check_hyperparameters(checked, where)
    hyper = {key: None if key == "lr" and value is None else _as_builtin(value, f"{where}[{key!r}]")
             for key, value in hyper.items()}
    # The 16-bit options as saved: fastrms.checkpoint.load_state_dict checks them.
    hyper.update((key, saved[key]) for key in group_keys if key in _PASSED_THROUGH)
    required = {"momentum_buffer": checked["momentum"] != 0 or always_momentum,
                "grad_avg": bool(checked["centered"])}

    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise TypeError("state_dict['state'] must be a mapping from parameter id to state")
    by_id = {int(k) if isinstance(k, Integral) and not isinstance(k, bool) else k: v
             for k, v in saved_state.items()}
    if set(by_id) != set(ids):
        missing = sorted(set(ids) - set(by_id), key=repr)
        extra = sorted(set(by_id) - set(ids), key=repr)
        raise ValueError(f"state_dict['state'] does not fit: missing ids {missing}, unexpected "
                         f"ids {extra}")
    step = None
    present: dict[tuple[int, str], bool] = {}
    arrays = []
    for k, (saved_id, (dtype, shape), kind) in enumerate(zip(ids, expected, kinds)):
        where = f"state_dict['state'][{saved_id}]"
        entry = by_id[saved_id]
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a mapping, got {type(entry).__name__}")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"{where} has unexpected keys {sorted(map(repr, unknown))}")
        for name in ("step", "square_avg"):
            if name not in entry:
                raise ValueError(f"{where} is missing {name!r}")
        this_step = _check_step(entry["step"], where)
        if step is None:
            step, first = this_step, saved_id
        elif this_step != step:
            raise ValueError(f"{where} has step {this_step} but state_dict['state'][{first}] "
                             f"has step {step}; the optimizer steps all parameters together")
        for name in OPTIONAL_BUFFERS:
            has = name in entry
            if required[name] and not has:
                raise ValueError(f"{where} is missing {name!r}, which the saved "
                                 f"hyperparameters need")
            if present.setdefault((kind, name), has) != has:
                raise ValueError(f"{where}: {name!r} is present for some parameters of its "
                                 f"dtype but not others")
        found = {}
        for name in _STATE_NAMES:
            if name in entry:
                found[name] = _checked_array(entry[name], FLOAT32 if name == MASTER else dtype,
                                             shape, f"{where}[{name!r}]")
        arrays.append(found)
    return hyper, step, arrays


def _checked_array(array, dtype, shape, where: str):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != dtype:
        raise TypeError(f"{where} has dtype {array.dtype} but this optimizer keeps it in "
                        f"{dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"{where} has shape {array.shape} but its parameter has shape "
                         f"{tuple(shape)}")
    return array


def _slice_of(arrays, layout, dtype, state_dtype, lo: int, hi: int) -> dict:
    """Elements [lo, hi) of the dtype's flat state (of ``state_dtype``), cut out of the full
    form's per-array entries."""
    members = [i for i, entry in enumerate(layout) if entry[0] == dtype]  # never empty
    names = [name for name in _STATE_NAMES if name in arrays[members[0]]]
    out = {name: np.empty(hi - lo, FLOAT32 if name == MASTER else state_dtype)
           for name in names}
    for i in members:
        _, offset, size, _ = layout[i]
        start, stop = max(lo, offset), min(hi, offset + size)
        if start < stop:
            for name in names:
                out[name][start - lo:stop - lo] = np.ravel(arrays[i][name])[start - offset:
                                                                            stop - offset]
    return out


# -- np.savez ---------------------------------------------------------------------------------

def state_dict_to_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
    """:func:`fastrms.state_dict_to_arrays`, plus ``"shard/<key>"`` arrays for the shard
    form's ``"shard"`` entry; :func:`state_dict_from_arrays` inverts it. Nothing needs pickle."""
    plain = {key: state_dict[key] for key in ("state", "param_groups")}
    out = _plain_to_arrays(plain)
    shard = state_dict.get("shard")
    if shard is not None:
        out["shard/world_size"] = np.asarray(shard["world_size"], np.int64)
        out["shard/rank"] = np.asarray(shard["rank"], np.int64)
        out["shard/dtypes"] = np.asarray(list(shard["dtypes"]), dtype=np.str_)
        out["shard/sizes"] = np.asarray(list(shard["sizes"]), np.int64).reshape(-1)
        out["shard/bounds"] = np.asarray(list(shard["bounds"]), np.int64).reshape(-1, 2)
    return out


def state_dict_from_arrays(arrays: Mapping) -> dict:
    """Rebuild either form from :func:`state_dict_to_arrays`'s mapping (an ``NpzFile``, say)."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"state_dict_from_arrays needs a mapping of names to arrays, got "
                        f"{type(arrays).__name__}")
    names = list(arrays.keys())
    shard_names = [n for n in names if isinstance(n, str) and n.startswith("shard/")]
    state_dict = _plain_from_arrays({n: arrays[n] for n in names if n not in shard_names})
    if shard_names:
        found = {n[len("shard/"):]: np.asarray(arrays[n]) for n in shard_names}
        if set(found) != set(SHARD_KEYS):
            raise ValueError(f"the 'shard/...' arrays are {sorted(found)}; expected "
                             f"{sorted(SHARD_KEYS)}")
        state_dict["shard"] = {"world_size": int(found["world_size"]),
                               "rank": int(found["rank"]),
                               "dtypes": [str(d) for d in found["dtypes"].tolist()],
                               "sizes": [int(n) for n in found["sizes"].tolist()],
                               "bounds": [[int(lo), int(hi)] for lo, hi in
                                          found["bounds"].reshape(-1, 2).tolist()]}
    return state_dict
