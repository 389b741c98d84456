"""The drop-in's plan: which parameters the fused kernel updates (in buckets of one group and dtype,
stepped by one engine) and which torch's own implementation updates, rebuilt whenever the
parameters, the groups or the state change under it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.optim.rmsprop import rmsprop as torch_rmsprop
from torch.utils.weak import WeakIdKeyDictionary

from ..engine import Engine, StepCounts
from ..engine.precision import (PRECISION_DEFAULTS, check_master_has_targets,
                                check_precision_options)
from ._buckets import STALE, TensorBucket
from ._dtensor import DTensorBucket
from ._flat import FlatTensorBucket
from ._tensors import (KERNEL_DTYPES, LOW_PRECISION, PLAIN_TYPES, SPARSE, fallback_reason, same,
                       sharing_memory)

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - a torch without it stores float32 steps
    def _get_scalar_dtype():
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

#: fastrms's options beyond torch's, stored in each parameter group like torch's own keys.
FASTRMS_OPTIONS = {"eps_in_sqrt": False, "lr_in_momentum": False, "nesterov": False,
                   "decoupled_weight_decay": False, "state_format": "float32"}
#: The options of 16-bit kernel parameters (parameters torch updates ignore them).
TORCH_PRECISION_OPTIONS = dict(PRECISION_DEFAULTS)
CAPTURABLE = ("capturable=True is for CUDA graph capture, and fastrms.torch.RMSprop runs its "
              "kernel on CPU; leave capturable=False (torch itself refuses capturable CPU "
              "parameters)")


class StepSlots:
    """Every kernel parameter's step count, in a :class:`~fastrms.engine.StepCounts` that
    outlives plans: ``state[p]["step"]`` is a 0-d tensor view of the parameter's slot, so a
    step tensor somebody holds stays live through re-plans and ``add_param_group``."""

    def __init__(self):
        self.counts = StepCounts(np.dtype(str(_get_scalar_dtype()).removeprefix("torch.")))
        self._slots = WeakIdKeyDictionary()  # by identity: tensors compare elementwise
        self._chunk_tensors: list[torch.Tensor] = []
        self._views: dict = {}

    def slot_of(self, p: torch.Tensor):
        slot = self._slots.get(p)
        if slot is None:
            slot = self._slots[p] = self.counts.new_slot()
        return slot

    def step_tensor(self, slot) -> torch.Tensor:
        view = self._views.get(slot)
        if view is None:
            chunks = self.counts.chunks
            while len(self._chunk_tensors) < len(chunks):
                self._chunk_tensors.append(torch.from_numpy(chunks[len(self._chunk_tensors)]))
            view = self._views[slot] = self._chunk_tensors[slot[0]][slot[1]]
        return view


class GroupPlan:
    __slots__ = ("group", "params", "count", "differentiable", "buckets", "fallback")

    def __init__(self, group: dict):
        self.group = group
        self.params = group["params"]
        self.count = len(self.params)
        self.differentiable = bool(group["differentiable"])
        self.buckets: list[TensorBucket] = []
        self.fallback: list[tuple[torch.Tensor, str]] = []


class Plan:
    """What runs where, with the engine that steps the kernel buckets."""

    def __init__(self, opt, slots: StepSlots):
        self.state = opt.state
        self.slots = slots
        self.counts = slots.counts
        candidates = []
        self.groups = []
        #: Each group's first parameter's id in state_dict numbering.
        self.group_offsets = []
        offset = 0
        for group in opt.param_groups:
            self.group_offsets.append(offset)
            offset += len(group["params"])
        for index, group in enumerate(opt.param_groups):
            if group["capturable"]:
                raise ValueError(f"param_groups[{index}]: {CAPTURABLE}")
            gp = GroupPlan(group)
            for position, p in enumerate(group["params"]):
                reason = fallback_reason(p, group)
                if reason is None:
                    candidates.append((index, position, p))
                else:
                    gp.fallback.append((p, reason))
            self.groups.append(gp)
        shared = sharing_memory([p for _, _, p in candidates])
        by_bucket: dict[tuple, list] = {}
        for index, position, p in candidates:
            if id(p) in shared:
                self.groups[index].fallback.append(
                    (p, "shares memory with another parameter (the kernel updates all of a "
                        "step's tensors at once; torch updates one after another)"))
            else:
                distributed = type(p) not in PLAIN_TYPES  # a DTensor (fallback_reason said)
                by_bucket.setdefault((index, p.dtype, distributed), []).append((position, p))
        for index, gp in enumerate(self.groups):  # all checks before flatten moves anything
            check_torch_can_serve(index, gp.group, gp.fallback)
            where = f"param_groups[{index}]"
            if check_precision_options(gp.group, where)[2]:
                check_master_has_targets(gp.group, [KERNEL_DTYPES[dtype] for g, dtype, _ in
                                                    by_bucket if g == index], where)
        for index, gp in enumerate(self.groups):
            for torch_dtype in KERNEL_DTYPES:  # float32, float64, bfloat16, float16
                for distributed in (False, True):
                    members = by_bucket.get((index, torch_dtype, distributed))
                    # flatten=True packs float32 / float64 parameters; 16-bit ones and
                    # DTensors (whose memory FSDP owns) stay in place
                    kind = (DTensorBucket if distributed else
                            FlatTensorBucket if opt._flatten and torch_dtype not in LOW_PRECISION
                            else TensorBucket)
                    if members:
                        gp.buckets.append(kind(self, opt.state, index, gp.group,
                                               [p for _, p in members],
                                               [k for k, _ in members]))
        self.buckets = [b for gp in self.groups for b in gp.buckets]
        self.engine = Engine([b.bucket for b in self.buckets], len(self.groups),
                             backend=opt._backend, describe=self._describe)
        #: opt.state's values (the per-parameter dicts) after the last step, in order.
        self._state_values: list = []

    # step-count slots, for the buckets
    def slot_of(self, p):
        return self.slots.slot_of(p)

    def step_tensor(self, slot):
        return self.slots.step_tensor(slot)

    def _describe(self, array) -> str:
        for bucket in self.buckets:
            for written, description in bucket.written_names():
                if written is array:
                    return description
        return "memory the optimizer writes"  # pragma: no cover

    def matches(self, opt) -> bool:
        """Same state dict, groups and parameter lists as when built (checked every step)."""
        groups = opt.param_groups
        if opt.state is not self.state or len(groups) != len(self.groups):
            return False
        for group, gp in zip(groups, self.groups):
            if group is not gp.group or group["params"] is not gp.params or \
                    len(gp.params) != gp.count:
                return False
        return True

    def jobs(self, backend_lr):
        """The step's kernel jobs and torch jobs, every kernel gradient checked, or None when
        the plan no longer fits. ``backend_lr(group, index, dtype)`` gives a bucket's
        coefficients and backend module."""
        selected = []
        # opt.state holding exactly the dicts of the last step (two C-level passes, no tensor
        # hashing) spares each bucket its per-parameter lookups.
        values = list(self.state.values())
        known = self._state_values
        dicts_unchanged = len(values) == len(known) and all(map(same, values, known))
        for index, gp in enumerate(self.groups):
            group = gp.group
            if group["capturable"]:
                raise ValueError(f"param_groups[{index}]: {CAPTURABLE}")
            if bool(group["differentiable"]) != gp.differentiable:
                return None  # the group moves between the kernel and torch
        precisions = []  # every group checked before any bucket's state changes
        for index, gp in enumerate(self.groups):
            where = f"param_groups[{index}]"
            precision = check_precision_options(gp.group, where)
            if precision[2]:
                check_master_has_targets(gp.group, [b.dtype for b in gp.buckets], where)
            if gp.buckets:
                state_format = gp.group.get("state_format", "float32")
                if state_format != gp.buckets[0].state_format:
                    raise ValueError(f"{where}['state_format'] is {state_format!r} but the "
                                     f"group's state is {gp.buckets[0].state_format!r}; the "
                                     f"state format is fixed when the group is added")
            precisions.append(precision)
        for index, gp in enumerate(self.groups):
            group = gp.group
            for bucket in gp.buckets:
                if bucket.low_precision:
                    bucket.set_precision(precisions[index])
                coeffs, module = backend_lr(group, index, bucket.dtype, bucket.bucket.size)
                grads = bucket.select(self.state, coeffs, dicts_unchanged)
                if grads is STALE:
                    return None
                if grads is not None:
                    selected.append((bucket, coeffs, module, grads))
        engine = self.engine
        if any(bucket.dirty for bucket in self.buckets):
            engine.refresh_regions()
            for bucket in self.buckets:
                bucket.dirty = False
        regions = engine.regions
        kernel_jobs = [bucket.job(coeffs, module, grads, regions)
                       for bucket, coeffs, module, grads in selected]
        torch_jobs = []
        for index, gp in enumerate(self.groups):
            if gp.fallback:
                job = torch_job(self.state, index, gp.group, gp.fallback)
                if job is not None:
                    torch_jobs.append(job)
        self._state_values = list(self.state.values())
        return kernel_jobs, torch_jobs


def check_torch_can_serve(index: int, group: dict, fallback) -> None:
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


def torch_job(state_of, index, group, fallback):
    """The arguments of torch.optim.rmsprop.rmsprop for the parameters the kernel cannot take;
    state is created as torch.optim.RMSprop creates it."""
    check_torch_can_serve(index, group, fallback)
    params, grads, square_avgs, grad_avgs, momentum_buffers, steps = [], [], [], [], [], []
    has_complex = False
    for p, _ in fallback:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(SPARSE)
        has_complex |= torch.is_complex(p)
        state = state_of[p]
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


def run_torch_jobs(jobs, differentiable: bool, grad_scale=None) -> None:
    """Run torch's implementation; a loss scale is undone first as GradScaler.unscale_ does
    (multiplying by the float32 reciprocal of the scale)."""
    with torch.set_grad_enabled(differentiable):
        for arguments, options in jobs:
            if grad_scale is not None:
                inverse = torch.full((), grad_scale, dtype=torch.float64).reciprocal().float()
                for g in arguments[1]:
                    g.mul_(inverse.to(g.dtype))
            torch_rmsprop(*arguments, **options)
