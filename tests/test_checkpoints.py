"""Hostile checkpoints: truncated, mismatched or tampered state dicts and ``.npz`` files.

The contract (``RMSprop.load_state_dict``'s docstring): a state dict that does not fit raises
``TypeError`` / ``ValueError`` whose message names the offending entry, and leaves the optimizer
exactly as it was, because everything is checked before the first write. Files are read with
``np.load(path, allow_pickle=False)``, so loading never executes code from the file.

Every test here checks "exactly as it was" three ways:

- a snapshot of every parameter's and state buffer's bytes, dtype and shape, which buffers exist
  (per (group, dtype) bucket, via ``flat_state()``), the step counts, every group's
  hyperparameters and keys, and the identity of every parameter array;
- the same snapshot again after the failed load (any partial write would show);
- one more ``step()`` on the victim and on an untouched twin (built and trained the same way,
  never offered a bad checkpoint), which must give the same bits: this catches damage to state
  the snapshot cannot see (backend caches, the memory regions ``step()`` checks gradients
  against, per-group step counters).

The donor checkpoint differs from the victim in everything a partial load could write: other
parameter and state values, other step counts, other hyperparameters, a momentum buffer the
victim does not have (loading allocates it) and no ``grad_avg`` where the victim has one
(loading drops it). Every parameter has its own (shape, dtype), so any relabelling of parameter
ids is detectable.

Not repeated here: the bit-for-bit resume through ``state_dict_to_arrays`` / ``np.savez`` /
``state_dict_from_arrays`` and through pickle (tests/test_optimizer.py::
test_resume_is_bit_identical), and the first catalogue of bad dicts on a one-group optimizer
(tests/test_optimizer.py::test_bad_state_dicts_rejected_and_optimizer_unchanged). This file
generalises the latter to every level of the dict, several groups, mixed dtypes, FlatParams,
Hypothesis-drawn tamperings, and files.

Hypothesis runs with ``derandomize=True`` and no database, so every run draws the same examples.
"""
from __future__ import annotations

import copy
import functools
import io
import lzma
import math
import pickle
import zipfile
import zlib
from typing import Callable, NamedTuple

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, example, given, settings
from hypothesis import event as _hypothesis_event

from fastrms import presets
from fastrms.flat import FlatParams
from fastrms.optimizer import (HYPERPARAMETERS, RMSprop, state_dict_from_arrays,
                               state_dict_to_arrays)

SETTINGS = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                    suppress_health_check=list(HealthCheck))
#: Examples per Hypothesis test (per backend where the test takes the ``backend`` fixture).
EXAMPLES_DICT = 300
EXAMPLES_LAST = 150
EXAMPLES_FLAT = 150
EXAMPLES_FILE = 250
EXAMPLES_STEP = 60

F4, F8 = np.dtype(np.float32), np.dtype(np.float64)
BUFFERS = ("square_avg", "momentum_buffer", "grad_avg")
OPTIONAL = ("momentum_buffer", "grad_avg")
FLAGS = ("centered", "maximize", "eps_in_sqrt", "lr_in_momentum", "nesterov",
         "decoupled_weight_decay")
#: What the zip / .npy layer may raise for a corrupt file (numpy and zipfile's own errors).
#: A flipped byte in a zip header can also change a member's compression method (stored ->
#: deflate, lzma, or an unsupported one: zlib.error, LZMAError, NotImplementedError, or OSError
#: "Invalid data stream"), the version needed (NotImplementedError) or set its "encrypted" flag
#: (RuntimeError: "password required"). All are clean refusals by the zip layer.
FILE_ERRORS = (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile,
               zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError)
DICT_ERRORS = (TypeError, ValueError)


def event(value: str) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics); a no-op outside a Hypothesis test."""
    if currently_in_test_context():
        _hypothesis_event(value)


# ---------------------------------------------------------------------------------------------
# scenarios: a victim optimizer, an untouched twin, a donor checkpoint


class Scenario(NamedTuple):
    name: str
    #: per group: [(shape, dtype)]; one group and ``flat=True`` for a FlatParams optimizer.
    specs: tuple
    victim_options: tuple
    donor_options: tuple
    flat: bool
    preset: str | None = None


LIST = Scenario(
    "list",
    specs=(
        (((4, 3), F8), ((5,), F4), ((2, 2, 2), F8)),
        (((3, 1), F4), ((6,), F8)),
        (((2, 3), F4), ((7,), F8), ((0,), F4)),
        (((), F8), ((8,), F4), ((1, 5), F8)),
    ),
    victim_options=(
        dict(momentum=0.9, centered=True),
        dict(lr=1e-3, weight_decay=0.01),
        dict(centered=True, eps_in_sqrt=True),
        dict(momentum=0.5, nesterov=True, alpha=0.9),
    ),
    # Same parameters; different everything else. Group 1 gains a momentum buffer, group 2
    # loses its grad_avg.
    donor_options=(
        dict(momentum=0.9, centered=True, lr=5e-3),
        dict(lr=2e-3, weight_decay=0.02, momentum=0.3),
        dict(eps_in_sqrt=True, eps=1e-6),
        dict(momentum=0.5, nesterov=True, alpha=0.95, maximize=True),
    ),
    flat=False,
)

FLAT = Scenario(
    "flat",
    specs=((((4, 3), F4), ((5,), F8), ((2, 2, 2), F4), ((), F8), ((6,), F4), ((0,), F8),
            ((3, 2), F8)),),
    victim_options=(dict(momentum=0.9, centered=True),),
    donor_options=(dict(momentum=0.7, lr=3e-3, alpha=0.95, weight_decay=0.01),),
    flat=True,
)


class Trained(NamedTuple):
    opt: RMSprop
    params: list
    step: Callable[[int], None]  # one step with the gradients of a seed


def _initial_arrays(scenario: Scenario, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(shape), dtype)
            for group in scenario.specs for shape, dtype in group]


def build(scenario: Scenario, options, backend=None, steps=2, seed=0) -> Trained:
    arrays = _initial_arrays(scenario, seed)
    if scenario.flat:
        flat = FlatParams(arrays)
        opt = RMSprop(flat, backend=backend, preset=scenario.preset, **{"lr": 1e-2, **options[0]})
        params = list(flat.params)

        def step(grad_seed):
            for view, grad in zip(flat.grads, _grads(params, grad_seed)):
                view[...] = grad
            opt.step()
    else:
        params, groups, start = arrays, [], 0
        for spec, group_options in zip(scenario.specs, options):
            groups.append({"params": params[start:start + len(spec)], **group_options})
            start += len(spec)
        opt = RMSprop(groups, lr=1e-2, backend=backend, preset=scenario.preset)

        def step(grad_seed):
            opt.step(_grads(params, grad_seed))
    for k in range(steps):
        step(1000 * seed + k)
    return Trained(opt, params, step)


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(p.shape), p.dtype) for p in params]


def victim(scenario, backend=None) -> Trained:
    return build(scenario, scenario.victim_options, backend, steps=2, seed=1)


_DONORS: dict = {}
_LAYOUTS: dict = {}


def _donor_state_dict(scenario: Scenario) -> dict:
    """The donor's state dict (shared: never mutate it; valid_state_dict gives copies)."""
    if scenario.name not in _DONORS:
        _DONORS[scenario.name] = build(scenario, scenario.donor_options, steps=3,
                                       seed=2).opt.state_dict()
    return _DONORS[scenario.name]


def valid_state_dict(scenario: Scenario) -> dict:
    """A fresh deep copy of the donor's (valid) state dict."""
    return copy.deepcopy(_donor_state_dict(scenario))


def _array_key(a):
    return (a.dtype.str, a.shape, a.tobytes())


def snapshot(trained: Trained, identities=True):
    """Everything load_state_dict could write, as comparable values (see the module docstring)."""
    opt = trained.opt
    groups = []
    for group in opt.param_groups:
        entry = [("keys", tuple(sorted(group)))]
        entry += [(k, type(group[k]).__name__, repr(group[k])) for k in HYPERPARAMETERS]
        if identities:
            entry.append(("params", tuple(id(p) for p in group["params"])))
        groups.append(tuple(entry))
    state = [tuple(sorted((name, value if name == "step" else _array_key(value))
                          for name, value in entry.items()))
             for entry in opt.state]
    buckets = [(b["group"], str(b["dtype"]), tuple(b["params"]),
                tuple(name for name in BUFFERS if b[name] is not None))
               for b in opt.flat_state()]
    params = [_array_key(p) for p in trained.params]
    if identities:
        params.append(tuple(id(p) for p in trained.params))
    return tuple(groups), tuple(state), tuple(buckets), tuple(params)


def assert_twin_steps_alike(trained: Trained, twin: Trained, seed: int, label) -> None:
    """One more step on both must give the same bits (and the same everything else)."""
    trained.step(seed)
    twin.step(seed)
    assert snapshot(trained, False) == snapshot(twin, False), (
        f"{label}: after the rejected load, a step no longer matches an untouched twin's")


# ---------------------------------------------------------------------------------------------
# the layout a tampering needs to know


class Layout(NamedTuple):
    group_ids: tuple          # per group: the saved parameter ids
    buckets: tuple            # (group, ids) per (group, dtype) bucket, in processing order
    group_of: dict            # id -> group
    bucket_of: dict           # id -> ids of its bucket
    required: tuple           # per group: {"momentum_buffer": bool, "grad_avg": bool}
    last_group: int
    last_id: int              # the state entry load_state_dict checks last
    donor_state: dict         # id -> the donor's state entry (read only)


def layout(scenario: Scenario) -> Layout:
    if scenario.name not in _LAYOUTS:
        _LAYOUTS[scenario.name] = _make_layout(scenario)
    return _LAYOUTS[scenario.name]


def _make_layout(scenario: Scenario) -> Layout:
    valid = _donor_state_dict(scenario)
    group_ids = tuple(tuple(g["params"]) for g in valid["param_groups"])
    probe = build(scenario, scenario.victim_options, steps=0)
    buckets = tuple((b["group"], tuple(b["params"])) for b in probe.opt.flat_state())
    always = presets.get(scenario.preset).always_momentum_buffer
    required = tuple({"momentum_buffer": g["momentum"] != 0 or always,
                      "grad_avg": bool(g["centered"])} for g in valid["param_groups"])
    # The victim's indices are the donor's ids (same parameters in the same order).
    assert [i for ids in group_ids for i in ids] == list(range(len(probe.params)))
    return Layout(group_ids, buckets,
                  {i: g for g, ids in enumerate(group_ids) for i in ids},
                  {i: ids for _, ids in buckets for i in ids},
                  required, len(group_ids) - 1, buckets[-1][1][-1], valid["state"])


# ---------------------------------------------------------------------------------------------
# tamperings


class Tamper(NamedTuple):
    label: str
    mutate: Callable[[dict], None]
    #: Alternatives; the error message must contain every fragment of at least one of them.
    expect: tuple


class _Opaque:
    """An arbitrary object (no numeric, array or mapping protocol)."""

    def __repr__(self):
        return "<opaque>"


OPAQUE = _Opaque()
NAN, INF = math.nan, math.inf

BAD_NUMBERS = (
    ("str", "0.1"), ("bytes", b"0.1"), ("None", None), ("list", [0.1]), ("dict", {"v": 0.1}),
    ("object", OPAQUE), ("bool", True), ("complex", 0.1 + 0j), ("array-1d", np.array([0.1])),
    ("nan", NAN), ("inf", INF), ("-inf", -INF), ("negative", -0.5), ("beyond-float", 10**400),
)
BAD_ALPHAS = (("one", 1.0), ("above-one", 1.5), ("numpy-one", np.float64(1.0)))
BAD_FLAGS = (
    ("int-0", 0), ("int-1", 1), ("float", 1.0), ("str", "True"), ("None", None),
    ("list", [True]), ("object", OPAQUE), ("array-1d", np.array([True])),
)
BAD_STEPS = (
    ("fraction", 2.5), ("negative", -1), ("negative-float", -3.0), ("nan", NAN), ("inf", INF),
    ("-inf", -INF), ("True", True), ("False", False), ("numpy-bool", np.True_), ("None", None),
    ("str", "3"), ("bytes", b"3"), ("list", [3]), ("dict", {}), ("object", OPAQUE),
    ("beyond-float", 10**400), ("complex", 3 + 0j), ("array-1d", np.array([3])),
    ("array-0d-fraction", np.array(2.5)), ("array-0d-negative", np.array(-1)),
    ("numpy-nan", np.float64("nan")),
)


def bad_array_candidates(ref: np.ndarray) -> list:
    """(label, value) replacements for a state array: anything but an array of its shape and
    dtype."""
    out = [("str", "x"), ("None", None), ("list", ref.tolist()), ("object", OPAQUE),
           ("dict", {"data": ref}), ("float", 1.0), ("numpy-scalar", ref.dtype.type(1)),
           ("shape-tuple", ref.shape)]
    for dtype in (np.float16, np.int32, np.int64, np.complex64, np.complex128, np.bool_,
                  np.longdouble, "S8", "U4", F4, F8, ref.dtype.newbyteorder(">")):
        dtype = np.dtype(dtype)
        if dtype != ref.dtype:
            out.append((f"dtype-{dtype.str}", np.zeros(ref.shape, dtype)))
    objects = np.empty(ref.shape, object)
    objects[...] = 0.5
    out.append(("dtype-object", objects))
    shapes = [ref.shape + (1,), (1,) + ref.shape, (ref.size + 1,)]
    shapes.append((-1,) if ref.ndim != 1 else (1, -1))
    if ref.ndim:
        shapes += [(), ref.shape[:-1] + (ref.shape[-1] + 1,)]
    if ref.ndim and ref.shape[0]:
        shapes.append((ref.shape[0] - 1,) + ref.shape[1:])
    if ref.ndim >= 2 and ref.shape != ref.shape[::-1]:
        shapes.append(ref.shape[::-1])
    for shape in shapes:
        value = (ref.reshape(shape) if -1 in shape else np.zeros(shape, ref.dtype))
        if value.shape != ref.shape:
            out.append((f"shape-{value.shape}", value))
    return out


def _group_where(g):
    return f"state_dict['param_groups'][{g}]"


def _state_where(i):
    return f"state_dict['state'][{i}]"


def _sample(draw, items, label):
    """Draw one (name, value) pair from a list of them."""
    return draw(st.sampled_from(items), label=label)


# Each factory: (draw, layout, site) -> Tamper. site: "any", or "last" (the last group / the
# last state entry load_state_dict examines).

def _pick_group(draw, lay, site):
    if site == "last":
        return lay.last_group
    return draw(st.sampled_from(range(len(lay.group_ids))), label="group")


def _pick_id(draw, lay, site):
    if site == "last":
        return lay.last_id
    return draw(st.sampled_from(sorted(lay.group_of)), label="id")


def t_drop_group_key(draw, lay, site):
    g = _pick_group(draw, lay, site)
    key = draw(st.sampled_from(HYPERPARAMETERS + ("params",)), label="key")

    def mutate(d):
        del d["param_groups"][g][key]
    return Tamper(f"group {g}: drop {key!r}", mutate, ((_group_where(g), "missing", key),))


def t_extra_group_key(draw, lay, site):
    g = _pick_group(draw, lay, site)
    key = draw(st.sampled_from(["betas", "step", "momentum_buffer", "Lr", "lr ", 0, None]),
               label="key")

    def mutate(d):
        d["param_groups"][g][key] = 0.1
    return Tamper(f"group {g}: extra key {key!r}", mutate,
                  ((_group_where(g), "unexpected", repr(key)),))


def t_bad_hyperparameter(draw, lay, site):
    g = _pick_group(draw, lay, site)
    key = draw(st.sampled_from(HYPERPARAMETERS), label="key")
    if key in FLAGS:
        pool = BAD_FLAGS
    else:
        pool = BAD_NUMBERS + (BAD_ALPHAS if key == "alpha" else ())
        if key == "lr":  # None is a saved callable lr: valid
            pool = tuple(p for p in pool if p[1] is not None)
    name, value = _sample(draw, pool, "value")

    def mutate(d):
        d["param_groups"][g][key] = value
    return Tamper(f"group {g}: {key} = {name}", mutate, ((_group_where(g), key),))


def t_nesterov_without_momentum(draw, lay, site):
    g = _pick_group(draw, lay, site)

    def mutate(d):
        d["param_groups"][g].update(momentum=0.0, nesterov=True)
    return Tamper(f"group {g}: nesterov without momentum", mutate,
                  ((_group_where(g), "nesterov"),))


def t_group_not_mapping(draw, lay, site):
    g = _pick_group(draw, lay, site)
    name = draw(st.sampled_from(["items", "None", "str", "int", "empty-list"]), label="as")

    def mutate(d):
        group = d["param_groups"][g]
        d["param_groups"][g] = {"items": list(group.items()), "None": None, "str": "group",
                                "int": 42, "empty-list": []}[name]
    return Tamper(f"group {g} as {name}", mutate, ((_group_where(g), "mapping"),))


def t_ids_not_a_list(draw, lay, site):
    g = _pick_group(draw, lay, site)
    name = draw(st.sampled_from(["None", "str", "array", "set", "dict", "int"]), label="as")

    def mutate(d):
        ids = d["param_groups"][g]["params"]
        d["param_groups"][g]["params"] = {
            "None": None, "str": ",".join(map(str, ids)), "array": np.array(ids),
            "set": set(ids), "dict": {i: i for i in ids}, "int": ids[0]}[name]
    return Tamper(f"group {g}: params as {name}", mutate,
                  ((_group_where(g) + "['params']",),))


def t_ids_count(draw, lay, site):
    g = _pick_group(draw, lay, site)
    how = draw(st.sampled_from(["drop-first", "drop-last", "append-new", "empty"]), label="how")

    def mutate(d):
        ids = d["param_groups"][g]["params"]
        d["param_groups"][g]["params"] = {"drop-first": ids[1:], "drop-last": ids[:-1],
                                          "append-new": ids + [100], "empty": []}[how]
    return Tamper(f"group {g}: ids {how}", mutate, ((_group_where(g), "parameters"),))


def t_id_bad_type(draw, lay, site):
    g = _pick_group(draw, lay, site)
    k = draw(st.integers(0, len(lay.group_ids[g]) - 1), label="position")
    name = draw(st.sampled_from(["str", "float", "None", "True", "False", "list",
                                 "numpy-float", "numpy-bool", "complex"]), label="as")

    def mutate(d):
        ids = d["param_groups"][g]["params"]
        i = ids[k]
        ids[k] = {"str": str(i), "float": float(i), "None": None, "True": True, "False": False,
                  "list": [i], "numpy-float": np.float64(i), "numpy-bool": np.True_,
                  "complex": complex(i)}[name]
    return Tamper(f"group {g}: id {k} as {name}", mutate,
                  ((_group_where(g) + "['params']", "integers"),))


def t_id_duplicate(draw, lay, site):
    g = _pick_group(draw, lay, site)
    k = draw(st.integers(0, len(lay.group_ids[g]) - 1), label="position")
    own = lay.group_ids[g][k]
    other = draw(st.sampled_from([i for i in lay.group_of if i != own]), label="duplicate of")

    def mutate(d):
        d["param_groups"][g]["params"][k] = other
    return Tamper(f"group {g}: id {own} -> {other} (duplicate)", mutate,
                  ((f"parameter id {other}", "twice"),))


def t_id_out_of_range(draw, lay, site):
    g = _pick_group(draw, lay, site)
    k = draw(st.integers(0, len(lay.group_ids[g]) - 1), label="position")
    new = draw(st.sampled_from([99, -1, 2**40, len(lay.group_of)]), label="new id")

    def mutate(d):
        d["param_groups"][g]["params"][k] = new
    return Tamper(f"group {g}: id at {k} -> {new}", mutate,
                  (("state_dict['state']", "missing ids", str(new)),))


def t_ids_permuted(draw, lay, site):
    """Ids moved between or within groups (group sizes kept): every parameter has its own
    (shape, dtype), so the entry first checked under a wrong parameter fails."""
    flat_ids = [i for ids in lay.group_ids for i in ids]
    if site == "last":  # move an id of the last group only
        a = draw(st.sampled_from(lay.group_ids[-1]), label="a")
        b = draw(st.sampled_from([i for i in flat_ids if i != a]), label="b")
        perm = list(flat_ids)
        ia, ib = perm.index(a), perm.index(b)
        perm[ia], perm[ib] = perm[ib], perm[ia]
    else:
        perm = draw(st.permutations(flat_ids), label="permutation")
        if perm == flat_ids:  # (the simplest draw) rotate instead
            perm = flat_ids[1:] + flat_ids[:1]
    moved = [new for new, old in zip(perm, flat_ids) if new != old]

    def mutate(d):
        it = iter(perm)
        for group in d["param_groups"]:
            group["params"] = [next(it) for _ in group["params"]]
    return Tamper(f"ids permuted {perm}", mutate,
                  tuple((_state_where(i),) for i in moved))


def t_entry_not_mapping(draw, lay, site):
    i = _pick_id(draw, lay, site)
    name = draw(st.sampled_from(["items", "None", "str", "array", "empty-list"]), label="as")

    def mutate(d):
        entry = d["state"][i]
        d["state"][i] = {"items": list(entry.items()), "None": None, "str": "entry",
                         "array": entry["square_avg"], "empty-list": []}[name]
    return Tamper(f"state {i} as {name}", mutate, ((_state_where(i), "mapping"),))


def t_drop_entry_key(draw, lay, site):
    i = _pick_id(draw, lay, site)
    g = lay.group_of[i]
    keys = ["step", "square_avg"] + [n for n in OPTIONAL if lay.required[g][n]]
    key = draw(st.sampled_from(keys), label="key")

    def mutate(d):
        del d["state"][i][key]
    return Tamper(f"state {i}: drop {key!r}", mutate, ((_state_where(i), "missing", key),))


def t_extra_entry_key(draw, lay, site):
    i = _pick_id(draw, lay, site)
    key = draw(st.sampled_from(["exp_avg", "steps", "Step", "square_avg ", 0, None, "params"]),
               label="key")

    def mutate(d):
        d["state"][i][key] = d["state"][i]["square_avg"].copy()
    return Tamper(f"state {i}: extra key {key!r}", mutate,
                  ((_state_where(i), "unexpected", repr(key)),))


def t_partial_optional_buffer(draw, lay, site):
    """An optional buffer given to some parameters of a (group, dtype) bucket but not others,
    or (where the saved options need it) missing."""
    candidates = [(i, name) for i in lay.group_of for name in OPTIONAL
                  if lay.required[lay.group_of[i]][name] or len(lay.bucket_of[i]) > 1]
    if site == "last":
        candidates = [c for c in candidates if c[0] == lay.last_id]
    i, name = draw(st.sampled_from(candidates), label="entry, buffer")
    g = lay.group_of[i]

    def mutate(d):
        entry = d["state"][i]
        if name in entry:
            del entry[name]
        else:
            entry[name] = np.zeros_like(entry["square_avg"])
    if lay.required[g][name]:
        expect = ((_state_where(i), "missing", name),)
    else:
        expect = (("state_dict['state']", name, "present for some"),)
    return Tamper(f"state {i}: toggle {name}", mutate, expect)


def t_bad_step(draw, lay, site):
    i = _pick_id(draw, lay, site)
    name, value = _sample(draw, BAD_STEPS, "value")

    def mutate(d):
        d["state"][i]["step"] = value
    return Tamper(f"state {i}: step = {name}", mutate, ((_state_where(i), "step"),))


def t_step_differs_in_group(draw, lay, site):
    i = _pick_id(draw, lay, site)
    delta = draw(st.sampled_from([1, -1, -3, 1000]), label="delta")

    def mutate(d):
        d["state"][i]["step"] = d["state"][i]["step"] + delta
    return Tamper(f"state {i}: step {delta:+d} (rest of its group unchanged)", mutate,
                  (("state_dict['state']", "same group"),))


def t_bad_array(draw, lay, site):
    i = _pick_id(draw, lay, site)
    g = lay.group_of[i]
    key = draw(st.sampled_from(["square_avg"] + [n for n in OPTIONAL if lay.required[g][n]]),
               label="buffer")
    ref = lay.donor_state[i][key]
    name, value = _sample(draw, bad_array_candidates(ref), "value")

    def mutate(d):
        d["state"][i][key] = value
    return Tamper(f"state {i}[{key!r}] = {name}", mutate, ((_state_where(i), key),))


def t_state_not_mapping(draw, lay, site):
    name = draw(st.sampled_from(["values", "items", "None", "str", "array"]), label="as")

    def mutate(d):
        state = d["state"]
        d["state"] = {"values": list(state.values()), "items": list(state.items()),
                      "None": None, "str": "state", "array": np.zeros(3)}[name]
    return Tamper(f"state as {name}", mutate, (("state_dict['state']", "mapping"),))


def t_drop_state_entry(draw, lay, site):
    i = _pick_id(draw, lay, site)

    def mutate(d):
        del d["state"][i]
    return Tamper(f"state {i} dropped", mutate, (("state_dict['state']", "missing ids", str(i)),))


def t_extra_state_entry(draw, lay, site):
    source = _pick_id(draw, lay, site)
    new = draw(st.sampled_from([99, -1, 2**40, len(lay.group_of), "0", 1.5, None]),
               label="new id")

    def mutate(d):
        d["state"][new] = copy.deepcopy(d["state"][source])
    return Tamper(f"state for unknown id {new!r}", mutate,
                  (("state_dict['state']", "unexpected ids", repr(new)),))


def t_string_state_ids(draw, lay, site):
    def mutate(d):
        d["state"] = {str(k): v for k, v in d["state"].items()}
    return Tamper("state ids as strings", mutate, (("state_dict['state']", "unexpected ids"),))


def t_group_count(draw, lay, site):
    how = draw(st.sampled_from(["drop-last", "drop-first", "append-copy", "insert-copy",
                                "empty"]), label="how")

    def mutate(d):
        groups = d["param_groups"]
        d["param_groups"] = {"drop-last": groups[:-1], "drop-first": groups[1:],
                             "append-copy": groups + [copy.deepcopy(groups[-1])],
                             "insert-copy": [copy.deepcopy(groups[0])] + groups,
                             "empty": []}[how]
    return Tamper(f"groups {how}", mutate, (("parameter groups",),))


def t_groups_not_a_list(draw, lay, site):
    name = draw(st.sampled_from(["dict", "None", "str", "generator", "single-group"]), label="as")

    def mutate(d):
        groups = d["param_groups"]
        d["param_groups"] = {"dict": dict(enumerate(groups)), "None": None, "str": "groups",
                             "generator": (g for g in groups), "single-group": groups[0]}[name]
    return Tamper(f"param_groups as {name}", mutate, (("state_dict['param_groups']",),))


def t_top_level(draw, lay, site):
    how = draw(st.sampled_from(["drop-state", "drop-param_groups", "extra-key", "list",
                                "None", "str", "items"]), label="how")

    def mutate(d):
        if how == "drop-state":
            del d["state"]
        elif how == "drop-param_groups":
            del d["param_groups"]
        elif how == "extra-key":
            d["step"] = 3
        else:
            raise _Replace({"list": [d["state"], d["param_groups"]], "None": None,
                            "str": "state_dict", "items": list(d.items())}[how])
    if how in ("drop-state", "drop-param_groups", "extra-key"):
        expect = (("state_dict does not fit",),)
    else:
        expect = (("state_dict must be a mapping",),)
    return Tamper(f"top level: {how}", mutate, expect)


class _Replace(Exception):
    """Raised by a mutate that replaces the whole state dict (it cannot do that in place)."""

    def __init__(self, value):
        super().__init__()
        self.value = value


ANYWHERE = (t_drop_group_key, t_extra_group_key, t_bad_hyperparameter, t_nesterov_without_momentum,
            t_group_not_mapping, t_ids_not_a_list, t_ids_count, t_id_bad_type, t_id_duplicate,
            t_id_out_of_range, t_ids_permuted, t_entry_not_mapping, t_drop_entry_key,
            t_extra_entry_key, t_partial_optional_buffer, t_bad_step, t_step_differs_in_group,
            t_bad_array, t_state_not_mapping, t_drop_state_entry, t_extra_state_entry,
            t_string_state_ids, t_group_count, t_groups_not_a_list, t_top_level)
#: Those that can be confined to the last group / the last state entry checked.
AT_THE_END = (t_drop_group_key, t_extra_group_key, t_bad_hyperparameter,
              t_nesterov_without_momentum, t_group_not_mapping, t_ids_not_a_list, t_ids_count,
              t_id_bad_type, t_id_duplicate, t_id_out_of_range, t_ids_permuted,
              t_entry_not_mapping, t_drop_entry_key, t_extra_entry_key,
              t_partial_optional_buffer, t_bad_step, t_step_differs_in_group, t_bad_array)


def tampered(scenario, tamper: Tamper):
    d = valid_state_dict(scenario)
    try:
        tamper.mutate(d)
    except _Replace as replacement:
        return replacement.value
    return d


def assert_rejected_and_unchanged(scenario, tamper: Tamper, backend, seed=7) -> None:
    broken = tampered(scenario, tamper)
    trained, twin = victim(scenario, backend), victim(scenario, backend)
    before = snapshot(trained)
    with pytest.raises(DICT_ERRORS) as info:
        trained.opt.load_state_dict(broken)
    message = str(info.value)
    assert any(all(f in message for f in alternative) for alternative in tamper.expect), (
        f"{tamper.label}: the message {message!r} does not name the offending entry "
        f"(expected one of {tamper.expect})")
    assert snapshot(trained) == before, f"{tamper.label}: the failed load changed the optimizer"
    assert_twin_steps_alike(trained, twin, seed, tamper.label)
    event(type(info.value).__name__)


# ---------------------------------------------------------------------------------------------
# the controls: the untampered dict loads, and differs from the victim in every respect


@pytest.mark.parametrize("scenario", [LIST, FLAT], ids=lambda s: s.name)
def test_the_untampered_checkpoint_loads_and_differs_from_the_victim(scenario):
    """Control for everything below: the donor's dict loads, and loading it changes every
    parameter group's hyperparameters, every step count and every state buffer, and allocates
    or drops buffers, so that any partial write of a rejected dict would be visible."""
    trained = victim(scenario)
    before = snapshot(trained, identities=False)
    trained.opt.load_state_dict(valid_state_dict(scenario))
    after = snapshot(trained, identities=False)
    groups_b, state_b, buckets_b, params_b = before
    groups_a, state_a, buckets_a, params_a = after
    assert params_a == params_b  # loading state never touches parameters
    assert all(a != b for a, b in zip(groups_a, groups_b))
    assert all(dict(a)["step"] != dict(b)["step"] for a, b in zip(state_a, state_b))
    for a, b in zip(state_a, state_b):
        a, b = dict(a), dict(b)
        if a["square_avg"][1] != (0,):
            assert a["square_avg"] != b["square_avg"]
    assert buckets_a != buckets_b  # a buffer was allocated or dropped
    donor = _donor_state_dict(scenario)
    for i, entry in donor["state"].items():
        loaded = trained.opt.state[i]
        assert loaded.keys() == entry.keys()
        for name, value in entry.items():
            assert (loaded[name] == value) if name == "step" else (
                _array_key(loaded[name]) == _array_key(value))


def test_optional_buffers_follow_the_saved_options():
    """What the code accepts for momentum_buffer / grad_avg, as the docstrings say:

    - absent where the *saved* options need it (momentum > 0, centered, preset tf1): rejected;
    - absent where they do not: accepted, and the optimizer drops its own buffer;
    - present where the options do not use it, for every parameter of a (group, dtype) bucket:
      accepted and kept (state_dict() writes such buffers after momentum is switched off);
    - present for some parameters of a bucket but not others: rejected.
    """
    lay = layout(LIST)
    trained = victim(LIST)
    assert "grad_avg" in trained.opt.state[lay.group_ids[2][0]]
    assert "momentum_buffer" not in trained.opt.state[lay.group_ids[1][0]]
    trained.opt.load_state_dict(valid_state_dict(LIST))
    assert all("grad_avg" not in trained.opt.state[i] for i in lay.group_ids[2])  # dropped
    assert all("momentum_buffer" in trained.opt.state[i] for i in lay.group_ids[1])  # allocated

    # Group 2 saved with momentum 0: a full set of momentum buffers is accepted and kept.
    d = valid_state_dict(LIST)
    for i in lay.group_ids[2]:
        d["state"][i]["momentum_buffer"] = np.full_like(d["state"][i]["square_avg"], 0.25)
    trained = victim(LIST)
    trained.opt.load_state_dict(d)
    for i in lay.group_ids[2]:
        buffer = trained.opt.state[i]["momentum_buffer"]
        assert buffer.size == 0 or np.all(buffer == 0.25)

    # ... but not for one parameter of a two-parameter bucket only.
    first = next(ids for g, ids in lay.buckets if g == 2 and len(ids) > 1)[0]

    def one_grad_avg(d):
        d["state"][first]["grad_avg"] = np.zeros_like(d["state"][first]["square_avg"])
    assert_rejected_and_unchanged(LIST, Tamper("one grad_avg in a bucket", one_grad_avg,
                                               (("grad_avg", "present for some"),)), None)

    # preset tf1 keeps a momentum buffer at momentum 0: it is required there.
    params = [np.ones(3, np.float32), np.ones(2)]
    opt = RMSprop(params, lr=1e-2, preset="tf1")
    assert opt.param_groups[0]["momentum"] == 0
    d = opt.state_dict()
    del d["state"][1]["momentum_buffer"]
    with pytest.raises(ValueError,
                       match=r"state_dict\['state'\]\[1\] is missing 'momentum_buffer'"):
        opt.load_state_dict(d)


# ---------------------------------------------------------------------------------------------
# dicts


def test_every_key_dropped_or_added_at_every_level(backend):
    """Exhaustively: each key of the top level, of every parameter group and of every state
    entry dropped (the buffers the saved options need), and an unknown key added at each of
    those levels. Each is rejected with a message naming the place, changes nothing, and the
    victim then steps exactly like its untouched twin (victim and twin step in lockstep after
    every rejection)."""
    scenario = LIST
    lay = layout(scenario)
    cases = [Tamper("top: drop state", lambda d: d.pop("state"), (("state_dict does not fit",
                                                                    "'state'"),)),
             Tamper("top: drop param_groups", lambda d: d.pop("param_groups"),
                    (("state_dict does not fit", "param_groups"),)),
             Tamper("top: extra", lambda d: d.update(extra=1), (("state_dict does not fit",
                                                                 "extra"),))]
    for g in range(len(lay.group_ids)):
        for key in HYPERPARAMETERS + ("params",):
            cases.append(Tamper(f"group {g}: drop {key}",
                                functools.partial(lambda d, g, key: d["param_groups"][g].pop(key),
                                                  g=g, key=key),
                                ((_group_where(g), "missing", key),)))
        cases.append(Tamper(f"group {g}: extra", functools.partial(
            lambda d, g: d["param_groups"][g].update(betas=(0.9, 0.99)), g=g),
            ((_group_where(g), "unexpected", "betas"),)))
    for i in sorted(lay.group_of):
        g = lay.group_of[i]
        for key in ["step", "square_avg"] + [n for n in OPTIONAL if lay.required[g][n]]:
            cases.append(Tamper(f"state {i}: drop {key}", functools.partial(
                lambda d, i, key: d["state"][i].pop(key), i=i, key=key),
                ((_state_where(i), "missing", key),)))
        cases.append(Tamper(f"state {i}: extra", functools.partial(
            lambda d, i: d["state"][i].update(exp_avg=d["state"][i]["square_avg"]), i=i),
            ((_state_where(i), "unexpected", "exp_avg"),)))
    trained, twin = victim(scenario, backend), victim(scenario, backend)
    for n, tamper in enumerate(cases):
        before = snapshot(trained)
        with pytest.raises(DICT_ERRORS) as info:
            trained.opt.load_state_dict(tampered(scenario, tamper))
        message = str(info.value)
        assert any(all(f in message for f in alt) for alt in tamper.expect), (tamper.label,
                                                                               message)
        assert snapshot(trained) == before, tamper.label
        assert_twin_steps_alike(trained, twin, 100 + n, tamper.label)
    assert len(cases) == 3 + 4 * 14 + len(lay.group_of) + sum(
        2 + sum(lay.required[lay.group_of[i]].values()) for i in lay.group_of)


@settings(SETTINGS, max_examples=EXAMPLES_DICT)
@given(data=st.data())
def test_tampered_state_dict_is_rejected_and_changes_nothing(backend, data):
    """Hypothesis draws one tampering anywhere in a four-group, mixed float32/float64 state dict
    (momentum in two groups, centered in one, a zero-size and a 0-d parameter): dropped or extra
    keys, wrong types in place of arrays / numbers / bools / lists / mappings, arrays of the
    wrong shape, ndim or dtype (float16, ints, complex, object, bool, strings, the other float,
    big-endian), invalid hyperparameters (nan, inf, negative, alpha >= 1, nesterov without
    momentum), non-integral / negative / bool / non-finite / beyond-float steps, steps that
    differ within a group, parameter ids that are duplicated, missing, out of range, of the
    wrong type or permuted within and across groups, state for unknown ids, a wrong group count,
    optional buffers missing where the saved options need them or given to part of a bucket.
    Each must raise TypeError/ValueError naming the entry, leave the victim bit for bit as it
    was, and leave it stepping exactly like an untouched twin."""
    lay = layout(LIST)
    factory = data.draw(st.sampled_from(ANYWHERE), label="tampering")
    tamper = factory(data.draw, lay, "any")
    event(factory.__name__)
    assert_rejected_and_unchanged(LIST, tamper, backend)


@settings(SETTINGS, max_examples=EXAMPLES_LAST)
@given(data=st.data())
def test_only_the_last_group_or_state_entry_is_bad(backend, data):
    """The dict is valid (and different from the victim in every group and entry, see the
    control test) except in the last parameter group or in the last state entry that
    load_state_dict examines. Rejection must still change nothing: no hyperparameter, step,
    buffer or allocation of the earlier, valid part may have been written."""
    lay = layout(LIST)
    factory = data.draw(st.sampled_from(AT_THE_END), label="tampering")
    tamper = factory(data.draw, lay, "last")
    event(factory.__name__)
    assert_rejected_and_unchanged(LIST, tamper, backend)


@settings(SETTINGS, max_examples=EXAMPLES_FLAT)
@given(data=st.data())
def test_flat_params_tampered_state_dict_is_rejected_and_changes_nothing(backend, data):
    """The main tampering test on a FlatParams optimizer (one group, float32 and float64
    buckets, momentum and centered; the donor has no grad_avg, so a valid load would drop it).
    The parameter and gradient buffers of the FlatParams are part of the snapshot through its
    views."""
    lay = layout(FLAT)
    factory = data.draw(st.sampled_from(ANYWHERE), label="tampering")
    site = data.draw(st.sampled_from(["any", "last"]) if factory in AT_THE_END
                     else st.just("any"), label="site")
    tamper = factory(data.draw, lay, site)
    event(factory.__name__)
    assert_rejected_and_unchanged(FLAT, tamper, backend)


# ---------------------------------------------------------------------------------------------
# step counts


def _load_step(step_value):
    trained = victim(LIST)
    d = trained.opt.state_dict()
    for i in layout(LIST).group_ids[0]:
        d["state"][i]["step"] = step_value
    before = snapshot(trained)
    try:
        trained.opt.load_state_dict(d)
    except DICT_ERRORS:
        assert snapshot(trained) == before
        return None
    return trained


@settings(SETTINGS, max_examples=EXAMPLES_STEP)
@example(step=2**53 + 1)
@example(step=2**63 - 1)
@given(step=st.integers(0, 2**63 - 1))
def test_a_loaded_step_count_is_kept_exactly(step):
    """An integer step count that load_state_dict accepts is the step count the optimizer then
    has (it is what a callable lr is called with), not a float64 rounding of it; one it cannot
    keep must be rejected instead. Steps are drawn over the whole int64 range, which the
    documented npz layout ('the step as a 0-d int64 array') can store."""
    trained = _load_step(step)
    if trained is None:
        return
    kept = trained.opt.state[layout(LIST).group_ids[0][0]]["step"]
    assert type(kept) is int and kept == step, (
        f"load_state_dict accepted step {step} but the optimizer now has step {kept}")


@settings(SETTINGS, max_examples=EXAMPLES_STEP)
@example(step=2**64)
@example(step=10**300)
@given(step=st.integers(2**62, 2**80))
def test_a_loadable_step_count_saves_without_pickle(step):
    """A state that load_state_dict accepted must save through the documented file route
    (state_dict_to_arrays -> np.savez -> np.load(allow_pickle=False) -> state_dict_from_arrays,
    'nothing needs pickle') and come back with the same step; a step that does not fit that
    route must be rejected when loaded."""
    trained = _load_step(step)
    if trained is None:
        return
    saved = trained.opt.state_dict()
    arrays = state_dict_to_arrays(saved)
    assert not any(a.dtype.hasobject for a in arrays.values()), (
        f"step {step} was accepted by load_state_dict but state_dict_to_arrays makes an object "
        f"array of it, which np.load(allow_pickle=False) refuses")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as npz:
        back = state_dict_from_arrays(npz)
    assert all(back["state"][i]["step"] == saved["state"][i]["step"] for i in saved["state"])


# ---------------------------------------------------------------------------------------------
# files


def _save(path, state_dict) -> bytes:
    np.savez(path, **state_dict_to_arrays(state_dict))
    return path.read_bytes()


def _try_load_file(trained: Trained, path):
    """('file' | 'dict' | 'loaded', exception or None): where the load stopped."""
    try:
        saved = np.load(path, allow_pickle=False)
    except FILE_ERRORS as exc:
        return "file", exc
    try:  # not in a with block: np.load may return a plain array, and that is fastrms's input
        state = state_dict_from_arrays(saved)
    except FILE_ERRORS as exc:
        return "file", exc
    finally:
        if not isinstance(saved, np.ndarray):  # an NpzFile
            saved.close()
    try:
        trained.opt.load_state_dict(state)
    except DICT_ERRORS as exc:
        return "dict", exc
    return "loaded", None


@pytest.fixture(scope="module")
def loaded_twin_snapshot():
    """What a successful load of the valid file must give."""
    trained = victim(LIST)
    trained.opt.load_state_dict(valid_state_dict(LIST))
    return snapshot(trained, identities=False)


def _check_file_outcome(path, loaded_snapshot, label):
    """Load ``path`` into a victim: a failure must be a clear error that changes nothing; a
    success must give exactly ``loaded_snapshot`` (or, when that is None, exactly what loading
    the file's own dict gives: no partial or approximate load)."""
    trained, twin = victim(LIST), victim(LIST)
    before = snapshot(trained)
    where, error = _try_load_file(trained, path)
    event(f"{where}: {type(error).__name__}" if error else where)
    if where == "loaded":
        if loaded_snapshot is None:
            reference = victim(LIST)
            with np.load(path, allow_pickle=False) as saved:
                reference.opt.load_state_dict(state_dict_from_arrays(saved))
            loaded_snapshot = snapshot(reference, identities=False)
        assert snapshot(trained, identities=False) == loaded_snapshot, (
            f"{label}: the file loaded, and loaded something else than what it holds")
        return where
    assert snapshot(trained) == before, f"{label}: a rejected file changed the optimizer"
    assert_twin_steps_alike(trained, twin, 11, label)
    return where


def test_the_untampered_file_loads(tmp_path, loaded_twin_snapshot):
    """Control for the file tests: the valid file loads and gives what loading the dict gives.
    (Bit-for-bit resume through the file is tests/test_optimizer.py::
    test_resume_is_bit_identical[npz].)"""
    path = tmp_path / "ok.npz"
    _save(path, _donor_state_dict(LIST))
    assert _check_file_outcome(path, loaded_twin_snapshot, "valid") == "loaded"


def test_truncated_file_is_rejected(tmp_path, loaded_twin_snapshot):
    """The checkpoint cut at every byte offset of its first 64 bytes, every 97th after, and
    the last 128 (the zip's central directory end): each load fails with an error of the zip /
    npy layer (or a clear one from fastrms), and the optimizer is unchanged. No truncation may
    load (a zip cannot lose bytes unnoticed)."""
    path = tmp_path / "full.npz"
    data = _save(path, _donor_state_dict(LIST))
    cut = tmp_path / "cut.npz"
    offsets = sorted(set(range(64)) | set(range(64, len(data), 97))
                     | set(range(max(0, len(data) - 128), len(data))))
    trained, twin = victim(LIST), victim(LIST)
    before = snapshot(trained)
    outcomes = {}
    for offset in offsets:
        cut.write_bytes(data[:offset])
        where, error = _try_load_file(trained, cut)
        assert where != "loaded", f"the file cut at {offset} of {len(data)} bytes loaded"
        outcomes[type(error).__name__] = outcomes.get(type(error).__name__, 0) + 1
        assert snapshot(trained) == before, offset
    assert_twin_steps_alike(trained, twin, 12, "truncation")
    assert sum(outcomes.values()) == len(offsets)


@functools.lru_cache(maxsize=None)
def _valid_file_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **state_dict_to_arrays(_donor_state_dict(LIST)))
    return buffer.getvalue()


@settings(SETTINGS, max_examples=EXAMPLES_FILE)
@given(data=st.data())
def test_flipped_bytes_are_rejected_or_harmless(tmp_path, loaded_twin_snapshot, data):
    """One to three bytes XOR-ed anywhere in the checkpoint (half the draws inside the central
    directory, where names, sizes, offsets, CRCs and compression methods live). Either the load
    fails cleanly (zip / npy errors such as a CRC mismatch, or fastrms's TypeError/ValueError)
    leaving the optimizer unchanged, or the flip hit bytes nothing reads (zip metadata such as
    timestamps or local extra fields) and the load gives exactly the checkpoint's state."""
    original = bytearray(_valid_file_bytes())
    cd_start = original.find(b"PK\x01\x02")
    flips = data.draw(st.integers(1, 3), label="flips")
    for _ in range(flips):
        if data.draw(st.booleans(), label="in central directory"):
            offset = data.draw(st.integers(cd_start, len(original) - 1), label="offset")
        else:
            offset = data.draw(st.integers(0, len(original) - 1), label="offset")
        original[offset] ^= data.draw(st.integers(1, 255), label="mask")
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(original))
    _check_file_outcome(path, loaded_twin_snapshot, "flipped")


class _Canary:
    """Unpickling one runs _touch(path): proof that code from the file ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return _touch, (self.path,)


def _touch(path):
    with open(path, "w") as f:
        f.write("code from the checkpoint ran")
    return 0.5


def _rewrite(data: bytes, members: dict) -> bytes:
    """The zip ``data`` with ``members`` (name -> bytes, or None to remove) changed, CRCs valid."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if info.filename in members:
                continue
            target.writestr(info.filename, source.read(info.filename))
        for name, content in members.items():
            if content is not None:
                target.writestr(name, content)
    return out.getvalue()


def _npy(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_pickled_payloads_are_never_executed(tmp_path):
    """A payload whose unpickling writes a marker file is put where a loader might unpickle it:
    as an object-array member replacing a state array, a step, a hyperparameter or the id list,
    as an extra member with a valid-looking name, as a member of raw pickle bytes, and as the
    whole file (an object .npy, a bare pickle). Loading with np.load(allow_pickle=False) and
    state_dict_from_arrays must fail with a clear error, change nothing, and never create the
    marker. The canary itself is live: pickle.loads of it does create the marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Canary(marker)))  # the canary works...
    assert marker.exists()
    marker.unlink()  # ...and is armed again

    evil = np.empty((), object)
    evil[()] = _Canary(marker)
    evil_1d = np.empty(3, object)
    evil_1d[:] = [_Canary(marker)] * 3
    good = _valid_file_bytes()
    files = {
        "object state array": _rewrite(good, {"state/0/square_avg.npy": _npy(evil_1d, True)}),
        "object step": _rewrite(good, {"state/3/step.npy": _npy(evil, True)}),
        "object hyperparameter": _rewrite(good, {"param_groups/1/lr.npy": _npy(evil, True)}),
        "object ids": _rewrite(good, {"param_groups/0/params.npy": _npy(evil_1d, True)}),
        "extra object member": _rewrite(good, {"state/0/exp_avg.npy": _npy(evil_1d, True)}),
        "extra oddly named member": _rewrite(good, {"evil.npy": _npy(evil, True)}),
        "raw pickle member": _rewrite(good, {"state/0/square_avg.npy":
                                             pickle.dumps(_Canary(marker))}),
        "raw pickle member, no suffix": _rewrite(good, {"state/0/square_avg":
                                                        pickle.dumps(_Canary(marker))}),
        "object .npy file": _npy(evil_1d, True),
        "pickle file": pickle.dumps({"state": _Canary(marker), "param_groups": []}),
    }
    for label, content in files.items():
        path = tmp_path / "evil.npz"
        path.write_bytes(content)
        trained, twin = victim(LIST), victim(LIST)
        before = snapshot(trained)
        try:
            where, error = _try_load_file(trained, path)
        except Exception as exc:  # noqa: BLE001 - report which payload, then fail
            pytest.fail(f"{label}: unclear error {type(exc).__name__}: {exc}")
        assert not marker.exists(), f"{label}: loading ran code from the file"
        assert where != "loaded", label
        assert isinstance(error, (ValueError, TypeError)), (label, error)
        assert snapshot(trained) == before, label
        assert_twin_steps_alike(trained, twin, 13, label)


def _foreign_file(label, tmp_path) -> bytes:
    if label == "plain .npy":
        return _npy(np.ones(3))
    if label == "empty .npz":
        names = zipfile.ZipFile(io.BytesIO(_valid_file_bytes())).namelist()
        return _rewrite(_valid_file_bytes(), dict.fromkeys(names))
    if label == "FlatParams checkpoint":
        source = FLAT
    else:  # the same groups, every parameter with an extra axis
        source = LIST._replace(name="other shapes", specs=tuple(
            tuple((shape + (2,), dtype) for shape, dtype in group) for group in LIST.specs))
    return _save(tmp_path / "source.npz",
                 build(source, source.donor_options, steps=1).opt.state_dict())


@pytest.mark.parametrize("label", ["plain .npy", "empty .npz", "FlatParams checkpoint",
                                   "other shapes"])
def test_a_plain_npy_or_foreign_checkpoint_is_rejected_clearly(tmp_path, label):
    """Mismatched files: a plain .npy (np.save where np.savez was meant: np.load returns an
    array, which the documented route hands to state_dict_from_arrays), an empty .npz, and
    valid checkpoints of other optimizers (the FlatParams scenario: one group; an optimizer with
    the same groups but other shapes). Each must raise TypeError/ValueError and change
    nothing."""
    path = tmp_path / "foreign.npz"
    path.write_bytes(_foreign_file(label, tmp_path))
    trained, twin = victim(LIST), victim(LIST)
    before = snapshot(trained)
    try:
        where, error = _try_load_file(trained, path)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{label}: unclear error {type(exc).__name__}: {exc}")
    assert where != "loaded" and isinstance(error, DICT_ERRORS), (label, where, error)
    assert snapshot(trained) == before, label
    assert_twin_steps_alike(trained, twin, 14, label)


def test_every_member_removed_is_rejected(tmp_path):
    """Each member of the checkpoint removed in turn (with valid CRCs: a tool rewrote the
    zip): every one is needed, so each load fails with TypeError/ValueError from fastrms and
    changes nothing."""
    good = _valid_file_bytes()
    names = zipfile.ZipFile(io.BytesIO(good)).namelist()
    trained, twin = victim(LIST), victim(LIST)
    before = snapshot(trained)
    path = tmp_path / "removed.npz"
    for name in names:
        path.write_bytes(_rewrite(good, {name: None}))
        where, error = _try_load_file(trained, path)
        assert where in ("file", "dict") and isinstance(error, DICT_ERRORS), (name, where, error)
        assert snapshot(trained) == before, name
    assert_twin_steps_alike(trained, twin, 15, "removed members")


def _member_names():
    return [n[:-4] for n in zipfile.ZipFile(io.BytesIO(_valid_file_bytes())).namelist()]


RENAMES = (
    "state/{i}/exp_avg", "state/99/{key}", "state/x/{key}", "state/-1/{key}", "state/{i}",
    "state/{i}/{key}/extra", "states/{i}/{key}", "param_groups/9/{key}", "param_groups/{i}/lr",
    "{key}", "", "/state/{i}/{key}", "state/{i}/{key}.npy", "state/{i}/{key} ",
    "state/0x{i}/{key}", "param_groups/{i}/{key}s", "STATE/{i}/{key}",
    "state/{i}/../{i}/{key}",
)
#: Ways to replace a member's array (a function of the original array).
REPLACEMENTS = {
    "float16": lambda a: a.astype(np.float16),
    "int64-or-float64": lambda a: np.zeros(a.shape, np.float64 if a.dtype.kind in "iu"
                                           else np.int64),
    "complex128": lambda a: a.astype(np.complex128),
    "bool-or-float32": lambda a: np.zeros(a.shape, np.float32 if a.dtype == bool else bool),
    "bytes": lambda a: np.zeros(a.shape, "S3"),
    "str": lambda a: np.full(a.shape, "1", "U3"),
    "datetime": lambda a: np.zeros(a.shape, "M8[s]"),
    "other-float": lambda a: a.astype(np.float32 if a.dtype == F8 else F8),
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "extra-axis": lambda a: a[..., None],
    "leading-axis": lambda a: a[None],
    "flattened-or-2d": lambda a: a.reshape(-1) if a.ndim != 1 else a[:, None],
    "one-short": lambda a: a.reshape(-1)[:-1] if a.size else np.zeros(1, a.dtype),
    # (a cube transposed keeps its shape: a valid array, so it gets the extra axes instead)
    "fortran-transposed": lambda a: (np.asfortranarray(a.T) if a.ndim >= 2 and a.T.shape != a.shape
                                     else np.asfortranarray(a[None, None])),
}


@settings(SETTINGS, max_examples=EXAMPLES_FILE)
@given(data=st.data())
def test_renamed_or_replaced_members_are_rejected(tmp_path, data):
    """One member of the checkpoint renamed (to an unknown key, a malformed or path-like name,
    another id or group number), or its array replaced (another dtype: float16, int, complex,
    bool, bytes, str, datetime, the other float, big-endian; another shape: extra or leading
    axis, flattened, one element short, transposed; or a header that claims more data than the
    member holds). The zip is rewritten with valid CRCs, so only numpy's parser and fastrms can
    notice. A replaced state array (square_avg, momentum_buffer, grad_avg) and every rename
    must be rejected with a clear error that changes nothing. A replaced step, hyperparameter
    or id list may also load, when the replacement still holds a valid value (an integer id
    list in another integer dtype, a float16 learning rate): then the optimizer must hold
    exactly what the file says, nothing partial."""
    good = _valid_file_bytes()
    names = _member_names()
    name = data.draw(st.sampled_from(names), label="member")
    section, i, key = name.split("/")
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        raw = z.read(name + ".npy")
    must_fail = True
    if data.draw(st.booleans(), label="rename"):
        new = data.draw(st.sampled_from(RENAMES), label="new name").format(i=i, key=key)
        if new in names:  # renaming onto an existing member: the original is just missing
            changes = {name + ".npy": None}
        else:
            changes = {name + ".npy": None, new + ".npy": raw}
        label = f"{name} -> {new!r}"
    else:
        array = np.lib.format.read_array(io.BytesIO(raw))
        how = data.draw(st.sampled_from(sorted(REPLACEMENTS) + ["claims-more"]), label="how")
        if how == "claims-more":
            longer = _npy(np.zeros(array.size + 1000, array.dtype))
            content = longer[:len(longer) - array.dtype.itemsize * (array.size + 1000)]
            content += array.tobytes()
        else:
            content = _npy(REPLACEMENTS[how](array))
        changes = {name + ".npy": content}
        label = f"{name} replaced: {how}"
        must_fail = section == "state" and key != "step"
    path = tmp_path / "edited.npz"
    path.write_bytes(_rewrite(good, changes))
    where = _check_file_outcome(path, None, label)
    if must_fail:
        assert where != "loaded", f"{label}: loaded"
