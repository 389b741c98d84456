"""``fastrms.torch.RMSprop``: ``torch.optim.RMSprop`` on the fused kernel, for CPU training loops.

Change one import and a torch CPU training loop takes each optimizer step as one fused pass over
memory, with one kernel call per (parameter group, dtype) however many tensors the model has::

    from fastrms.torch import RMSprop          # instead of: from torch.optim import RMSprop

The kernel writes the tensors' own memory through zero-copy NumPy views (the compiled backends
release the GIL). Importing this module imports torch; ``import fastrms`` alone never does.
"""
from __future__ import annotations

import operator

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only where torch is absent
    raise ImportError(
        "fastrms.torch needs PyTorch, which is not installed (pip install torch==2.13.0); "
        "the rest of fastrms works without it") from exc

import numpy as np
from torch.optim import Optimizer
from torch.optim.rmsprop import rmsprop as _torch_rmsprop

from . import _dispatch
from ._coefficients import kernel_coefficients

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - a torch without it stores float32 steps
    def _get_scalar_dtype():
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

__all__ = ["RMSprop"]

#: fastrms's options beyond torch's, stored in each parameter group like torch's own keys.
FASTRMS_OPTIONS = {"eps_in_sqrt": False, "lr_in_momentum": False, "nesterov": False,
                   "decoupled_weight_decay": False}
_TORCH_GROUP_DEFAULTS = {"momentum": 0, "centered": False, "foreach": None, "maximize": False,
                         "differentiable": False, "capturable": False}
_KERNEL_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_BUFFERS = ("square_avg", "momentum_buffer", "grad_avg")
_CAPTURABLE = ("capturable=True is for CUDA graph capture, and fastrms.torch.RMSprop runs its "
               "kernel on CPU; leave capturable=False (torch itself refuses capturable CPU "
               "parameters)")
_SPARSE = "RMSprop does not support sparse gradients"  # torch's message, for code that matches it

_get_grad = operator.attrgetter("grad")
_get_shape = operator.attrgetter("shape")
_get_strides = operator.attrgetter("strides")
_data_ptr = torch.Tensor.data_ptr
_to_numpy = torch.Tensor.numpy
_get_dtype = operator.attrgetter("dtype")
_get_is_cpu = operator.attrgetter("is_cpu")
_is_contiguous = torch.Tensor.is_contiguous
_is_neg = torch.Tensor.is_neg
_is = operator.is_
_STALE = object()  # what a bucket returns when a parameter or its state changed under it


class RMSprop(Optimizer):
    """``torch.optim.RMSprop`` with the fused fastrms kernel for CPU float32 / float64 tensors.

    Takes exactly ``torch.optim.RMSprop``'s arguments (same names, order and defaults) and
    computes the same update, within a few ulp per step (torch's own float32 ``sqrt`` is not
    correctly rounded and its ``addcmul_`` fuses a multiply-add; fastrms rounds every line of
    SPEC.md once). Keyword-only extras are fastrms's options: ``eps_in_sqrt``,
    ``lr_in_momentum``, ``nesterov``, ``decoupled_weight_decay`` (stored per parameter group,
    like torch's keys), ``backend`` (``"c"``, ``"numba"``, ``"numpy"`` or None for fastrms's
    automatic choice, which also honours ``fastrms.use_backend``) and ``flatten``.

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

    Parameters the kernel cannot serve, and what happens to them:

    - on another device (CUDA, MPS, meta, ...), of another dtype (float16, bfloat16, complex,
      ...), not dense in memory (a strided view such as ``w[:, ::2]``; dense permuted layouts
      such as channels_last do run on the kernel), a tensor subclass, or sharing memory with
      another parameter: updated by torch's own implementation (``torch.optim.rmsprop.rmsprop``)
      in the same step, with torch's state layout. ``unfused_parameters()`` lists them with the
      reason. A group that contains such a parameter may not use a fastrms-only option (torch has
      no such formula): that raises ``ValueError`` naming the parameter and the reason.
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

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, eps_in_sqrt=False, lr_in_momentum=False,
                 nesterov=False, decoupled_weight_decay=False, backend=None, flatten=False):
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
            raise ValueError(_CAPTURABLE)
        if backend is not None:
            _dispatch.load_requested(backend, "backend argument")  # fail now, not at step()
        # Set before Optimizer.__init__, which calls add_param_group.
        self._backend = backend
        self._flatten = bool(flatten)
        self._plan = None
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable,
                        eps_in_sqrt=eps_in_sqrt, lr_in_momentum=lr_in_momentum,
                        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)
        # Build now: option conflicts surface here, and flatten moves the parameters now.
        self._valid_plan()

    # -- torch.optim.Optimizer protocol ------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        if group["capturable"]:
            del self.param_groups[index]
            raise ValueError(_CAPTURABLE)
        try:
            for dtype in _KERNEL_DTYPES.values():
                _coefficients(group, dtype, index)
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
        self._plan = None
        for key, value in FASTRMS_OPTIONS.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            for key, value in _TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            # A torch checkpoint does not say; the options this optimizer was built with apply.
            for key in FASTRMS_OPTIONS:
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
            for bucket in plan.buckets():
                installed = [v for v in bucket.grad_views if v is not None]
                if installed:
                    bucket.flat["grad"].zero_()  # one memset for the whole bucket
                    ours.update(map(id, installed))
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
        kernel_jobs, torch_jobs = self._prepare()
        for run, arguments, steps, increment in kernel_jobs:
            run(*arguments)
            steps.add_(increment)
        if torch_jobs:
            with torch.set_grad_enabled(self.defaults["differentiable"]):
                for arguments, options in torch_jobs:
                    _torch_rmsprop(*arguments, **options)
        return loss

    # -- introspection -----------------------------------------------------------------------

    def unfused_parameters(self) -> list[tuple[int, torch.Tensor, str]]:
        """``(group index, parameter, reason)`` for each parameter that torch's implementation
        updates instead of the fused kernel (see the class doc for the cases)."""
        plan = self._valid_plan()
        return [(g, p, reason) for g, gp in enumerate(plan.groups) for p, reason in gp.fallback]

    # -- the plan: what runs where, cached between steps ---------------------------------------

    def _valid_plan(self) -> _Plan:
        plan = self._plan
        if plan is None or not plan.matches(self):
            with torch.no_grad():
                plan = self._plan = _Plan(self)
        return plan

    def _prepare(self):
        """Everything a step needs, checked, before anything is updated: ``(kernel jobs, torch
        jobs)``. Rebuilds the plan once if a parameter or its state changed since the last step."""
        for _ in range(2):
            jobs = self._jobs(self._valid_plan())
            if jobs is not None:
                return jobs
            self._plan = None
        raise RuntimeError("fastrms.torch.RMSprop: the parameters kept changing while a step "
                           "was being prepared")  # pragma: no cover

    def _jobs(self, plan: _Plan):
        """The step's jobs under ``plan``, or None when the plan no longer fits."""
        kernel_jobs, torch_jobs = [], []
        for index, gp in enumerate(plan.groups):
            group = gp.group
            if group["capturable"]:
                raise ValueError(f"param_groups[{index}]: {_CAPTURABLE}")
            if bool(group["differentiable"]) != gp.differentiable:
                return None  # the group moves between the kernel and torch
            for bucket in gp.buckets:
                job = bucket.prepare(self.state, _coefficients(group, bucket.dtype, index),
                                     self._backend)
                if job is _STALE:
                    return None
                if job is not None:
                    kernel_jobs.append(job)
            if gp.fallback:
                job = self._torch_job(index, group, gp.fallback)
                if job is not None:
                    torch_jobs.append(job)
        return kernel_jobs, torch_jobs

    def _torch_job(self, index, group, fallback):
        """The arguments of torch.optim.rmsprop.rmsprop for the parameters the kernel cannot take;
        state is created as torch.optim.RMSprop creates it."""
        _check_torch_can_serve(index, group, fallback)
        params, grads, square_avgs, grad_avgs, momentum_buffers, steps = [], [], [], [], [], []
        has_complex = False
        for p, _ in fallback:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(_SPARSE)
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype())
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Created when first needed, also when momentum / centered is switched on later
            # (torch.optim.RMSprop raises KeyError then).
            if group["momentum"] > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["centered"] and "grad_avg" not in state:
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(g)
            square_avgs.append(state["square_avg"])
            steps.append(state["step"])
            if group["momentum"] > 0:
                momentum_buffers.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])
        if not params:
            return None
        options = dict(foreach=group["foreach"], maximize=group["maximize"],
                       differentiable=group["differentiable"], capturable=False,
                       has_complex=has_complex, lr=group["lr"], alpha=group["alpha"],
                       eps=group["eps"], weight_decay=group["weight_decay"],
                       momentum=group["momentum"], centered=group["centered"])
        return (params, grads, square_avgs, grad_avgs, momentum_buffers, steps), options


class _Plan:
    """Which parameters run on the kernel (in buckets of one group and dtype) and which on torch,
    with the cached views the kernel calls take."""

    __slots__ = ("state", "groups")

    def __init__(self, opt: RMSprop):
        self.state = opt.state
        candidates = []
        self.groups = []
        for index, group in enumerate(opt.param_groups):
            if group["capturable"]:
                raise ValueError(f"param_groups[{index}]: {_CAPTURABLE}")
            gp = _GroupPlan(group)
            for p in group["params"]:
                reason = _fallback_reason(p, group)
                if reason is None:
                    candidates.append((index, p))
                else:
                    gp.fallback.append((p, reason))
            self.groups.append(gp)
        shared = _sharing_memory([p for _, p in candidates])
        by_bucket: dict[tuple, list] = {}
        for index, p in candidates:
            if id(p) in shared:
                self.groups[index].fallback.append(
                    (p, "shares memory with another parameter (the kernel updates all of a "
                        "step's tensors at once; torch updates one after another)"))
            else:
                by_bucket.setdefault((index, p.dtype), []).append(p)
        for index, gp in enumerate(self.groups):  # all checks before flatten moves anything
            _check_torch_can_serve(index, gp.group, gp.fallback)
        for index, gp in enumerate(self.groups):
            for torch_dtype in _KERNEL_DTYPES:  # float32 then float64, whatever the param order
                params = by_bucket.get((index, torch_dtype))
                if params:
                    kind = _FlatBucket if opt._flatten else _Bucket
                    gp.buckets.append(kind(opt.state, gp.group, params))

    def matches(self, opt: RMSprop) -> bool:
        """Same state dict, groups and parameter lists as when built (checked every step)."""
        groups = opt.param_groups
        if opt.state is not self.state or len(groups) != len(self.groups):
            return False
        for group, gp in zip(groups, self.groups):
            if group is not gp.group or group["params"] is not gp.params or \
                    len(gp.params) != gp.count:
                return False
        return True

    def buckets(self):
        for gp in self.groups:
            yield from gp.buckets


class _GroupPlan:
    __slots__ = ("group", "params", "count", "differentiable", "buckets", "fallback")

    def __init__(self, group: dict):
        self.group = group
        self.params = group["params"]
        self.count = len(self.params)
        self.differentiable = bool(group["differentiable"])
        self.buckets: list = []
        self.fallback: list[tuple[torch.Tensor, str]] = []


class _Bucket:
    """The kernel parameters of one group and dtype, each with its own state tensors.

    Parameter and state views, and the lists handed to ``update_many``, are built once and
    reused while the same parameters have gradients; only the gradients' views are new each step
    (a gradient may be a new tensor after every backward).
    """

    def __init__(self, state, group: dict, params: list):
        self.params = params
        self.count = len(params)
        self.dtype = _KERNEL_DTYPES[params[0].dtype]
        self.torch_dtypes = [params[0].dtype] * len(params)
        self.align_mask = np.uintp(self.dtype.itemsize - 1)
        self.size = sum(p.numel() for p in params)
        self._place_params()
        self.ptrs = list(map(_data_ptr, params))
        # Contiguous parameters (the usual case) take the cheap per-step gradient check.
        self.contiguous = all(p.is_contiguous() for p in params)
        self.layouts = [_layout_key(p) for p in params]
        self.param_arrays = [_flat_array(p) for p in params]
        self.steps = torch.zeros(self.count, dtype=_get_scalar_dtype())
        self.dicts = [None] * self.count  # each parameter's state dict, once it has state
        self.tensors = {name: [None] * self.count for name in ("step",) + _BUFFERS}
        self.arrays = {name: [None] * self.count for name in _BUFFERS}
        self.watch = None  # (name, state dicts, tensors) to check identity against, per name
        self.momentum_on = group["momentum"] > 0
        self.centered_on = bool(group["centered"])
        for k, p in enumerate(params):
            p_state = state.get(p)
            if p_state:
                self._adopt(k, p_state)
        self.present = None  # which parameters had a gradient at the last step
        self.selection = None
        self.cache = {}  # for a backend whose update_many keeps converted lists (cache=)

    def _place_params(self) -> None:
        """Parameters stay where they are (the flat bucket moves them)."""

    # State -----------------------------------------------------------------------------------

    def _new_buffer(self, name: str, k: int) -> torch.Tensor:
        return torch.zeros_like(self.params[k], memory_format=torch.preserve_format)

    def _usable(self, name: str, k: int, tensor) -> torch.Tensor:
        """``tensor`` itself when the kernel can walk it alongside the parameter, else a copy."""
        p = self.params[k]
        if (isinstance(tensor, torch.Tensor) and type(tensor) in _PLAIN_TYPES
                and tensor.device.type == "cpu" and tensor.dtype == p.dtype
                and tensor.shape == p.shape and not tensor.requires_grad
                and not tensor.is_neg() and _layout_key(tensor) == _layout_key(p)):
            return tensor
        fresh = self._new_buffer(name, k)
        fresh.copy_(tensor)
        return fresh

    def _attach(self, k: int, name: str, tensor: torch.Tensor) -> None:
        self.dicts[k][name] = tensor
        self.tensors[name][k] = tensor
        self.arrays[name][k] = _flat_array(tensor)
        self.watch = None

    def _set_step(self, k: int, value: float) -> None:
        self.steps[k] = value
        # A 0-d view: torch's scalar step tensor, counted by one add_ per bucket per step.
        self.dicts[k]["step"] = self.tensors["step"][k] = self.steps[k]
        self.watch = None

    def _adopt(self, k: int, p_state: dict) -> None:
        """Take over state that exists already (loaded, or from an earlier plan): the step
        moves into this bucket's step counter, buffers are kept when the kernel can use them."""
        self.dicts[k] = p_state
        self._set_step(k, float(p_state.get("step", 0)))
        for name in _BUFFERS:
            if name in p_state:
                self._attach(k, name, self._usable(name, k, p_state[name]))
            elif name == "square_avg" or (name == "momentum_buffer" and self.momentum_on) or \
                    (name == "grad_avg" and self.centered_on):
                self._attach(k, name, self._new_buffer(name, k))

    def _initialize(self, state, k: int) -> None:
        """State for a parameter's first step, created as torch creates it (step, square_avg,
        then momentum_buffer and grad_avg when used)."""
        self.dicts[k] = state[self.params[k]]
        self._set_step(k, 0.0)
        self._attach(k, "square_avg", self._new_buffer("square_avg", k))
        if self.momentum_on:
            self._attach(k, "momentum_buffer", self._new_buffer("momentum_buffer", k))
        if self.centered_on:
            self._attach(k, "grad_avg", self._new_buffer("grad_avg", k))

    def _switch_on(self, momentum: bool, centered: bool) -> None:
        """momentum / centered switched on after state was created: new buffers start at 0."""
        with torch.no_grad():
            self.momentum_on |= momentum
            self.centered_on |= centered
            for k, p_state in enumerate(self.dicts):
                if p_state is None:
                    continue
                for name, on in (("momentum_buffer", momentum), ("grad_avg", centered)):
                    if on and self.tensors[name][k] is None:
                        self._attach(k, name, self._new_buffer(name, k))
        self.present = None

    def _unchanged(self, state) -> bool:
        """The parameters still own the memory the views show, and the state holds the tensors
        the views show (load_state_dict, or code that assigns into opt.state, replaces them)."""
        if list(map(_data_ptr, self.params)) != self.ptrs:
            return False
        current = list(map(state.get, self.params))
        if not all(map(_is, current, self.dicts)):
            # Reading opt.state[p] makes an empty dict (a defaultdict): that is no change.
            for now, known in zip(current, self.dicts):
                if now is not known and (known is not None or now):
                    return False
        watch = self.watch
        if watch is None:
            watch = self.watch = [
                (operator.itemgetter(name),
                 [d for d, t in zip(self.dicts, tensors) if t is not None],
                 [t for t in tensors if t is not None])
                for name, tensors in self.tensors.items()]
        try:
            for get, dicts, tensors in watch:
                if not all(map(_is, map(get, dicts), tensors)):
                    return False
        except KeyError:  # a state entry was deleted
            return False
        return True

    # The step --------------------------------------------------------------------------------

    def _initialize_present(self, state, present) -> None:
        with torch.no_grad():
            for k, here in enumerate(present):
                if here and self.dicts[k] is None:
                    self._initialize(state, k)

    def _select(self, state, present: list[bool]) -> None:
        self._initialize_present(state, present)
        chosen = [k for k, here in enumerate(present) if here]
        every = len(chosen) == self.count
        increment = 1.0 if every else torch.tensor(present, dtype=self.steps.dtype)
        arrays = self.arrays

        def pick(items):  # always a new list: a backend may cache by list identity
            return list(items) if every else [items[k] for k in chosen]

        params = pick(self.param_arrays)
        self.selection = (
            every, chosen, increment, params, pick(arrays["square_avg"]),
            pick(arrays["momentum_buffer"]) if self.momentum_on else None,
            pick(arrays["grad_avg"]) if self.centered_on else None,
            [a.shape for a in params], [a.strides for a in params])
        self.present = present
        self.cache = {}

    def prepare(self, state, coeffs, backend):
        """The kernel job for this step, ``(callable, arguments, step counter, increment)``;
        None when no parameter has a gradient; _STALE when the plan must be rebuilt."""
        if not self._unchanged(state):
            return _STALE
        if (coeffs.uses_momentum and not self.momentum_on) or \
                (coeffs.centered and not self.centered_on):
            self._switch_on(coeffs.uses_momentum, coeffs.centered)
        grads = list(map(_get_grad, self.params))
        present = [g is not None for g in grads]
        if present != self.present:
            if not any(present):
                return None
            self._select(state, present)
        (every, chosen, increment, param_arrays, square_avgs, momentum_buffers, grad_avgs,
         shapes, strides) = self.selection
        if not every:
            grads = [grads[k] for k in chosen]
        module = _module(backend, self.size, self.dtype, coeffs.flags)
        momentum_buffers = momentum_buffers if coeffs.uses_momentum else None
        grad_avgs = grad_avgs if coeffs.centered else None
        if self.contiguous and hasattr(module, "update_many_at_addresses"):
            addresses = self._grad_addresses(grads, shapes)
            if addresses is not None:
                update = module.update_many_at_addresses
                cache = self.cache

                def run(*arguments):  # holds the gradients while the kernel reads them
                    update(*arguments, cache=cache)
                    return grads

                return (run, (coeffs, param_arrays, addresses, square_avgs, momentum_buffers,
                              grad_avgs), self.steps, increment)
        grad_arrays = None
        if self.contiguous:
            try:
                grad_arrays = list(map(_to_numpy, grads))
            except (RuntimeError, TypeError):  # requires grad, sparse, or a neg/conj bit
                pass
            else:
                if list(map(_get_shape, grad_arrays)) != shapes or \
                        list(map(_get_strides, grad_arrays)) != strides or \
                        not all(a.flags.aligned for a in grad_arrays):
                    grad_arrays = None
        if grad_arrays is None:
            grad_arrays = self._grad_arrays(grads, chosen)
            if grad_arrays is _STALE:
                return _STALE
        arguments = (coeffs, param_arrays, grad_arrays, square_avgs, momentum_buffers, grad_avgs)
        return _with_cache(module.update_many, self.cache), arguments, self.steps, increment

    def _grad_addresses(self, grads, shapes):
        """The gradients' data addresses when every one is a dense, C-contiguous CPU tensor of
        the bucket's dtype and its parameter's shape (so it lies exactly as the parameter's
        NumPy view does), else None for the checked path. A few C-level passes over the list:
        no NumPy view and no buffer request per gradient."""
        try:
            if not (list(map(_get_dtype, grads)) == self.torch_dtypes[:len(grads)]
                    and list(map(_get_shape, grads)) == shapes
                    and all(map(_get_is_cpu, grads)) and all(map(_is_contiguous, grads))
                    and not any(map(_is_neg, grads))):
                return None
            addresses = np.fromiter(map(_data_ptr, grads), np.uintp, len(grads))
        except RuntimeError:  # sparse layouts: is_contiguous or data_ptr refuses
            return None
        if (addresses & self.align_mask).any():  # memory from torch.frombuffer, say
            return None
        return addresses

    def _grad_arrays(self, grads, chosen):
        """Flat arrays of gradients the fast check did not pass: checked one by one, read in
        place when their layout is the parameter's, copied otherwise."""
        out = []
        for g, k in zip(grads, chosen):
            p = self.params[k]
            if g.layout != torch.strided:
                raise RuntimeError(_SPARSE)
            if g.shape != p.shape:
                return _STALE  # p.data was replaced by a tensor of another shape
            g = g.detach()
            if g.is_neg() or g.is_conj():
                g = g.resolve_conj().resolve_neg()
            if _layout_key(g) != self.layouts[k] or g.data_ptr() % g.element_size():
                with torch.no_grad():
                    g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
            out.append(_flat_array(g))
        return out


class _FlatBucket(_Bucket):
    """A bucket whose parameters, gradients and state are views of one flat buffer each (with
    each parameter's shape and strides), so that a step is one kernel call over the bucket."""

    def _place_params(self) -> None:
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        self.offsets = offsets
        self.flat = dict.fromkeys(("param", "grad") + _BUFFERS)
        self.flat_arrays = dict.fromkeys(self.flat)
        self.grad_views = [None] * self.count
        for k, p in enumerate(self.params):
            view = self._slot("param", k)
            view.copy_(p.detach())
            p.data = view
            g = p.grad
            if g is not None and g.layout == torch.strided:  # sparse ones fail at step()
                self._install(k, g)

    def _slot(self, name: str, k: int) -> torch.Tensor:
        flat = self.flat[name]
        if flat is None:  # allocated on first use: momentum / centered may never be used
            flat = self.flat[name] = torch.zeros(self.offsets[-1], dtype=self.params[0].dtype)
            self.flat_arrays[name] = flat.numpy()
        p = self.params[k]
        return flat.as_strided(p.shape, p.stride(), self.offsets[k])

    def _install(self, k: int, g) -> None:
        view = self._slot("grad", k)
        view.copy_(g.detach())
        self.params[k].grad = view
        self.grad_views[k] = view

    def _new_buffer(self, name: str, k: int) -> torch.Tensor:
        return self._slot(name, k).zero_()

    def _usable(self, name: str, k: int, tensor) -> torch.Tensor:
        view = self._slot(name, k)
        if tensor is not view:
            view.copy_(tensor)
        return view

    def prepare(self, state, coeffs, backend):
        if not self._unchanged(state):
            return _STALE
        if (coeffs.uses_momentum and not self.momentum_on) or \
                (coeffs.centered and not self.centered_on):
            self._switch_on(coeffs.uses_momentum, coeffs.centered)
        params = self.params
        grads = list(map(_get_grad, params))
        if not all(map(_is, grads, self.grad_views)):
            # Gradients that are not our views: new ones are copied into the buffer and the
            # views installed, so that the next backward accumulates into the buffer again.
            for k, g in enumerate(grads):
                if g is not None and g.layout != torch.strided:
                    raise RuntimeError(_SPARSE)
                if g is not None and g.shape != params[k].shape:
                    return _STALE
            with torch.no_grad():
                for k, g in enumerate(grads):
                    if g is None:
                        self.grad_views[k] = None
                    elif g is not self.grad_views[k]:
                        self._install(k, g)
        present = [v is not None for v in self.grad_views]
        if present != self.present:
            self._select(state, present)
        if self.selection is None:
            return None
        every, runs, increment = self.selection
        module = _module(backend, self.size, self.dtype, coeffs.flags)
        if every:
            arrays = self.flat_arrays
            return _update_whole, (
                module, coeffs, arrays["param"], arrays["grad"], arrays["square_avg"],
                arrays["momentum_buffer"] if coeffs.uses_momentum else None,
                arrays["grad_avg"] if coeffs.centered else None), self.steps, increment
        arguments = (coeffs, runs["param"], runs["grad"], runs["square_avg"],
                     runs["momentum_buffer"] if coeffs.uses_momentum else None,
                     runs["grad_avg"] if coeffs.centered else None)
        return module.update_many, arguments, self.steps, increment

    def _select(self, state, present) -> None:
        self.present = present
        if not any(present):
            self.selection = None
            return
        self._initialize_present(state, present)
        every = all(present)
        increment = 1.0 if every else torch.tensor(present, dtype=self.steps.dtype)
        runs = dict.fromkeys(self.flat)
        if not every:
            bounds = []  # consecutive parameters with gradients form one run of the buffers
            for k, here in enumerate(present):
                if here:
                    lo, hi = self.offsets[k], self.offsets[k + 1]
                    if bounds and bounds[-1][1] == lo:
                        bounds[-1][1] = hi
                    else:
                        bounds.append([lo, hi])
            for name, array in self.flat_arrays.items():
                if array is not None:
                    runs[name] = [array[lo:hi] for lo, hi in bounds]
        self.selection = (every, runs, increment)


def _update_whole(module, coeffs, param, grad, square_avg, momentum_buffer, grad_avg):
    if not module.update_if_ready(coeffs, param, grad, square_avg, momentum_buffer, grad_avg):
        module.update(coeffs, param, grad, square_avg, momentum_buffer, grad_avg)


# -- helpers ---------------------------------------------------------------------------------

def _coefficients(group: dict, dtype: np.dtype, index: int):
    """The group's hyperparameters as kernel coefficients, through fastrms's one conversion."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    try:
        return kernel_coefficients(dtype, lr, group["alpha"], group["eps"],
                                   group["weight_decay"], group["momentum"],
                                   bool(group["centered"]), bool(group["maximize"]),
                                   group["eps_in_sqrt"], group["lr_in_momentum"],
                                   group["nesterov"], group["decoupled_weight_decay"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"param_groups[{index}]: {exc}") from None


def _module(backend, size: int, dtype, flags: int):
    # As fastrms.rmsprop_update: the cached automatic choice unless something overrides it.
    module = None
    if backend is None and _dispatch.context_choice() is None:
        module = _dispatch.auto_module
    return module if module is not None else _dispatch.resolve(backend, size, dtype, flags)


def _fallback_reason(p: torch.Tensor, group: dict):
    """Why torch's implementation must update ``p`` (None when the kernel can)."""
    if group["differentiable"]:
        return "differentiable=True (torch's implementation keeps the update visible to autograd)"
    if type(p) not in _PLAIN_TYPES:
        return f"a tensor subclass ({type(p).__name__})"
    if p.device.type != "cpu":
        return f"on device {p.device} (the fused kernel runs on CPU)"
    if p.dtype not in _KERNEL_DTYPES:
        return f"dtype {p.dtype} (the fused kernel takes float32 and float64)"
    if p.layout != torch.strided:
        return f"layout {p.layout}"
    if p.is_neg() or p.is_conj() or _layout_key(p) is None:
        return "not dense in memory (a strided view; the kernel walks each tensor as one block)"
    return None


def _check_torch_can_serve(index: int, group: dict, fallback) -> None:
    if not fallback:
        return
    used = [key for key, default in FASTRMS_OPTIONS.items() if group[key] != default]
    if used:
        p, reason = fallback[0]
        raise ValueError(
            f"param_groups[{index}] uses {', '.join(f'{key}={group[key]!r}' for key in used)}, "
            f"which only the fused kernel computes, but {len(fallback)} of its parameters must "
            f"be updated by torch's implementation (e.g. a {tuple(p.shape)} tensor: {reason}); "
            f"put those parameters in a group without fastrms-only options")


def _layout_key(t: torch.Tensor):
    """(size, stride) of each dimension longer than 1, in memory order, when ``t`` covers one
    block of memory without gaps (dense); None otherwise. Two dense tensors with equal keys map
    each index to the same position in their blocks, so the kernel can walk both as flat."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return tuple(dims)


def _flat_array(t: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a dense tensor's block, C-contiguous (reshaped or flat)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.as_strided((t.numel(),), (1,))
    return t.numpy()


def _sharing_memory(params) -> set:
    """ids of the parameters whose memory overlaps another parameter's."""
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), id(p))
                   for p in params if p.numel())
    shared = set()
    end, owner = -1, None
    for lo, hi, key in spans:
        if lo < end:
            shared.update((key, owner))
        if hi > end:
            end, owner = hi, key
    return shared


def _with_cache(update_many, cache):
    return lambda *arguments: update_many(*arguments, cache=cache)
