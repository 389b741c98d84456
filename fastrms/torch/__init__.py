"""``fastrms.torch.RMSprop``: ``torch.optim.RMSprop`` on the fused kernel, a front end of the engine.

Change one import and a torch CPU training loop takes each optimizer step as one fused pass over
memory, with one kernel call per (parameter group, dtype) however many tensors the model has::

    from fastrms.torch import RMSprop          # instead of: from torch.optim import RMSprop

This package translates torch's world (tensors, ``param_groups``, ``opt.state``) into the
engine's terms (:mod:`fastrms.engine`): :mod:`._plan` decides what runs where, :mod:`._buckets`
and :mod:`._flat` keep the kernel's NumPy views of the tensors and check them at every step. The
kernel writes the tensors' own memory (the compiled backends release the GIL). Importing this
package imports torch; ``import fastrms`` alone never does.
"""
from __future__ import annotations

import threading

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only where torch is absent
    raise ImportError(
        "fastrms.torch needs PyTorch, which is not installed (pip install torch==2.13.0); "
        "the rest of fastrms works without it") from exc

from torch.optim import Optimizer

from .. import _dispatch
from ..engine import group_coefficients, resolve_module
from ..engine.compact import (DEFAULT_STATE_FORMAT, STATE_FORMAT, check_format_fits,
                              check_state_format)
from ._flat import FlatTensorBucket
from ._checkpoint import check_checkpoint
from ._functional import register as register_functional
from ..engine.interrupts import deliver_interrupts, hold_interrupts
from ..engine.precision import check_master_has_targets, check_precision_options
from ._plan import (CAPTURABLE, FASTRMS_OPTIONS, TORCH_PRECISION_OPTIONS, Plan, StepSlots,
                    _get_scalar_dtype, run_torch_jobs)
from ._compact import STATE_LAYOUTS, float32_layout
from ._tensors import KERNEL_DTYPES, LOW_PRECISION, fallback_reason

__all__ = ["FunctionalRMSprop", "RMSprop"]

_TORCH_GROUP_DEFAULTS = {"momentum": 0, "centered": False, "foreach": None, "maximize": False,
                         "differentiable": False, "capturable": False}


class RMSprop(torch.optim.RMSprop):
    """``torch.optim.RMSprop`` with the fused fastrms kernel for CPU float32, float64, bfloat16
    and float16 tensors.

    Takes exactly ``torch.optim.RMSprop``'s arguments (same names, order and defaults) and
    computes the same update, within a few ulp per step (torch's own float32 ``sqrt`` is not
    correctly rounded and its ``addcmul_`` fuses a multiply-add; fastrms rounds every line of
    the contract once, docs/contract.md). Keyword-only extras are fastrms's options: ``eps_in_sqrt``,
    ``lr_in_momentum``, ``nesterov``, ``decoupled_weight_decay`` (stored per parameter group,
    like torch's keys), ``backend`` (``"c"``, ``"numba"``, ``"numpy"`` or None for fastrms's
    automatic choice, which also honours ``fastrms.use_backend``) and ``flatten``.

    bfloat16 / float16 CPU tensors go to the kernel too (torch's implementation would keep
    their state in 16 bits): their state is float32 tensors, the update runs in float32
    exactly as :func:`fastrms.rmsprop_update`, and the new value is written back by the group
    options ``param_rounding`` (``"nearest"``, the default, or ``"stochastic"``) and ``seed``
    (default 0; parameter ``i`` of the state dict rounds with
    ``seed=fastrms.engine.precision.parameter_seed(seed, i)`` at its own step count).
    ``master_weights=True`` keeps a float32 copy of each 16-bit parameter in its state
    (``"master_param"``): the update runs on it and the parameter receives its nearest value.
    Their gradient may be of the parameter's dtype or float32. ``flatten`` leaves 16-bit
    parameters in place. ``load_state_dict`` keeps their float32 state float32 (torch would
    cast it to the parameter's dtype).

    ``state_format`` (a group option, in the state dict's groups) keeps the state of the
    kernel's float32 and 16-bit parameters compact: ``"float32"`` (the default), ``"bfloat16"``
    (bfloat16 tensors, round to nearest even) or ``"blockwise8"`` (per buffer ``name``, uint8
    ``name_codes`` and float32 ``name_scales`` tensors: one 8-bit code per element, unsigned
    for ``square_avg`` and signed for ``momentum_buffer`` / ``grad_avg``, one scale per 256
    elements). The update is the bits of :func:`fastrms.rmsprop_update` on that state. A
    compact group may hold no float64 parameter and none that torch's implementation would
    update. ``state_dict()`` holds the compact tensors (exact resume);
    ``state_dict(state_layout="float32")`` gives torch's float32 layout, and loading a float32
    checkpoint (``torch.optim.RMSprop``'s) into a compact optimizer quantizes it.

    One step makes one kernel call per (parameter group, dtype), over all that group's tensors
    of that dtype. ``step(closure)``, ``zero_grad``, parameter groups, LR schedulers (which
    change ``group["lr"]``), hooks and ``state_dict`` / ``load_state_dict`` behave as torch's.
    ``state_dict()`` has torch's layout: per parameter ``step`` (a scalar float32 tensor),
    ``square_avg``, ``momentum_buffer`` (when momentum > 0) and ``grad_avg`` (when centered),
    and the param_groups carry torch's keys plus the four fastrms options. Checkpoints therefore
    load in both directions: ``torch.optim.RMSprop`` ignores the extra keys (so a checkpoint
    that uses a fastrms-only option continues under torch's formula), and groups loaded from a
    torch checkpoint take the fastrms options given to this constructor. As with torch,
    ``load_state_dict`` keeps (does not copy) state tensors that already have the parameter's
    dtype and device. The optimizer reads its state again after ``load_state_dict`` or when a
    tensor in ``self.state`` or a parameter's ``.data`` was replaced.

    DTensor parameters (FSDP2's ``fully_shard`` on a CPU mesh, tensor parallelism) run on the
    kernel too: each rank updates its local shard (or replica) with its local gradient, which
    is exact since the update is elementwise, and ``self.state`` holds DTensors of the
    parameter's placements, as torch creates them, for ``torch.distributed.checkpoint``. A
    gradient of other placements is redistributed first (torch's DTensor ops would do the
    same); a parameter with a ``Partial`` placement goes to torch's implementation.
    ``flatten=True`` leaves DTensor parameters in place (their memory is FSDP's).

    Parameters the kernel cannot serve, and what happens to them:

    - on another device (CUDA, MPS, meta, ...), of another dtype (complex, integer, float8,
      ...), not dense in memory (a strided view such as ``w[:, ::2]``; dense permuted layouts
      such as channels_last do run on the kernel), a tensor subclass other than DTensor, or
      sharing memory with another parameter: updated by torch's own implementation
      (``torch.optim.rmsprop.rmsprop``) in the same step, with torch's state layout.
      ``unfused_parameters()`` lists them with the reason. A group that contains such a
      parameter may not use a fastrms-only option (torch has no such formula): that raises
      ``ValueError`` naming the parameter and the reason.
    - groups with ``differentiable=True``: updated entirely by torch's implementation, so that
      autograd can trace the update (the kernel writes memory autograd cannot see).
    - sparse gradients: ``RuntimeError("RMSprop does not support sparse gradients")``, as torch.
    - ``capturable=True``: ``ValueError`` (CUDA graph capture; this optimizer's kernel is CPU).
    - gradients whose layout differs from their parameter's, or that require grad
      (``backward(create_graph=True)``): read through a contiguous copy (or a detached view).

    ``foreach`` only concerns the parameters handed to torch. The kernel's threads are fastrms's
    (``fastrms.set_num_threads``), not torch's.

    ``flatten=True`` moves each group's kernel parameters of each dtype into one flat buffer
    (``p.data`` becomes a view of it, with ``p``'s shape and strides), keeps the state in flat
    buffers too, and after the first step makes each ``p.grad`` a view of a flat gradient buffer
    that backward accumulates into, so a step is exactly one fused call per (group, dtype).
    ``zero_grad()`` then zeroes the flat gradient buffer in place whatever ``set_to_none`` says
    (setting the views to None would detach them from the buffer): a parameter that the next
    backward does not reach takes a step with a zero gradient, as after torch's
    ``zero_grad(set_to_none=False)``. Gradients replaced by other code (``model.zero_grad()``
    sets them to None) are copied back into the buffer at the next step, which is correct but
    costs a copy. The results are bit-identical to ``flatten=False``.

    Example:
        >>> import torch, fastrms.torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
        ...                             torch.nn.Linear(16, 1))
        >>> opt = fastrms.torch.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        >>> x, y = torch.randn(32, 8), torch.randn(32, 1)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     opt.step()
        ...     sched.step()
        >>> torch.optim.RMSprop(model.parameters(), momentum=0.9).load_state_dict(
        ...     opt.state_dict())                       # and back: opt.load_state_dict(...)
    """

    #: torch.amp.GradScaler hands this optimizer the loss scale and its inf check (attributes
    #: ``grad_scale`` and ``found_inf`` during ``scaler.step(opt)``) instead of unscaling the
    #: gradients itself: the kernel unscales inside the fused pass (bit-identical to unscaling
    #: first: the scaler's scales are powers of two) and the whole step is skipped on an inf.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, eps_in_sqrt=False, lr_in_momentum=False,
                 nesterov=False, decoupled_weight_decay=False, backend=None, flatten=False,
                 param_rounding="nearest", seed=0, master_weights=False,
                 state_format=DEFAULT_STATE_FORMAT):
        # torch's checks and messages first: code written against torch sees torch's errors.
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        if capturable:
            raise ValueError(CAPTURABLE)
        if backend is not None:
            _dispatch.load_requested(backend, "backend argument")  # fail now, not at step()
        # Set before Optimizer.__init__, which calls add_param_group.
        self._backend = backend
        self._flatten = bool(flatten)
        self._plan = None
        self._slots = StepSlots()
        self._lock = threading.Lock()
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable,
                        eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
                        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay,
                        param_rounding=param_rounding, seed=seed, master_weights=master_weights,
                        state_format=state_format)
        check_precision_options(defaults, "RMSprop")
        check_state_format(state_format, "RMSprop")
        # torch.optim.RMSprop.__init__ would build torch's defaults only; the base class takes ours.
        Optimizer.__init__(self, params, defaults)
        # Build now: option conflicts surface here, and flatten moves the parameters now.
        self._valid_plan()

    # -- torch.optim.Optimizer protocol ------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        if group["capturable"]:
            del self.param_groups[index]
            raise ValueError(CAPTURABLE)
        try:
            for dtype in KERNEL_DTYPES.values():
                self._coefficients(group, index, dtype)
            where = f"param_groups[{index}]"
            if check_precision_options(group, where)[2]:
                check_master_has_targets(group, [KERNEL_DTYPES.get(p.dtype) for p in
                                                 group["params"]], where)
            group[STATE_FORMAT] = check_state_format(group[STATE_FORMAT], where)
            check_format_fits(group[STATE_FORMAT], [KERNEL_DTYPES.get(p.dtype) for p in
                                                    group["params"]], where)
        except (TypeError, ValueError):
            del self.param_groups[index]
            raise
        self._plan = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_backend"] = self._backend
        state["_flatten"] = self._flatten
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # Unpickling gives only what __getstate__ saved; load_state_dict passes state and groups.
        self.__dict__.setdefault("_backend", None)
        self.__dict__.setdefault("_flatten", False)
        self.__dict__.setdefault("_slots", StepSlots())
        self.__dict__.setdefault("_lock", threading.Lock())
        self._plan = None
        for key, value in {**FASTRMS_OPTIONS, **TORCH_PRECISION_OPTIONS}.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            for key, value in _TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            # A torch checkpoint does not say; the options this optimizer was built with apply.
            for key in (*FASTRMS_OPTIONS, *TORCH_PRECISION_OPTIONS):
                group.setdefault(key, self.defaults[key])
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and not torch.is_tensor(p_state.get("step", 0)):
                    p_state["step"] = torch.tensor(float(p_state["step"]),
                                                   dtype=_get_scalar_dtype())

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; with ``flatten=True`` the gradients that are
        views of the flat gradient buffers are zeroed in place instead (see the class doc)."""
        if not self._flatten:
            return super().zero_grad(set_to_none)
        plan = self._valid_plan()
        ours = set()
        with torch.no_grad():
            for bucket in plan.buckets:
                if isinstance(bucket, FlatTensorBucket):
                    ours.update(bucket.zero_grads())
            for group in self.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None or id(g) in ours:
                        continue
                    if set_to_none:
                        p.grad = None
                    else:
                        if g.grad_fn is not None:
                            g.detach_()
                        else:
                            g.requires_grad_(False)
                        g.zero_()

    @torch._disable_dynamo
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the
                loss; it runs under ``torch.enable_grad()``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock:  # steps from two threads at once run one after the other
            # torch.amp.GradScaler's protocol for fused optimizers: it sets these two for the
            # length of the step (see _step_supports_amp_scaling).
            found_inf = getattr(self, "found_inf", None)
            if found_inf is not None and float(found_inf) != 0.0:
                return loss  # an inf or NaN in the scaled gradients: skip the whole step
            grad_scale = getattr(self, "grad_scale", None)
            if grad_scale is not None:
                grad_scale = float(grad_scale)
            plan, (kernel_jobs, torch_jobs) = self._prepare(grad_scale)
            held = hold_interrupts()  # the kernel's tensors and torch's: one step under Ctrl-C
            try:
                plan.engine.run(kernel_jobs)
                if torch_jobs:
                    run_torch_jobs(torch_jobs, self.defaults["differentiable"], grad_scale)
            finally:
                if held:
                    deliver_interrupts()
        return loss

    @torch._disable_dynamo
    def state_dict(self, state_layout: str = "stored") -> dict:
        """As ``torch.optim.Optimizer.state_dict``. ``state_layout="stored"`` (the default)
        holds the state as this optimizer keeps it (compact state as its tensors: exact
        resume); ``state_layout="float32"`` gives ``torch.optim.RMSprop``'s layout instead:
        every buffer of a group with compact state decoded to a float32 tensor of its
        parameter's shape, and no ``state_format`` key in the groups (so any RMSprop, torch's or
        this one in any state format, loads it)."""
        if not isinstance(state_layout, str) or state_layout not in STATE_LAYOUTS:
            raise ValueError(f"state_layout must be one of {', '.join(map(repr, STATE_LAYOUTS))}"
                             f", got {state_layout!r}")
        saved = super().state_dict()
        if state_layout == "stored":
            return saved
        formats = {}
        for saved_group, group in zip(saved["param_groups"], self.param_groups):
            state_format = group.get(STATE_FORMAT, DEFAULT_STATE_FORMAT)
            for saved_id, p in zip(saved_group["params"], group["params"]):
                formats[saved_id] = (state_format, p)
        return float32_layout(saved, formats)

    def load_state_dict(self, state_dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, after checking that every saved state
        tensor has its parameter's shape (torch would broadcast some of them silently) and that
        no entry misses ``step`` or ``square_avg``: a checkpoint that does not fit raises
        ``ValueError`` / ``KeyError`` and leaves the optimizer unchanged.

        Compact state: a group keeps its ``state_format``; a saved group naming another one is
        refused. Its blockwise8 codes and scales (or bfloat16 tensors) are checked (dtype,
        length, finite non-negative scales) and loaded as they are; float32 state (a
        ``torch.optim.RMSprop`` checkpoint, or ``state_dict(state_layout="float32")``) is
        quantized into the group's format."""
        with self._lock:
            formats = [group.get(STATE_FORMAT, DEFAULT_STATE_FORMAT)
                       for group in self.param_groups]
            check_checkpoint(self.param_groups, state_dict, formats)
            super().load_state_dict(state_dict)
            for group, state_format in zip(self.param_groups, formats):
                group[STATE_FORMAT] = state_format
            self._keep_float32_state(state_dict)
            self._plan = None
            if any(f != DEFAULT_STATE_FORMAT for f in formats):
                self._valid_plan()  # quantize float32 state now: state_dict() shows it

    def _keep_float32_state(self, state_dict) -> None:
        """torch's load_state_dict casts state to its parameter's dtype; the state of a 16-bit
        parameter that the kernel serves is float32 (its master copy above all): take the
        saved float32 values back, not their 16-bit roundings."""
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g, group in zip(state_dict["param_groups"], self.param_groups)
                  for p in group["params"]]
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for saved_id, p in zip(ids, params):
            saved = state_dict["state"].get(saved_id)
            group = group_of[id(p)]
            # Compact state is taken back as saved (torch casts uint8 codes to float, too).
            compact = group.get(STATE_FORMAT, DEFAULT_STATE_FORMAT) != DEFAULT_STATE_FORMAT
            if (p.dtype not in LOW_PRECISION and not compact) or not saved or \
                    fallback_reason(p, group) is not None:
                continue
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and \
                        (compact or value.dtype == torch.float32):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    # -- introspection -----------------------------------------------------------------------

    def unfused_parameters(self) -> list[tuple[int, torch.Tensor, str]]:
        """``(group index, parameter, reason)`` for each parameter that torch's implementation
        updates instead of the fused kernel (see the class doc for the cases)."""
        plan = self._valid_plan()
        return [(g, p, reason) for g, gp in enumerate(plan.groups) for p, reason in gp.fallback]

    # -- the plan: what runs where, cached between steps ---------------------------------------

    def _valid_plan(self) -> Plan:
        plan = self._plan
        if plan is None or not plan.matches(self):
            with torch.no_grad():
                plan = self._plan = Plan(self, self._slots)
        return plan

    def _prepare(self, grad_scale=None):
        """Everything a step needs, checked, before anything is updated: the plan and its
        ``(kernel jobs, torch jobs)``. Rebuilds the plan once if a parameter or its state
        changed since the last step."""
        def coefficients(group, index, dtype, size):
            return self._coefficients(group, index, dtype, size, grad_scale)

        for _ in range(2):
            plan = self._valid_plan()
            jobs = plan.jobs(coefficients)
            if jobs is not None:
                return plan, jobs
            self._plan = None
        raise RuntimeError("fastrms.torch.RMSprop: the parameters kept changing while a step "
                           "was being prepared")  # pragma: no cover

    def _coefficients(self, group: dict, index: int, dtype, size: int = 0, grad_scale=None):
        """The group's coefficients for one dtype, through fastrms's one conversion, and the
        backend module for a bucket of ``size`` elements."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        group = dict(group, centered=bool(group["centered"]), maximize=bool(group["maximize"]))
        coeffs = group_coefficients(group, dtype, lr, f"param_groups[{index}]", grad_scale)
        return coeffs, resolve_module(self._backend, size, dtype, coeffs.flags)


class FunctionalRMSprop(RMSprop):
    """:class:`RMSprop` as ``ZeroRedundancyOptimizer(..., overlap_with_ddp=True)`` drives it:
    ``step(gradients)`` takes one gradient per parameter of its single group (None: leave that
    parameter alone) instead of reading ``.grad``, and an empty parameter list is allowed. You
    do not construct it yourself: ZeroRedundancyOptimizer picks it for
    ``optimizer_class=fastrms.torch.RMSprop`` from torch's table of functional optimizers.

    >>> import torch, fastrms.torch
    >>> a, b = torch.ones(2), torch.ones(2)
    >>> opt = fastrms.torch.FunctionalRMSprop([a, b], lr=0.01)
    >>> opt.step([torch.ones(2), None])  # b has no gradient this time
    >>> a, b
    (tensor([0.9000, 0.9000]), tensor([1., 1.]))
    >>> a.grad is None
    True
    """

    def __init__(self, params, *args, _allow_empty_param_list: bool = False, **kwargs):
        params = list(params)
        if not params and _allow_empty_param_list:
            params = [{"params": []}]  # torch.optim.Optimizer refuses an empty list
        super().__init__(params, *args, **kwargs)

    @torch._disable_dynamo
    def step(self, gradients=None, closure=None):
        """One step with ``gradients`` in place of the parameters' ``.grad`` (which are left
        as they were); without ``gradients``, :meth:`RMSprop.step`."""
        if gradients is None:
            return super().step(closure)
        params = [p for group in self.param_groups for p in group["params"]]
        gradients = list(gradients)
        if len(gradients) != len(params):
            raise ValueError(f"gradients has {len(gradients)} entries but the optimizer has "
                             f"{len(params)} parameters")
        kept = [p.grad for p in params]
        try:
            for p, g in zip(params, gradients):
                p.grad = g
            return super().step(closure)
        finally:
            for p, g in zip(params, kept):
                p.grad = g


register_functional(RMSprop, FunctionalRMSprop)
