"""``fastrms.RMSprop``: a torch-style optimizer over NumPy arrays, on the fused kernels.

Parameters are grouped by (hyperparameter group, dtype) into *buckets*. Each bucket keeps its
state in flat buffers (per-parameter views on top) and takes one kernel call per step: the
backend's ``update`` on the flat buffers for :class:`~fastrms.FlatParams`, its ``update_many``
for a list of arrays. Per-step Python work is a few C-level passes over the list of gradients
(dtype, shape, type, data pointer) and a few vectorised NumPy calls, never a kernel call per
array. A backend whose ``update_many`` accepts ``cache=`` gets one dict per bucket, kept across
steps, so that it can convert the lists that do not change (parameters, state views) once.
"""
from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Mapping
from numbers import Integral, Real

import cffi
import numpy as np

from . import _dispatch, presets
from ._coefficients import (CENTERED, LR_IN_MOMENTUM, MOMENTUM, Coefficients,
                            check_real, kernel_coefficients)
from ._validation import check_no_internal_overlap, check_param, is_kernel_ready
from .flat import FlatParams

try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # pragma: no cover - NumPy < 2
    _byte_bounds = np.byte_bounds

#: The keys of a parameter group besides "params", in state_dict order.
HYPERPARAMETERS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize",
                   "eps_in_sqrt", "lr_in_momentum", "nesterov", "decoupled_weight_decay",
                   "initial_square_avg")
_OPTIONAL_STATE = ("momentum_buffer", "grad_avg")
_BUFFERS = ("square_avg",) + _OPTIONAL_STATE
_STATE_KEYS = frozenset(("step",) + _BUFFERS)

# cffi only to read the data pointers of many gradients at once: from_buffer into one pointer
# array costs ~0.2 us per array, where ndarray.__array_interface__ or .ctypes costs over 1 us.
# from_buffer also refuses arrays that are not C-contiguous, the other thing step() must know.
# The compiled module's FFI does this in C; a plain cffi.FFI() (Python-level methods, ~1.5x
# slower) serves when the C extension was not built.
try:
    from ._fastrms_c import ffi as _ffi
except ImportError:  # pragma: no cover - C extension not built
    _ffi = cffi.FFI()
_CHAR_ARRAY = _ffi.typeof("char[]")
_CHAR_ARRAYS = itertools.repeat(_CHAR_ARRAY)  # map(_from_buffer, _CHAR_ARRAYS, arrays): a C loop
_POINTER_ARRAY = _ffi.typeof("char *[]")
_from_buffer = _ffi.from_buffer
_NULL = _ffi.NULL
_ndarray = np.ndarray
_NDARRAY_ONLY = {np.ndarray}
_get_dtype = operator.attrgetter("dtype")
_get_shape = operator.attrgetter("shape")


class _Default:
    """Marks an argument the caller did not give, so that the preset's value applies."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<preset default>"


_DEFAULT = _Default()


class _Bucket:
    """The parameters of one (group, dtype) pair: flat state buffers, one kernel call per step."""

    __slots__ = ("group", "dtype", "indices", "index_array", "params", "offsets", "size",
                 "state", "views", "unready", "take", "flat_param", "flat_grad", "backend_caches")

    def __init__(self, group: int, dtype: np.dtype, indices: list[int], params: list,
                 flat_param=None, flat_grad=None):
        self.group = group
        self.dtype = dtype
        self.indices = indices
        self.index_array = np.array(indices, dtype=np.intp)
        self.params = params
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.size)
        self.offsets = offsets
        self.size = offsets[-1]
        #: name -> flat buffer or None; name -> list of per-parameter views or None.
        self.state = dict.fromkeys(_BUFFERS)
        self.views = dict.fromkeys(_BUFFERS)
        #: Positions of parameters the kernels cannot take as they are (strided or misaligned).
        self.unready = [k for k, p in enumerate(params) if not is_kernel_ready(p)]
        # A C-level gather of this bucket's gradients from the list of all of them.
        if len(indices) == 1:
            only = indices[0]
            self.take = lambda grads: (grads[only],)
        else:
            self.take = operator.itemgetter(*indices)
        self.flat_param = flat_param
        self.flat_grad = flat_grad
        #: update_many function -> the dict it may keep conversions of our lists in.
        self.backend_caches: dict = {}

    def allocate(self, name: str, fill: float) -> None:
        buffer = np.full(self.size, fill, self.dtype)
        self.backend_caches.clear()
        self.state[name] = buffer
        self.views[name] = [buffer[lo:hi].reshape(p.shape)
                            for lo, hi, p in zip(self.offsets, self.offsets[1:], self.params)]

    def drop(self, name: str) -> None:
        self.backend_caches.clear()
        self.state[name] = None
        self.views[name] = None


class RMSprop:
    """RMSprop over NumPy arrays, torch.optim-style, one fused kernel call per (group, dtype).

    Signature defaults are the preset's (``preset=None`` is torch's): lr=1e-2, alpha=0.99,
    eps=1e-8, weight_decay=0, momentum=0, centered=False, maximize=False, eps_in_sqrt=False,
    lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False, initial_square_avg=0.
    ``preset="keras" | "tf1" | "optax"`` starts from that framework's defaults and conventions
    instead (table in :mod:`fastrms.presets`; tf1 and optax have no default lr, so it must be
    given); any argument given explicitly overrides the preset. The update itself is SPEC.md's,
    the same bits as :func:`fastrms.rmsprop_update`.

    ``params`` is one of
      - a list of float32 / float64 arrays of any shapes (dtypes may mix), updated in place;
      - a list of parameter-group dicts, ``{"params": [...], "lr": 3e-3, ...}``, each key
        overriding the defaults for that group (keys: ``"params"`` and :data:`HYPERPARAMETERS`);
      - a :class:`fastrms.FlatParams`: then ``step()`` takes no argument, reads ``flat.grads``,
        and makes one fused call per dtype.

    ``step(grads)`` takes one gradient per parameter, in group order: an array of the
    parameter's shape and dtype (no casting). C-contiguous, aligned gradients are read in place;
    others are copied first. Every hyperparameter and gradient is checked before anything is
    written; an error leaves parameters and state untouched. A gradient must not share memory
    with a parameter or the optimizer's state (the same gradient array for several parameters is
    fine). Parameters are checked once, at construction: writeable, and no two sharing memory;
    keep them so (and keep ``param_groups[i]["params"]`` as it is: it is not re-read).

    Mixed precision and loss scaling, as torch's fused optimizers with a ``GradScaler``:
    ``step(grads, grad_scale=s)`` divides every gradient by ``s`` inside the fused pass (the
    bits of dividing first, in the dtype). With ``skip_nonfinite=True``, a step whose unscaled
    gradients hold a NaN or an infinity, in any group, returns False and changes nothing: no
    parameter, no state, no step count. The check is one extra read of the gradients before the
    update (one C call for all of them). ``step`` returns True when it stepped.

    ``param_groups[i][key]`` may change between steps (as torch's LR schedulers do); nothing is
    recompiled. ``lr`` may be a callable ``lr(t) -> float`` of the 1-based number ``t`` of the
    step being taken (``lr(1)`` on the first step; after loading a state saved at step k, the
    next call is ``lr(k + 1)``). Turning momentum or centered on later starts the new buffer at
    zero; changing ``initial_square_avg`` after construction has no effect.

    State per parameter, as torch: ``step``, ``square_avg`` (initially ``initial_square_avg``),
    ``momentum_buffer`` (zeros, when momentum > 0; always with preset tf1) and ``grad_avg``
    (zeros, when centered). :attr:`state` gives per-parameter views, :meth:`flat_state` the flat
    buffers. The backend is chosen per call as by :func:`fastrms.rmsprop_update`: ``backend=``,
    then ``use_backend``, ``set_backend``, ``FASTRMS_BACKEND``, then automatic.

    Example:
        >>> import numpy as np, fastrms
        >>> w, b = np.ones((3, 2), np.float32), np.zeros(2, np.float32)
        >>> opt = fastrms.RMSprop([{"params": [w]}, {"params": [b], "lr": 1e-3}], lr=1e-2,
        ...                       momentum=0.9)
        >>> opt.step([np.full((3, 2), 0.5, np.float32), np.ones(2, np.float32)])
        True
        >>> opt.param_groups[0]["lr"] = 5e-3            # e.g. an LR schedule
        >>> opt.step([np.full((3, 2), 0.5, np.float32), np.ones(2, np.float32)])
        True
        >>> saved = opt.state_dict()                    # builtins and arrays only
        >>> checked = fastrms.RMSprop([w, b], skip_nonfinite=True)
        >>> checked.step([np.full((3, 2), np.inf, np.float32), np.ones(2, np.float32)])
        False
    """

    def __init__(self, params, lr=_DEFAULT, alpha=_DEFAULT, eps=_DEFAULT, weight_decay=_DEFAULT,
                 momentum=_DEFAULT, centered=_DEFAULT, maximize=_DEFAULT, *,
                 eps_in_sqrt=_DEFAULT, lr_in_momentum=_DEFAULT, nesterov=_DEFAULT,
                 decoupled_weight_decay=_DEFAULT, initial_square_avg=_DEFAULT, preset=None,
                 backend=None, skip_nonfinite=False):
        preset_row = presets.get(preset)
        given = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                     centered=centered, maximize=maximize, eps_in_sqrt=eps_in_sqrt,
                     lr_in_momentum=lr_in_momentum, nesterov=nesterov,
                     decoupled_weight_decay=decoupled_weight_decay,
                     initial_square_avg=initial_square_avg)
        defaults = preset_row.defaults()
        defaults.update((k, v) for k, v in given.items() if v is not _DEFAULT)
        #: The defaults every group starts from (the preset's, then the explicit arguments).
        self.defaults = defaults
        #: The preset in force ("torch" when none was named).
        self.preset = preset_row.name
        self._always_momentum = preset_row.always_momentum_buffer
        if backend is not None:
            _dispatch.load_requested(backend, "backend argument")  # fail now, not at step()
        self._backend = backend
        if not isinstance(skip_nonfinite, (bool, np.bool_)):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        #: Skip (return False from) a step whose gradients hold a NaN or an infinity.
        self.skip_nonfinite = bool(skip_nonfinite)

        self._flat, raw_groups = _split_params(params)
        self.param_groups: list[dict] = []
        all_params = []
        for g, raw in enumerate(raw_groups):
            group = _make_group(g, raw, defaults, preset_row.name)
            for k, p in enumerate(group["params"]):
                _check_param(p, f"param_groups[{g}]['params'][{k}]")
            # Subclasses (np.matrix, masked arrays) are updated as the plain memory they hold.
            group["params"] = [p if type(p) is np.ndarray else p.view(np.ndarray)
                               for p in group["params"]]
            all_params.extend(group["params"])
            self.param_groups.append(group)
        if not all_params:
            raise ValueError("RMSprop got an empty parameter list")
        if self._flat is None:
            _check_params_disjoint(all_params)
        self._params = all_params
        self._count = len(all_params)
        self._dtype_list = [p.dtype for p in all_params]
        self._shape_list = [p.shape for p in all_params]
        self._nbytes = np.array([p.nbytes for p in all_params], dtype=np.uintp)
        self._align_mask = np.array([p.itemsize - 1 for p in all_params], dtype=np.uintp)
        self._steps = [0] * len(self.param_groups)
        self._group_indices: list[list[int]] = []
        self._buckets: list[_Bucket] = []
        self._group_buckets: list[list[_Bucket]] = []
        self._build_buckets()
        self._refresh_regions()

    # -- construction ------------------------------------------------------------------------

    def _build_buckets(self) -> None:
        start = 0
        for g, group in enumerate(self.param_groups):
            indices = list(range(start, start + len(group["params"])))
            start += len(indices)
            self._group_indices.append(indices)
            by_dtype: dict[np.dtype, list[int]] = {}
            for i in indices:
                by_dtype.setdefault(self._dtype_list[i], []).append(i)
            buckets = []
            for dtype, members in by_dtype.items():
                params = [self._params[i] for i in members]
                if self._flat is not None:
                    bucket = _Bucket(g, dtype, members, params, self._flat.param_buffers[dtype],
                                     self._flat.grad_buffers[dtype])
                else:
                    bucket = _Bucket(g, dtype, members, params)
                with np.errstate(over="ignore"):
                    initial = dtype.type(group["initial_square_avg"])
                if not np.isfinite(initial):
                    raise ValueError(f"param_groups[{g}]: initial_square_avg too large for {dtype}")
                bucket.allocate("square_avg", initial)
                if group["momentum"] != 0 or self._always_momentum:
                    bucket.allocate("momentum_buffer", 0.0)
                if group["centered"]:
                    bucket.allocate("grad_avg", 0.0)
                buckets.append(bucket)
            self._group_buckets.append(buckets)
            self._buckets.extend(buckets)

    def _refresh_regions(self) -> None:
        """The memory step() writes, as sorted disjoint byte ranges, to test gradients against."""
        written = [p for p in self._params if p.size]
        for bucket in self._buckets:
            written.extend(b for b in bucket.state.values() if b is not None and b.size)
        self._written = written
        bounds = sorted(_byte_bounds(a) for a in written)
        merged: list[list[int]] = []
        for lo, hi in bounds:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self._region_lo = np.array([m[0] for m in merged], dtype=np.uintp)
        self._region_hi = np.array([m[1] for m in merged], dtype=np.uintp)
        #: Gradient addresses that last passed the checks below against these regions.
        self._clean_addresses = None

    # -- the step ----------------------------------------------------------------------------

    def step(self, grads=None, *, grad_scale=None) -> bool:
        """Apply one update; return True, or False for a step skipped by ``skip_nonfinite``.

        ``grads``: one array per parameter, in group order (omit it for an optimizer over
        FlatParams, which reads ``flat.grads``). ``grad_scale``: the loss scale the gradients
        carry; the kernels divide every gradient by it inside the fused pass, with the bits of
        dividing first in the dtype. With ``skip_nonfinite``, a step whose (unscaled) gradients
        hold a NaN or an infinity changes nothing at all, step counts included.
        """
        if grad_scale is not None:
            check_real("grad_scale", grad_scale)
        if self._flat is not None:
            if grads is not None:
                raise TypeError("this optimizer was built on a FlatParams: fill flat.grads in "
                                "place and call step() with no argument")
            plan = self._plan(grad_scale)
            if self.skip_nonfinite and not all(
                    module.all_finite(coeffs, (bucket.flat_grad,)) for bucket, coeffs, module in plan):
                return False
            self._allocate_for(plan)
            for bucket, coeffs, module in plan:
                arrays = (bucket.flat_param, bucket.flat_grad, bucket.state["square_avg"],
                          bucket.state["momentum_buffer"] if coeffs.flags & MOMENTUM else None,
                          bucket.state["grad_avg"] if coeffs.flags & CENTERED else None)
                if not module.update_if_ready(coeffs, *arrays):
                    module.update(coeffs, *arrays)
        else:
            grads, addresses = self._checked_grads(grads)
            plan = self._plan(grad_scale)
            if self.skip_nonfinite and not all(
                    module.all_finite(coeffs, bucket.take(grads)) for bucket, coeffs, module in plan):
                return False
            self._allocate_for(plan)
            for bucket, coeffs, module in plan:
                self._run_bucket(bucket, coeffs, module, grads, addresses)
        steps = self._steps
        for g in range(len(steps)):
            steps[g] += 1
        return True

    def _plan(self, grad_scale=None) -> list:
        """Coefficients and backend per bucket; validates every hyperparameter, writes nothing."""
        plan = []
        for g, group in enumerate(self.param_groups):
            buckets = self._group_buckets[g]
            if not buckets:
                continue
            lr = group["lr"]
            if callable(lr):
                lr = lr(self._steps[g] + 1)
            for bucket in buckets:
                try:
                    coeffs = kernel_coefficients(
                        bucket.dtype, lr, group["alpha"], group["eps"], group["weight_decay"],
                        group["momentum"], group["centered"], group["maximize"],
                        group["eps_in_sqrt"], group["lr_in_momentum"], group["nesterov"],
                        group["decoupled_weight_decay"], grad_scale)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"param_groups[{g}]: {exc}") from None
                if self._always_momentum and not coeffs.flags & MOMENTUM:
                    coeffs = _with_momentum_line(coeffs, group["lr_in_momentum"])
                module = _dispatch.resolve(self._backend, bucket.size, bucket.dtype, coeffs.flags)
                plan.append((bucket, coeffs, module))
        return plan

    def _allocate_for(self, plan) -> None:
        """Buffers switched on since construction (momentum or centered) start at zero."""
        changed = False
        for bucket, coeffs, _ in plan:
            if coeffs.flags & MOMENTUM and bucket.state["momentum_buffer"] is None:
                bucket.allocate("momentum_buffer", 0.0)
                changed = True
            if coeffs.flags & CENTERED and bucket.state["grad_avg"] is None:
                bucket.allocate("grad_avg", 0.0)
                changed = True
        if changed:
            self._refresh_regions()

    def _checked_grads(self, grads):
        """Check every gradient; return them, with strided or misaligned ones replaced by
        contiguous copies, and their data addresses (an ``np.uintp`` array, in the same order).
        Raises before anything is written."""
        if not isinstance(grads, (list, tuple)):
            if grads is None:
                raise TypeError("step() needs the gradients: a list with one array per parameter")
            if isinstance(grads, (np.ndarray, FlatParams)):
                raise TypeError(f"grads must be a list of arrays, one per parameter, got "
                                f"{type(grads).__name__}")
            grads = list(grads)
        if len(grads) != self._count:
            raise ValueError(f"got {len(grads)} gradients for {self._count} parameters")
        # C-level passes over the list (map, list ==, one comprehension); the loop that can
        # name the offending gradient runs only when one of them fails.
        try:
            fits = (list(map(_get_dtype, grads)) == self._dtype_list
                    and list(map(_get_shape, grads)) == self._shape_list
                    and set(map(type, grads)) == _NDARRAY_ONLY)
        except AttributeError:
            fits = False
        if not fits:
            for k, (g, dtype, shape) in enumerate(zip(grads, self._dtype_list, self._shape_list)):
                _check_grad(k, g, dtype, shape)
            # Subclasses (np.matrix, masked arrays) are read as the plain memory they hold.
            grads = [g if type(g) is _ndarray else g.view(_ndarray) for g in grads]
        try:
            keep = _ffi.new(_POINTER_ARRAY, list(map(_from_buffer, _CHAR_ARRAYS, grads)))
        except (ValueError, BufferError):  # some are not C-contiguous: NULL marks them
            keep = _ffi.new(_POINTER_ARRAY, [_pointer_or_null(g) for g in grads])
        lo = np.frombuffer(_ffi.buffer(keep), dtype=np.uintp)
        # The same addresses as a step that passed: the same verdict (the sizes are fixed by the
        # checks above, the regions until _refresh_regions). A loop that reuses its gradient
        # buffers skips a dozen NumPy calls per step.
        clean = self._clean_addresses
        if clean is not None and np.array_equal(lo, clean):
            return grads, lo
        strided = lo == 0
        suspects = strided | ((lo & self._align_mask) != 0)
        if self._region_lo.size:
            hi = lo + self._nbytes
            last = np.searchsorted(self._region_lo, hi, side="left").astype(np.int64) - 1
            suspects |= (last >= 0) & (self._region_hi[last] > lo) & (self._nbytes != 0)
        if not suspects.any():
            self._clean_addresses = lo.copy()
            return grads, lo
        # The rare path: exact checks, then copies of what the kernels cannot read directly.
        grads = list(grads)
        lo = lo.copy()  # a view of `keep` until now
        misaligned = (lo & self._align_mask) != 0
        for k in np.flatnonzero(suspects).tolist():
            g = grads[k]
            self._check_grad_overlap(k, g)
            if strided[k] or misaligned[k]:
                grads[k] = np.array(g, order="C", copy=True)
                lo[k] = int(_ffi.cast("uintptr_t", _from_buffer(_CHAR_ARRAY, grads[k])))
        return grads, lo

    def _check_grad_overlap(self, k: int, g) -> None:
        if g.size == 0:
            return
        for array in self._written:
            if np.may_share_memory(g, array) and np.shares_memory(g, array):
                what = _describe_written(self, array)
                raise ValueError(f"grads[{k}] shares memory with {what}; every gradient must be "
                                 f"its own buffer")

    def _run_bucket(self, bucket: _Bucket, coeffs: Coefficients, module, grads,
                    addresses) -> None:
        params = bucket.params
        if bucket.unready:
            params = list(params)
            for k in bucket.unready:
                params[k] = np.array(params[k], order="C", copy=True)
        views = bucket.views
        optional = (views["momentum_buffer"] if coeffs.flags & MOMENTUM else None,
                    views["grad_avg"] if coeffs.flags & CENTERED else None)
        # A backend that takes data addresses reuses the ones _checked_grads read (about a
        # third of a list step's Python time on 200 arrays went into reading them again).
        update_many = getattr(module, "update_many_at_addresses", None)
        if update_many is not None:
            taken = addresses[bucket.index_array]
        else:
            update_many, taken = module.update_many, bucket.take(grads)
        arguments = (coeffs, params, taken, views["square_avg"], *optional)
        if bucket.unready:  # params holds fresh copies: nothing worth keeping
            update_many(*arguments)
        else:
            # Our params and state-view lists are the same objects every step (allocate()
            # makes new lists), so a backend may convert them once and reuse the result.
            cache = bucket.backend_caches.get(update_many)
            if cache is None:
                cache = bucket.backend_caches[update_many] = {}
            update_many(*arguments, cache=cache)
        for k in bucket.unready:
            bucket.params[k][...] = params[k]

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> list[dict]:
        """Per parameter (index in group order): ``{"step": int, "square_avg": array, ...}``.

        The arrays are live views of the flat state buffers (writing them writes the state);
        the dicts are built afresh on each access.
        """
        out: list[dict] = [{} for _ in range(self._count)]
        for bucket in self._buckets:
            step = self._steps[bucket.group]
            for pos, i in enumerate(bucket.indices):
                entry = out[i]
                entry["step"] = step
                for name in _BUFFERS:
                    views = bucket.views[name]
                    if views is not None:
                        entry[name] = views[pos]
        return out

    def flat_state(self) -> list[dict]:
        """The flat state buffers, one dict per (group, dtype) bucket: ``group``, ``dtype``,
        ``params`` (parameter indices in buffer order), ``square_avg``, ``momentum_buffer`` and
        ``grad_avg`` (None when absent). For a FlatParams optimizer they line up element for
        element with ``flat.param_buffers[dtype]``."""
        return [{"group": b.group, "dtype": b.dtype, "params": list(b.indices), **b.state}
                for b in self._buckets]

    def state_dict(self) -> dict:
        """The optimizer state as builtins and NumPy arrays (copies), torch's layout:

        ``{"state": {i: {"step": int, "square_avg": array, ["momentum_buffer": array,]
        ["grad_avg": array]}}, "param_groups": [{hyperparameters..., "params": [i, ...]}]}``

        ``i`` numbers the parameters in group order. A callable ``lr`` is saved as ``None``;
        loading such a dict keeps the loading optimizer's own ``lr``. It pickles as it is; for
        ``np.savez`` flatten it with :func:`state_dict_to_arrays`.
        """
        groups = []
        for g, group in enumerate(self.param_groups):
            entry = {}
            for key in HYPERPARAMETERS:
                value = group[key]
                if key == "lr" and callable(value):
                    entry[key] = None
                else:
                    entry[key] = _as_builtin(value, f"param_groups[{g}][{key!r}]")
            entry["params"] = list(self._group_indices[g])
            groups.append(entry)
        state: dict[int, dict] = {}
        for bucket in self._buckets:
            step = self._steps[bucket.group]
            for pos, i in enumerate(bucket.indices):
                entry = {"step": step}
                for name in _BUFFERS:
                    views = bucket.views[name]
                    if views is not None:
                        entry[name] = views[pos].copy()
                state[i] = entry
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict) -> None:
        """Restore a :meth:`state_dict` (copying into the existing buffers).

        The dict must fit this optimizer: the same number of groups and parameters per group,
        each state array of its parameter's shape and dtype, exactly the keys state_dict()
        writes, valid hyperparameters and finite non-negative integral steps. Anything else
        raises ``TypeError``/``ValueError`` and leaves the optimizer unchanged: everything is
        checked before the first write.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        _exact_keys(state_dict, ("state", "param_groups"), "state_dict")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError("state_dict['param_groups'] must be a list")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}")
        new_hyper = []
        index_of: dict[int, int] = {}  # saved parameter id -> our parameter index
        for g, saved in enumerate(saved_groups):
            where = f"state_dict['param_groups'][{g}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where} must be a mapping, got {type(saved).__name__}")
            _exact_keys(saved, HYPERPARAMETERS + ("params",), where)
            ids = saved["params"]
            if not isinstance(ids, (list, tuple)):
                raise TypeError(f"{where}['params'] must be a list of parameter ids")
            ours = self._group_indices[g]
            if len(ids) != len(ours):
                raise ValueError(f"{where} has {len(ids)} parameters, this optimizer's group {g} "
                                 f"has {len(ours)}")
            for saved_id, i in zip(ids, ours):
                if isinstance(saved_id, bool) or not isinstance(saved_id, Integral):
                    raise TypeError(f"{where}['params'] must hold integers, got {saved_id!r}")
                if int(saved_id) in index_of:
                    raise ValueError(f"parameter id {saved_id} appears twice in state_dict")
                index_of[int(saved_id)] = i
            hyper = {key: saved[key] for key in HYPERPARAMETERS}
            if hyper["lr"] is None:
                hyper["lr"] = self.param_groups[g]["lr"]
            _check_hyperparameters(hyper, where)
            new_hyper.append(hyper)

        saved_state = state_dict["state"]
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
        own_buffers = [b for bucket in self._buckets for b in bucket.state.values()
                       if b is not None]
        new_steps = list(self._steps)
        group_step: dict[int, tuple[int, int]] = {}
        new_buffers = []  # per bucket: name -> list of arrays (or None)
        for bucket in self._buckets:
            hyper = new_hyper[bucket.group]
            required = {"momentum_buffer": hyper["momentum"] != 0 or self._always_momentum,
                        "grad_avg": bool(hyper["centered"])}
            arrays = {name: [] for name in _BUFFERS}
            present = {}
            for pos, i in enumerate(bucket.indices):
                where = f"state_dict['state'][{saved_id_of[i]}]"
                entry = entry_of[i]
                if not isinstance(entry, Mapping):
                    raise TypeError(f"{where} must be a mapping, got {type(entry).__name__}")
                unknown = set(entry) - _STATE_KEYS
                if unknown:
                    raise ValueError(f"{where} has unexpected keys {sorted(map(repr, unknown))}")
                for name in ("step", "square_avg"):
                    if name not in entry:
                        raise ValueError(f"{where} is missing {name!r}")
                step = _check_step(entry["step"], where)
                first = group_step.setdefault(bucket.group, (step, i))
                if first[0] != step:
                    raise ValueError(f"{where} has step {step} but parameter {first[1]} of the "
                                     f"same group has step {first[0]}; a group steps together")
                for name in _OPTIONAL_STATE:
                    has = name in entry
                    if required[name] and not has:
                        raise ValueError(f"{where} is missing {name!r}, which the saved "
                                         f"hyperparameters need")
                    if present.setdefault(name, has) != has:
                        raise ValueError(f"{where}: {name!r} is present for some parameters of "
                                         f"its group and dtype but not others")
                param = bucket.params[pos]
                for name in _BUFFERS:
                    if name in entry:
                        arrays[name].append(
                            _check_state_array(entry[name], param, f"{where}[{name!r}]",
                                               own_buffers))
            new_buffers.append({name: (arrays[name] if arrays[name] else None)
                                for name in _BUFFERS})
        for g, (step, _) in group_step.items():
            new_steps[g] = step

        # Everything fits: write.
        for group, hyper in zip(self.param_groups, new_hyper):
            group.update(hyper)
        changed = False
        for bucket, buffers in zip(self._buckets, new_buffers):
            for name in _OPTIONAL_STATE:
                if buffers[name] is None and bucket.state[name] is not None:
                    bucket.drop(name)
                    changed = True
                elif buffers[name] is not None and bucket.state[name] is None:
                    bucket.allocate(name, 0.0)
                    changed = True
            for name in _BUFFERS:
                if buffers[name] is not None:
                    for view, array in zip(bucket.views[name], buffers[name]):
                        np.copyto(view, array)
        self._steps = new_steps
        if changed:
            self._refresh_regions()

    def __repr__(self) -> str:
        lines = [f"RMSprop(preset={self.preset!r}, backend={self._backend!r}, "
                 f"{'FlatParams' if self._flat is not None else 'list'}"]
        for g, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={group[k]!r}" for k in HYPERPARAMETERS)
            lines.append(f"  group {g}: {len(group['params'])} params, {hyper}")
        return "\n".join(lines) + ")"


# -- state_dict <-> flat arrays (np.savez) -----------------------------------------------------

def state_dict_to_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Flatten :meth:`RMSprop.state_dict` into ``{name: ndarray}`` for ``np.savez``.

    Layout: ``"state/<id>/<key>"`` holds a state array, or the step as a 0-d int64 array;
    ``"param_groups/<g>/params"`` is a 1-d int64 array of ids; ``"param_groups/<g>/<key>"`` is a
    0-d array for a hyperparameter (float64 or bool), or an empty float64 array of shape (0,)
    for ``None`` (a callable lr). Nothing needs pickle. :func:`state_dict_from_arrays` inverts it.

    Example:
        >>> np.savez(path, **fastrms.state_dict_to_arrays(opt.state_dict()))
        >>> with np.load(path, allow_pickle=False) as saved:
        ...     opt.load_state_dict(fastrms.state_dict_from_arrays(saved))
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


# -- helpers -----------------------------------------------------------------------------------

def _split_params(params):
    """(FlatParams or None, list of raw group dicts)."""
    if isinstance(params, FlatParams):
        return params, [{"params": list(params.params)}]
    if isinstance(params, (np.ndarray, Mapping)) or not _iterable(params):
        raise TypeError("params must be a list of arrays, a list of parameter-group dicts or a "
                        f"FlatParams, got {type(params).__name__}")
    items = list(params)
    if not items:
        raise ValueError("RMSprop got an empty parameter list")
    dicts = [isinstance(item, Mapping) for item in items]
    if all(dicts):
        return None, [dict(item) for item in items]
    if any(dicts):
        raise TypeError("params mixes arrays and parameter-group dicts; use one or the other")
    return None, [{"params": items}]


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _make_group(g: int, raw: dict, defaults: dict, preset_name: str) -> dict:
    where = f"param_groups[{g}]"
    if "params" not in raw:
        raise ValueError(f"{where} has no 'params' key")
    unknown = set(raw) - set(HYPERPARAMETERS) - {"params"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(map(repr, unknown))}; a group may set "
                         f"'params' and {', '.join(HYPERPARAMETERS)}")
    params = raw["params"]
    if isinstance(params, FlatParams):
        raise TypeError(f"{where}: pass a FlatParams as the whole params argument, not inside "
                        f"a group")
    params = [params] if isinstance(params, np.ndarray) else list(params)
    group = dict(defaults)
    group.update((k, v) for k, v in raw.items() if k != "params")
    if "lr" not in group:
        raise TypeError(f"{where}: lr is required with preset {preset_name!r} (the framework "
                        f"has no default learning rate)")
    _check_hyperparameters(group, where)
    group["params"] = params
    return group


def _check_hyperparameters(hyper: Mapping, where: str) -> None:
    lr = hyper["lr"]
    try:
        if callable(lr):
            lr = 0.0  # a schedule is checked at each step, on the value it returns
        kernel_coefficients(np.float64, lr, hyper["alpha"], hyper["eps"], hyper["weight_decay"],
                            hyper["momentum"], hyper["centered"], hyper["maximize"],
                            hyper["eps_in_sqrt"], hyper["lr_in_momentum"], hyper["nesterov"],
                            hyper["decoupled_weight_decay"])
        check_real("initial_square_avg", hyper["initial_square_avg"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _check_param(p, where: str) -> None:
    check_param(p, where)
    if not p.flags.writeable:
        raise ValueError(f"{where} is read-only; parameters are updated in place")
    check_no_internal_overlap(**{where: p})


def _check_params_disjoint(params: list) -> None:
    """Parameters must not share memory: the multi-tensor kernel writes them concurrently.
    A sweep over byte ranges; exact (any strides) only where ranges meet."""
    spans = sorted((*_byte_bounds(p), i) for i, p in enumerate(params) if p.size)
    active: list[tuple[int, int]] = []
    for lo, hi, i in spans:
        active = [(end, j) for end, j in active if end > lo]
        for _, j in active:
            if np.shares_memory(params[i], params[j]):
                raise ValueError(f"parameters {j} and {i} (in group order) share memory; each "
                                 f"parameter must be its own buffer (was one passed twice?)")
        active.append((hi, i))


def _check_grad(k: int, g, dtype, shape) -> None:
    """The slow half of the per-gradient check: raise the precise error, or accept (an ndarray
    subclass, or an equal dtype that is not the same object)."""
    if not isinstance(g, np.ndarray):
        raise TypeError(f"grads[{k}] must be a numpy.ndarray, got {type(g).__name__}")
    if g.dtype != dtype:
        raise TypeError(f"grads[{k}] has dtype {g.dtype} but its parameter has dtype {dtype}")
    if g.shape != shape:
        raise ValueError(f"grads[{k}] has shape {g.shape} but its parameter has shape {shape}")


def _pointer_or_null(g):
    try:
        return _from_buffer(_CHAR_ARRAY, g)
    except (ValueError, BufferError):
        return _NULL


def _describe_written(opt: RMSprop, array) -> str:
    for i, p in enumerate(opt._params):
        if p is array:
            return f"parameter {i}"
    for bucket in opt._buckets:
        for name, buffer in bucket.state.items():
            if buffer is array:
                return f"the optimizer's {name} buffer (group {bucket.group}, {bucket.dtype})"
    return "memory the optimizer writes"  # pragma: no cover


_momentum_line_cache: dict = {}


def _with_momentum_line(coeffs: Coefficients, lr_in_momentum: bool) -> Coefficients:
    """TF1 runs the momentum line at momentum 0 too, so its buffer always holds the last update.
    The coefficients are kernel_coefficients' own (momentum 0); only the flags change."""
    key = (coeffs, bool(lr_in_momentum))
    forced = _momentum_line_cache.get(key)
    if forced is None:
        if len(_momentum_line_cache) > 256:  # a callable lr makes new coefficients every step
            _momentum_line_cache.clear()
        flags = coeffs.flags | MOMENTUM | (LR_IN_MOMENTUM if lr_in_momentum else 0)
        forced = _momentum_line_cache[key] = Coefficients(coeffs.values, flags, coeffs.dtype)
    return forced


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


#: Steps are saved as int64.
_STEP_LIMIT = 2 ** 63


def _check_state_array(array, param, where: str, own_buffers: list):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != param.dtype:
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
