"""``fastrms.RMSprop``: a torch-style optimizer over NumPy arrays, a front end of the engine.

This module translates NumPy's world into the engine's terms (:mod:`fastrms.engine`): a list of
arrays, parameter-group dicts or a :class:`~fastrms.FlatParams` become one bucket per
(group, dtype), the gradients a list checked once per step; the engine checks, plans and runs the
step. Checkpoints live in :mod:`fastrms.checkpoint`.
"""
from __future__ import annotations

import operator
import threading
from collections.abc import Mapping

import numpy as np

from . import _dispatch, checkpoint, presets
from ._blockwise import Blockwise8
from ._coefficients import check_real
from ._validation import check_no_internal_overlap, check_param
from .checkpoint import state_dict_from_arrays, state_dict_to_arrays
from .engine import (HYPERPARAMETERS, STATE_BUFFERS, ArrayGradients, Bucket, Engine, StepCounts,
                     check_hyperparameters, check_params_disjoint)
from .engine.compact import (DEFAULT_STATE_FORMAT, STATE_FORMAT, check_format_fits,
                             check_state_format, group_state_format)
from .engine.precision import (MASTER, PRECISION_DEFAULTS, PRECISION_OPTIONS,
                               check_master_has_targets, check_precision_options)
from .flat import PARAM_DTYPES, FlatParams

#: Every key of a parameter group besides "params", in state_dict order.
GROUP_KEYS = HYPERPARAMETERS + PRECISION_OPTIONS + (STATE_FORMAT,)
_STATE_NAMES = STATE_BUFFERS + (MASTER,)

__all__ = ["GROUP_KEYS", "HYPERPARAMETERS", "RMSprop", "state_dict_from_arrays", "state_dict_to_arrays"]


class _Default:
    """Marks an argument the caller did not give, so that the preset's value applies."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<preset default>"


_DEFAULT = _Default()


class RMSprop:
    """RMSprop over NumPy arrays, torch.optim-style, one fused kernel call per (group, dtype).

    Signature defaults are the preset's (``preset=None`` is torch's): lr=1e-2, alpha=0.99,
    eps=1e-8, weight_decay=0, momentum=0, centered=False, maximize=False, eps_in_sqrt=False,
    lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False, initial_square_avg=0.
    ``preset="keras" | "tf1" | "optax"`` starts from that framework's defaults and conventions
    instead (table in :mod:`fastrms.presets`; tf1 and optax have no default lr, so it must be
    given); any argument given explicitly overrides the preset. The update itself is the contract's
    (docs/contract.md), the same bits as :func:`fastrms.rmsprop_update`.

    ``params`` is one of
      - a list of float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``) arrays of any
        shapes (dtypes may mix), updated in place;
      - a list of parameter-group dicts, ``{"params": [...], "lr": 3e-3, ...}``, each key
        overriding the defaults for that group (keys: ``"params"`` and :data:`GROUP_KEYS`);
      - a :class:`fastrms.FlatParams`: then ``step()`` takes no argument, reads ``flat.grads``,
        and makes one fused call per dtype.

    ``step(grads)`` takes one gradient per parameter, in group order: an array of the
    parameter's shape and dtype (no casting; float32 also for a 16-bit parameter). C-contiguous, aligned gradients are read in place;
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

    float16 / bfloat16 parameters keep float32 state and are updated as by
    :func:`fastrms.rmsprop_update` (float32 arithmetic), written back by the group options
    ``param_rounding`` (``"nearest"``, the default, or ``"stochastic"``) and ``seed`` (an int in
    [0, 2**64), default 0, saved in the state dict): parameter ``i`` at its ``t``-th step rounds
    with ``seed=parameter_seed(seed, i), step=t`` (:mod:`fastrms.engine.precision`), so a
    resumed run continues the same random stream. ``master_weights=True`` keeps a float32 copy
    of each 16-bit parameter (state key ``"master_param"``, in checkpoints too); the update runs
    on it and the parameter receives its nearest 16-bit value. It needs a 16-bit parameter in
    its group and nearest rounding. float32 / float64 parameters are written exactly whatever
    these options say.

    ``state_format`` (a group option, saved in the state dict) stores the state compactly:
    ``"float32"`` (the default), ``"bfloat16"`` (bfloat16 arrays, rounded to nearest even) or
    ``"blockwise8"`` (one :class:`fastrms.Blockwise8` per parameter and buffer: uint8 codes,
    unsigned for ``square_avg`` and signed for ``momentum_buffer`` / ``grad_avg``, one float32
    scale per 256 elements). Each step decodes, updates in float32 and re-encodes in one pass,
    the bits of :func:`fastrms.rmsprop_update` on the same state; it goes with float32 and
    16-bit parameters (master weights stay float32) and every option, not with float64
    parameters. A blockwise8 buffer ``name`` is saved as ``name_codes`` and ``name_scales``
    (exact resume); the format is fixed at construction. docs/compact-state.md has the details.

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
        >>> import ml_dtypes
        >>> h = np.ones(4, ml_dtypes.bfloat16)
        >>> low = fastrms.RMSprop([h], lr=1e-3, param_rounding="stochastic", seed=7)
        >>> low.step([np.full(4, 0.5, np.float32)])
        True
        >>> low.state_dict()["param_groups"][0]["seed"]
        7
        >>> small = fastrms.RMSprop([np.ones(300, np.float32)], state_format="blockwise8")
        >>> small.step([np.full(300, 0.5, np.float32)])
        True
        >>> sorted(small.state_dict()["state"][0])
        ['square_avg_codes', 'square_avg_scales', 'step']
    """

    def __init__(self, params, lr=_DEFAULT, alpha=_DEFAULT, eps=_DEFAULT, weight_decay=_DEFAULT,
                 momentum=_DEFAULT, centered=_DEFAULT, maximize=_DEFAULT, *,
                 eps_in_sqrt=_DEFAULT, lr_in_momentum=_DEFAULT, nesterov=_DEFAULT,
                 decoupled_weight_decay=_DEFAULT, initial_square_avg=_DEFAULT, preset=None,
                 backend=None, skip_nonfinite=False, param_rounding="nearest", seed=0,
                 master_weights=False, state_format=DEFAULT_STATE_FORMAT):
        preset_row = presets.get(preset)
        given = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                     centered=centered, maximize=maximize, eps_in_sqrt=eps_in_sqrt,
                     lr_in_momentum=lr_in_momentum, nesterov=nesterov,
                     decoupled_weight_decay=decoupled_weight_decay,
                     initial_square_avg=initial_square_avg)
        defaults = preset_row.defaults()
        defaults.update((k, v) for k, v in given.items() if v is not _DEFAULT)
        defaults.update(param_rounding=param_rounding, seed=seed, master_weights=master_weights,
                        state_format=state_format)
        check_precision_options(defaults, "RMSprop")
        check_state_format(state_format, "RMSprop")
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
            check_master_has_targets(group, [p.dtype for p in group["params"]],
                                     f"param_groups[{g}]")
            check_format_fits(group[STATE_FORMAT], [p.dtype for p in group["params"]],
                              f"param_groups[{g}]")
            all_params.extend(group["params"])
            self.param_groups.append(group)
        if not all_params:
            raise ValueError("RMSprop got an empty parameter list")
        if self._flat is None:
            check_params_disjoint(all_params, lambda j, i: (
                f"parameters {j} and {i} (in group order) share memory; each parameter must be "
                f"its own buffer (was one passed twice?)"))
        self._params = all_params
        self._lock = threading.Lock()
        self._build()

    def _build(self) -> None:
        """One bucket per (group, dtype), its state at its initial values, and the engine."""
        counts = StepCounts(np.int64, chunk_size=len(self._params))
        buckets, self._bucket_indices, self._group_indices = [], [], []
        start = 0
        for g, group in enumerate(self.param_groups):
            indices = list(range(start, start + len(group["params"])))
            start += len(indices)
            self._group_indices.append(indices)
            by_dtype: dict[np.dtype, list[int]] = {}
            for i in indices:
                by_dtype.setdefault(self._params[i].dtype, []).append(i)
            for dtype, members in by_dtype.items():
                flat = self._flat
                # Our own views of the parameters: code that reassigns an array's shape, strides
                # or dtype in place cannot change what the kernel walks (the memory is fixed).
                bucket = Bucket(g, dtype, [self._params[i][...] for i in members], counts,
                                [counts.new_slot() for _ in members],
                                flat.param_buffers[dtype] if flat is not None else None,
                                flat.grad_buffers[dtype] if flat is not None else None,
                                ids=members, state_format=group[STATE_FORMAT])
                bucket.allocate_initial(group, self._always_momentum)
                buckets.append(bucket)
                self._bucket_indices.append(members)
        self._engine = Engine(buckets, len(self.param_groups), backend=self._backend,
                              always_momentum=self._always_momentum,
                              describe=self._describe_written)
        # A C-level gather of each bucket's gradients (and their addresses) from the lists of
        # all of them; None for a bucket that holds every parameter in order (the usual case).
        everything = list(range(len(self._params)))
        self._takes = [None if members == everything else
                       (lambda grads, only=members[0]: (grads[only],)) if len(members) == 1
                       else operator.itemgetter(*members) for members in self._bucket_indices]
        self._index_arrays = [None if members == everything else np.array(members, dtype=np.intp)
                              for members in self._bucket_indices]
        params = self._params
        self._grads = ArrayGradients([p.dtype for p in params], [p.shape for p in params],
                                     [p.itemsize for p in params], self._engine,
                                     lambda k: f"grads[{k}]")

    def _describe_written(self, array) -> str:
        for bucket, indices in zip(self._engine.buckets, self._bucket_indices):
            for i, p in zip(indices, bucket.params):
                if p is array:
                    return f"parameter {i}"
        for bucket in self._engine.buckets:
            for name, arrays in bucket.state.items():
                if arrays is not None and any(a is array or getattr(a, "codes", None) is array
                                              or getattr(a, "scales", None) is array
                                              for a in arrays):
                    return f"the optimizer's {name} buffer (group {bucket.group}, {bucket.dtype})"
        return "memory the optimizer writes"  # pragma: no cover

    # -- the step ----------------------------------------------------------------------------

    def step(self, grads=None, *, grad_scale=None) -> bool:
        """Apply one update; return True, or False for a step skipped by ``skip_nonfinite``.

        ``grads``: one array per parameter, in group order (omit it for an optimizer over
        FlatParams, which reads ``flat.grads``). ``grad_scale``: the loss scale the gradients
        carry; the kernels divide every gradient by it inside the fused pass, with the bits of
        dividing first in the dtype. With ``skip_nonfinite``, a step whose (unscaled) gradients
        hold a NaN or an infinity changes nothing at all, step counts included.
        """
        with self._lock:  # steps from two threads at once run one after the other
            return self._step(grads, grad_scale)

    def _step(self, grads, grad_scale) -> bool:
        if grad_scale is not None:
            check_real("grad_scale", grad_scale)
        engine = self._engine
        if self._flat is not None:
            if grads is not None:
                raise TypeError("this optimizer was built on a FlatParams: fill flat.grads in "
                                "place and call step() with no argument")
            jobs = [(bucket, coeffs, module, None, None)
                    for bucket, coeffs, module in engine.plan(self.param_groups, grad_scale)]
        else:
            if not isinstance(grads, (list, tuple)):
                if grads is None:
                    raise TypeError("step() needs the gradients: a list with one array per "
                                    "parameter")
                if isinstance(grads, (np.ndarray, FlatParams)):
                    raise TypeError(f"grads must be a list of arrays, one per parameter, got "
                                    f"{type(grads).__name__}")
                grads = list(grads)
            grads, addresses = self._grads.check(grads)
            plan = engine.plan(self.param_groups, grad_scale)
            jobs = [(bucket, coeffs, module, grads, addresses) if take is None else
                    (bucket, coeffs, module, take(grads), addresses[index])
                    for (bucket, coeffs, module), take, index in
                    zip(plan, self._takes, self._index_arrays)]
        return engine.run(jobs, self.skip_nonfinite)

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> list[dict]:
        """Per parameter (index in group order): ``{"step": int, "square_avg": array, ...}``.

        The arrays are live views of the flat state buffers (writing them writes the state);
        the dicts are built afresh on each access.
        """
        out: list[dict] = [{} for _ in self._params]
        for bucket, indices in zip(self._engine.buckets, self._bucket_indices):
            for pos, i in enumerate(indices):
                entry = out[i]
                entry["step"] = int(bucket.step_count(pos))
                for name in _STATE_NAMES:
                    arrays = bucket.state[name]
                    if arrays is not None:
                        state = arrays[pos]  # a Blockwise8 is given as it is (live)
                        entry[name] = state if isinstance(state, Blockwise8) else state[...]
        return out

    def flat_state(self) -> list[dict]:
        """The flat state buffers, one dict per (group, dtype) bucket: ``group``, ``dtype``,
        ``params`` (parameter indices in buffer order), ``square_avg``, ``momentum_buffer`` and
        ``grad_avg`` (None when absent), and for a 16-bit bucket ``master_param``. For a
        FlatParams optimizer they line up element for element with
        ``flat.param_buffers[dtype]``. With ``state_format="blockwise8"`` each state buffer is
        the list of the parameters' own :class:`~fastrms.Blockwise8` buffers (live)."""
        return [{"group": b.group, "dtype": b.dtype, "params": list(indices),
                 **{name: (list(b.state[name]) if b.flat[name] is None and
                           b.state[name] is not None else
                           None if b.flat[name] is None else b.flat[name][...])
                    for name in STATE_BUFFERS},
                 **({MASTER: None if b.flat[MASTER] is None else b.flat[MASTER][...]}
                    if b.low_precision else {})}
                for b, indices in zip(self._engine.buckets, self._bucket_indices)]

    def state_dict(self) -> dict:
        """The optimizer state as builtins and NumPy arrays (copies), torch's layout:

        ``{"state": {i: {"step": int, "square_avg": array, ["momentum_buffer": array,]
        ["grad_avg": array]}}, "param_groups": [{hyperparameters..., "params": [i, ...]}]}``

        With a float16 / bfloat16 parameter, every group also holds ``param_rounding``,
        ``seed`` and ``master_weights`` (the keys of :data:`GROUP_KEYS`), and those
        parameters' entries ``master_param`` when master weights are on; a float32 / float64
        optimizer's groups hold :data:`HYPERPARAMETERS` only.

        ``i`` numbers the parameters in group order. A callable ``lr`` is saved as ``None``;
        loading such a dict keeps the loading optimizer's own ``lr``. It pickles as it is; for
        ``np.savez`` flatten it with :func:`state_dict_to_arrays`.
        """
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict) -> None:
        """Restore a :meth:`state_dict` (copying into the existing buffers).

        The dict must fit this optimizer: the same number of groups and parameters per group,
        each state array of its parameter's shape and dtype, exactly the keys state_dict()
        writes, valid hyperparameters and finite non-negative integral steps. Anything else
        raises ``TypeError``/``ValueError`` and leaves the optimizer unchanged: everything is
        checked before the first write.
        """
        checkpoint.load_state_dict(self, state_dict)

    def __getstate__(self) -> dict:
        """What ``pickle`` and ``copy.deepcopy`` carry: the parameters, the options and the
        state dict; unpickling builds the optimizer again (the backends' caches are rebuilt)."""
        groups = [dict(group) for group in self.param_groups]
        return {"params": self._flat if self._flat is not None else groups,
                "defaults": self.defaults, "preset": self.preset, "backend": self._backend,
                "skip_nonfinite": self.skip_nonfinite, "state": self.state_dict()}

    def __setstate__(self, saved: dict) -> None:
        defaults = dict(PRECISION_DEFAULTS)
        defaults.update(saved["defaults"])
        self.__init__(saved["params"], preset=saved["preset"], backend=saved["backend"],
                      skip_nonfinite=saved["skip_nonfinite"], **defaults)
        self.load_state_dict(saved["state"])

    def __repr__(self) -> str:
        layout = "FlatParams" if self._flat is not None else "list"
        lines = [f"RMSprop(preset={self.preset!r}, backend={self._backend!r}, "
                 f"skip_nonfinite={self.skip_nonfinite}, layout={layout!r},"]
        for g, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={group[k]!r}" for k in GROUP_KEYS)
            lines.append(f"  group {g}: {len(group['params'])} params, {hyper}")
        return "\n".join(lines) + ")"


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
    unknown = set(raw) - set(GROUP_KEYS) - {"params"}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(map(repr, unknown))}; a group may set "
                         f"'params' and {', '.join(GROUP_KEYS)}")
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
    check_hyperparameters(group, where)
    check_precision_options(group, where)
    group[STATE_FORMAT] = group_state_format(group, where)
    group["params"] = params
    return group


def _check_param(p, where: str) -> None:
    if not (isinstance(p, np.ndarray) and p.dtype in PARAM_DTYPES):
        check_param(p, where, accepted="float32, float64, float16 or bfloat16")
    if not p.flags.writeable:
        raise ValueError(f"{where} is read-only; parameters are updated in place")
    check_no_internal_overlap(**{where: p})
