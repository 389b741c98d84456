"""The step itself: coefficients and a backend for every bucket, the finiteness verdict, buffers
switched on since the last step, one kernel call per bucket, and the step counts. All or nothing:
every bucket of every group is planned and checked before the first bucket is written.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from operator import is_

from .. import _dispatch
from .._coefficients import IMMUTABLE
from .buckets import Bucket
from .checks import WrittenRegions
from .compact import DEFAULT_STATE_FORMAT, STATE_FORMAT, check_not_diverged
from .hyperparameters import HYPERPARAMETERS, group_coefficients
from .interrupts import deliver_interrupts, hold_interrupts
from .precision import MASTER, check_master_has_targets, check_precision_options

#: The group keys that make coefficients (lr and grad_scale come per step).
_GROUP_KEYS = tuple(k for k in HYPERPARAMETERS if k not in ("lr", "initial_square_avg"))


def resolve_module(backend, size: int, dtype, flags: int):
    """The backend module for one bucket, as :func:`fastrms.rmsprop_update` picks it: the cached
    automatic choice unless an argument or ``use_backend`` says otherwise."""
    module = None
    if backend is None and _dispatch.context_choice() is None:
        module = _dispatch.auto_module
    return module if module is not None else _dispatch.resolve(backend, size, dtype, flags)


class Engine:
    """Steps a fixed set of :class:`~fastrms.engine.buckets.Bucket` objects.

    ``group_count``: the number of parameter groups (buckets say which they belong to).
    ``backend``: a backend name or None for automatic choice. ``always_momentum``: run the
    momentum line at momentum 0 too (TF1). ``describe(array)`` names an array a step writes
    (for overlap errors). ``allocate(bucket, name)`` creates a state buffer switched on since the
    buckets were made (default: a flat zero buffer with per-parameter views).
    """

    def __init__(self, buckets: list[Bucket], group_count: int, *, backend=None,
                 always_momentum: bool = False, describe: Callable | None = None,
                 allocate: Callable | None = None):
        self.buckets = buckets
        self.group_buckets: list[list[Bucket]] = [[] for _ in range(group_count)]
        for bucket in buckets:
            self.group_buckets[bucket.group].append(bucket)
        self.backend = backend
        self.always_momentum = always_momentum
        self._describe = describe or (lambda array: "memory the optimizer writes")
        self._allocate = allocate or (lambda bucket, name: bucket.allocate(name, 0.0))
        self.regions = WrittenRegions([], self._describe)
        self.refresh_regions()
        self._last_values: list = [None] * group_count
        self._last_coefficients: list = [None] * group_count
        #: Whether a bucket has compact state (checked for diverged blocks before a step).
        self._compact = any(bucket.compact for bucket in buckets)

    def refresh_regions(self) -> WrittenRegions:
        """Rebuild the written regions (after a state buffer was allocated or replaced)."""
        written = []
        for bucket in self.buckets:
            written.extend(bucket.written())
        self.regions = WrittenRegions(written, self._describe)
        return self.regions

    def group_step(self, g: int) -> int:
        """The number of steps group ``g`` has taken (0 for a group with no parameters)."""
        buckets = self.group_buckets[g]
        return int(buckets[0].step_count()) if buckets else 0

    def plan(self, groups: list[Mapping], grad_scale=None, lrs=None) -> list[tuple]:
        """``(bucket, coefficients, backend module)`` for every bucket, in bucket order. Checks
        every hyperparameter and writes nothing. ``lrs[g]``, when given, is group g's learning
        rate for this step (a front end that reads tensors or schedules its own way); otherwise
        ``group["lr"]``, called with the 1-based step number when it is callable. Each 16-bit
        bucket takes its group's rounding options (``bucket.precision``) for the run that
        follows."""
        plan = []
        for g, buckets in enumerate(self.group_buckets):
            if not buckets:
                continue
            group = groups[g]
            state_format = group.get(STATE_FORMAT, DEFAULT_STATE_FORMAT)
            if state_format is not buckets[0].state_format and \
                    state_format != buckets[0].state_format:
                raise ValueError(f"param_groups[{g}]['state_format'] is {state_format!r} but "
                                 f"the group's state is {buckets[0].state_format!r}; the state "
                                 f"format is fixed when the optimizer is built")
            precision = check_precision_options(group, f"param_groups[{g}]")
            if precision[2]:
                check_master_has_targets(group, [b.dtype for b in buckets], f"param_groups[{g}]")
            if lrs is not None:
                lr = lrs[g]
            else:
                lr = group["lr"]
                if callable(lr):
                    lr = lr(self.group_step(g) + 1)
            # The very objects of the last step's hyperparameters give its coefficients again
            # (cheaper than the coefficient cache); only values that cannot change behind the
            # same object are remembered.
            values = (lr, grad_scale, *map(group.__getitem__, _GROUP_KEYS))
            last = self._last_values[g]
            if last is not None and all(map(is_, values, last)):
                coefficients = self._last_coefficients[g]
            else:
                where = f"param_groups[{g}]"
                coefficients = [group_coefficients(group, bucket.dtype, lr, where, grad_scale,
                                                   self.always_momentum) for bucket in buckets]
                if IMMUTABLE.issuperset(map(type, values)):
                    self._last_values[g] = values
                    self._last_coefficients[g] = coefficients
            backend = self.backend
            for bucket, coeffs in zip(buckets, coefficients):
                if bucket.low_precision:
                    bucket.precision = precision
                plan.append((bucket, coeffs,
                             resolve_module(backend, bucket.size, bucket.dtype, coeffs.flags)))
        return plan

    def all_finite(self, jobs) -> bool:
        """Whether every chosen gradient of every job, unscaled, is finite (one read each)."""
        for bucket, coeffs, module, grads, _ in jobs:
            if bucket.is_flat:
                grads = ([bucket.flat["grad"]] if bucket.chosen is None else
                         bucket._kernel_lists()["grad"])
            if not module.all_finite(coeffs, grads):
                return False
        return True

    def switch_on(self, plan) -> None:
        """Buffers switched on since they were made (momentum or centered) start at zero; a
        16-bit bucket's master copy starts at its parameters' values, and goes when its group
        turns ``master_weights`` off (the parameters hold the nearest values)."""
        changed = False
        for bucket, coeffs, *_ in plan:
            if bucket.low_precision and bucket.precision[2] != (bucket.state[MASTER] is not None):
                if bucket.precision[2]:
                    bucket.allocate_master()
                else:
                    bucket.set_state(MASTER, None)
                changed = True
            if coeffs.uses_momentum and bucket.state["momentum_buffer"] is None:
                self._allocate(bucket, "momentum_buffer")
                changed = True
            if coeffs.centered and bucket.state["grad_avg"] is None:
                self._allocate(bucket, "grad_avg")
                changed = True
        if changed:
            self.refresh_regions()

    def run(self, jobs, skip_nonfinite: bool = False) -> bool:
        """Run checked jobs, ``(bucket, coefficients, module, grads, addresses)`` each: False,
        with nothing written, when ``skip_nonfinite`` and a gradient is not finite; else update
        every bucket, count the step, and return True."""
        if skip_nonfinite and not self.all_finite(jobs):
            return False
        if self._compact:
            for job in jobs:
                if job[0].compact:
                    check_not_diverged(job[0])
        self.switch_on(jobs)
        held = hold_interrupts()  # a Ctrl-C lands before the first write or after the count
        try:
            for bucket, coeffs, module, grads, addresses in jobs:
                bucket.run(coeffs, module, grads, addresses)
            self.advance(jobs)
        finally:
            if held:
                deliver_interrupts()
        return True

    def advance(self, plan) -> None:
        """Count one step for every bucket of ``plan`` (or of checked jobs): what :meth:`run`
        does after its kernel calls, for a front end that runs the kernels its own way
        (:meth:`Bucket.run_range <fastrms.engine.buckets.Bucket.run_range>`)."""
        for job in plan:
            job[0].advance()
