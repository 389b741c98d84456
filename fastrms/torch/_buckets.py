"""The drop-in's kernel parameters of one (group, dtype) pair: torch tensors and their
``opt.state`` entries translated into an engine :class:`~fastrms.engine.Bucket` of NumPy views,
and checked at every step against what the views were made from.

Nothing is trusted from a cached pointer: each step compares every parameter's and every state
tensor's address, shape, strides and dtype (and the state dicts' identities) with the plan's,
and a change sends the optimizer back to planning before anything is written.

A bfloat16 / float16 bucket keeps float32 state tensors in ``opt.state`` (and, with
``master_weights``, the float32 copy ``"master_param"``); its gradients are read through
NumPy views (its parameter's dtype or float32), never as raw addresses.

A bucket of a group with compact state (``state_format``) keeps the tensors of
:mod:`._compact` in ``opt.state`` (bfloat16 tensors, or uint8 codes and float32 scales), float32
state found there (a torch checkpoint) quantized into them, and steps the engine's compact path.
"""
from __future__ import annotations

import itertools
import operator

import numpy as np
import torch

from ..engine import STATE_BUFFERS, Bucket
from ..engine.compact import DEFAULT_STATE_FORMAT, STATE_FORMAT
from ..engine.precision import MASTER
from ._checkpoint import check_state_entry
from ._compact import (blockwise, buffer_of, check_entry, check_no_compact_keys, new_tensor,
                       quantize, state_keys, usable)
from ._tensors import (KERNEL_DTYPES, LOW_PRECISION, PLAIN_TYPES, SPARSE, TensorLayouts, data_ptr,
                       flat_array, get_dtype, get_grad, get_is_cpu, is_contiguous, is_neg,
                       layout_key, numel, same)

NONES = itertools.repeat(None)
is_not = operator.is_not
STALE = object()  # what prepare() returns when a parameter or its state changed under the plan


class TensorBucket:
    """Kernel parameters of one group and dtype, each with its own state tensors."""

    #: The tensor whose memory the kernel walks for a parameter or state tensor, where that is
    #: not the tensor itself (a DTensor's local tensor); None: the tensor itself.
    memory_of = None

    def __init__(self, context, state, index: int, group: dict, params: list, positions: list):
        self.context = context  # the plan: step-count slots and their tensors
        self.index = index
        self.params = params
        self.positions = positions  # each parameter's index in group["params"]
        self.count = len(params)
        self.torch_dtype = params[0].dtype
        self.dtype = KERNEL_DTYPES[self.torch_dtype]
        self.low_precision = self.torch_dtype in LOW_PRECISION
        #: The dtype of the state tensors: float32 for 16-bit parameters.
        self.state_dtype = torch.float32 if self.low_precision else self.torch_dtype
        #: "float32" or a compact format (then the state keys are those of _compact.py).
        self.state_format = group.get(STATE_FORMAT, DEFAULT_STATE_FORMAT)
        self.compact = self.state_format != DEFAULT_STATE_FORMAT
        self.names = state_keys(self.state_format, self.low_precision)
        self.master_on = self.low_precision and bool(group.get("master_weights", False))
        self.torch_dtypes = [self.torch_dtype] * self.count
        self.align_mask = np.uintp(self.dtype.itemsize - 1)
        flat_param, flat_grad = self._place_params()
        #: What the kernel walks for each parameter (the parameters themselves, as a rule).
        self.local = self._memory(params)
        self.nbytes = np.array([p.numel() * p.element_size() for p in self.local],
                               dtype=np.uintp)
        self.layouts = TensorLayouts(self.local)
        self.keys = [layout_key(p) for p in self.local]
        self.slots = [context.slot_of(p) for p in params]
        offset = context.group_offsets[index]  # state_dict ids: the stochastic streams
        self.bucket = Bucket(index, self.dtype, [flat_array(p) for p in self.local],
                             context.counts,
                             self.slots, flat_param, flat_grad,
                             ids=[offset + k for k in positions],
                             state_format=self.state_format)
        self.dicts = [None] * self.count  # each parameter's state dict, once it has state
        self.tensors = {name: [None] * self.count for name in self.names}
        self.watch = None  # per state buffer: (getter, dicts, tensors, their layouts)
        self.momentum_on = group["momentum"] > 0
        self.centered_on = bool(group["centered"])
        self.dirty = True  # state attached since the written regions were last rebuilt
        existing = [state.get(p) for p in params]
        for k, p_state in enumerate(existing):  # everything checked before anything attached
            if p_state:
                self._check_existing(k, p_state)
        for k, p_state in enumerate(existing):
            if p_state:
                self._adopt(k, p_state)
        self.present = None  # which parameters had a gradient at the last step
        self._all_present = [True] * self.count
        self.clean = None  # (regions, addresses) that last passed the overlap check
        self._watch()

    def _memory(self, tensors: list) -> list:
        """The tensors whose memory the kernel walks for ``tensors`` (the same list when that
        is the tensors themselves)."""
        memory_of = self.memory_of
        return tensors if memory_of is None else list(map(memory_of, tensors))

    def label(self, k: int) -> str:
        return f"param_groups[{self.index}]['params'][{self.positions[k]}]"

    def _place_params(self):
        """Parameters stay where they are (the flat bucket moves them)."""
        return None, None

    # -- state ---------------------------------------------------------------------------------

    def _new_buffer(self, name: str, k: int) -> torch.Tensor:
        if self.compact and name != MASTER:
            return new_tensor(self.state_format, name, self.params[k])
        if name == MASTER:  # the parameter's value, widened (exact)
            return self.params[k].detach().to(torch.float32, memory_format=torch.preserve_format,
                                              copy=True)
        return torch.zeros_like(self.params[k], dtype=self.state_dtype,
                                memory_format=torch.preserve_format)

    def _check_existing(self, k: int, p_state: dict) -> None:
        """State that exists already (loaded, or replaced by user code) must fit its parameter:
        torch raises on a missing key, and a tensor of another shape must not broadcast. (An
        entry holding only a step, as torch leaves it, counts as missing square_avg too.)"""
        where = f"opt.state of {self.label(k)}"
        if self.compact:
            check_entry(p_state, self.params[k], self.state_format, where, "the parameter",
                        RuntimeError)
            return
        check_no_compact_keys(p_state, where, RuntimeError)
        check_state_entry(p_state, self.params[k], where, "the parameter", RuntimeError)

    def _usable(self, name: str, k: int, tensor) -> torch.Tensor:
        """``tensor`` itself when the kernel can walk it alongside the parameter, else a copy
        (which then replaces it in the state dict)."""
        if self.compact and name != MASTER:
            if usable(self.state_format, name, self.params[k], tensor, layout_key):
                return tensor
            fresh = self._new_buffer(name, k)
            with torch.no_grad():
                fresh.copy_(tensor.detach().reshape(fresh.shape) if fresh.dim() == 1
                            else tensor.detach())
            return fresh
        if self._walkable(k, tensor):
            return tensor
        fresh = self._new_buffer(name, k)
        with torch.no_grad():
            fresh.copy_(tensor)
        return fresh

    def _walkable(self, k: int, tensor) -> bool:
        """Whether the kernel can walk this state tensor's memory alongside parameter ``k``."""
        return (type(tensor) in PLAIN_TYPES and tensor.device.type == "cpu"
                and tensor.dtype == self.state_dtype and not tensor.requires_grad
                and not tensor.is_neg() and layout_key(tensor) == self.keys[k]
                and tensor.data_ptr() % tensor.element_size() == 0)

    def _attach(self, k: int, name: str, tensor: torch.Tensor) -> None:
        self.dicts[k][name] = tensor
        self.tensors[name][k] = tensor
        bucket = self.bucket
        buffer, part = buffer_of(name)
        if part:  # a blockwise8 half: the engine's Blockwise8 once both halves are here
            codes, scales = (self.tensors[buffer + "_codes"][k],
                             self.tensors[buffer + "_scales"][k])
            if codes is None or scales is None:
                return
            array = blockwise(codes, scales, buffer)
        else:
            array = flat_array(tensor if self.memory_of is None else self.memory_of(tensor))
        if bucket.state[buffer] is None:
            bucket.set_state(buffer, [None] * self.count,
                             None if self.compact and buffer != MASTER else
                             self._flat_state(buffer))
        bucket.set_state_array(buffer, k, array)
        self.watch = None
        self.dirty = True

    def _flat_state(self, name: str):
        return None

    def _set_step(self, k: int, value: float) -> None:
        context, slot = self.context, self.slots[k]
        context.counts.set(slot, value)
        self.dicts[k]["step"] = context.step_tensor(slot)
        self.watch = None

    def _adopt(self, k: int, p_state: dict) -> None:
        """Take over existing state: the step moves into this parameter's slot (the same
        tensor when it is already the slot's), buffers are kept when the kernel can use them."""
        self.dicts[k] = p_state
        step = p_state.get("step", 0)
        if step is not self.context.step_tensor(self.slots[k]):
            self._set_step(k, float(step))
        if MASTER in p_state and not self.master_on:  # the parameter holds its nearest value
            del p_state[MASTER]
        if self.compact:
            self._quantize_dense(k, p_state)
        for name in self.names:
            buffer = buffer_of(name)[0]
            if name in p_state:
                self._attach(k, name, self._usable(name, k, p_state[name]))
            elif (buffer == "momentum_buffer" and self.momentum_on) or \
                    (buffer == "grad_avg" and self.centered_on) or \
                    (name == MASTER and self.master_on):
                self._attach(k, name, self._new_buffer(name, k))

    def _quantize_dense(self, k: int, p_state: dict) -> None:
        """Dense state of another precision (float32, from a torch checkpoint or a float32
        layout) becomes the group's compact format."""
        for name in STATE_BUFFERS:
            value = p_state.get(name)
            if value is None or (self.state_format == "bfloat16"
                                 and value.dtype == torch.bfloat16):
                continue
            del p_state[name]
            p_state.update(quantize(self.state_format, name, self.params[k], value))

    def _initialize(self, state, k: int) -> None:
        """State for a parameter's first step, created as torch creates it (step, square_avg,
        then momentum_buffer and grad_avg when used)."""
        self.dicts[k] = state[self.params[k]]
        self._set_step(k, 0.0)
        wanted = {"square_avg": True, "momentum_buffer": self.momentum_on,
                  "grad_avg": self.centered_on, MASTER: self.master_on}
        for name in self.names:
            if wanted[buffer_of(name)[0]]:
                self._attach(k, name, self._new_buffer(name, k))

    def set_precision(self, precision: tuple) -> None:
        """A 16-bit bucket's rounding options for the coming step: a master copy switched on
        starts at the parameters' values; switched off, it leaves the state (the parameters
        hold its nearest values)."""
        self.bucket.precision = precision
        master = precision[2]
        if master == self.master_on:
            return
        self.master_on = master
        with torch.no_grad():
            for k, p_state in enumerate(self.dicts):
                if p_state is None:
                    continue
                if master and self.tensors[MASTER][k] is None:
                    self._attach(k, MASTER, self._new_buffer(MASTER, k))
                elif not master:
                    p_state.pop(MASTER, None)
            if not master:
                self.tensors[MASTER] = [None] * self.count
                self.bucket.set_state(MASTER, None)
                self.watch = None
                self.dirty = True

    def switch_on(self, momentum: bool, centered: bool) -> None:
        """momentum / centered switched on after state was created: new buffers start at 0."""
        with torch.no_grad():
            self.momentum_on |= momentum
            self.centered_on |= centered
            for k, p_state in enumerate(self.dicts):
                if p_state is None:
                    continue
                for name in self.names:
                    buffer = buffer_of(name)[0]
                    on = (momentum if buffer == "momentum_buffer" else
                          centered if buffer == "grad_avg" else False)
                    if on and self.tensors[name][k] is None:
                        self._attach(k, name, self._new_buffer(name, k))

    def unchanged(self, state, dicts_unchanged: bool = False) -> bool:
        """The parameters lie where the views show (address, shape, strides), the state holds
        the tensors the views show (load_state_dict, or code that assigns into opt.state,
        replaces them) and those still hold the memory the views show (``.data =``,
        ``set_``). ``dicts_unchanged``: the plan saw that ``opt.state`` holds the very dicts
        of the last step, so the per-parameter lookup (a Python-level tensor hash each) can go."""
        if not self.layouts.unchanged(self._memory(self.params)):
            return False
        current = self.dicts if dicts_unchanged else list(map(state.get, self.params))
        if not all(map(same, current, self.dicts)):
            # Reading opt.state[p] makes an empty dict (a defaultdict): that is no change.
            for now, known in zip(current, self.dicts):
                if now is not known and (known is not None or now):
                    return False
        watch = self.watch
        if watch is None:  # state attached since the last check (nothing else ran meanwhile)
            watch = self._watch()
        try:
            for get, dicts, tensors, layouts in watch:
                if not all(map(same, map(get, dicts), tensors)):
                    return False
                if layouts is not None and not layouts.unchanged(self._memory(tensors)):
                    return False
        except KeyError:  # a state entry was deleted
            return False
        return True

    def _watch(self) -> list:
        """What :meth:`unchanged` compares the state with: per entry name, the dicts holding
        one, the tensors they held and those tensors' layouts, taken when they were attached."""
        watch = []
        slots = [(d, self.context.step_tensor(s)) for d, s in zip(self.dicts, self.slots)
                 if d is not None]
        watch.append((operator.itemgetter("step"), [d for d, _ in slots], [t for _, t in slots],
                      None))
        for name, tensors in self.tensors.items():
            kept = [(d, t) for d, t in zip(self.dicts, tensors) if t is not None]
            held = [t for _, t in kept]
            watch.append((operator.itemgetter(name), [d for d, _ in kept], held,
                          TensorLayouts(self._memory(held), addresses_only=True)))
        self.watch = watch
        return watch

    # -- the step ------------------------------------------------------------------------------

    def _initialize_present(self, state, present) -> None:
        with torch.no_grad():
            for k, here in enumerate(present):
                if here and self.dicts[k] is None:
                    self._initialize(state, k)

    def select(self, state, coeffs, dicts_unchanged: bool = False):
        """Phase one of a step: check the plan still holds, switch on buffers, initialise the
        state of parameters stepping for the first time and choose which parameters step.
        Returns the gradients of the chosen parameters, None when there are none, or STALE."""
        if not self.unchanged(state, dicts_unchanged):
            return STALE
        if (coeffs.uses_momentum and not self.momentum_on) or \
                (coeffs.centered and not self.centered_on):
            self.switch_on(coeffs.uses_momentum, coeffs.centered)
        grads = self._grads()
        # The usual case, every parameter with a gradient, is one C-level pass (`None in grads`
        # would compare tensors with ==).
        present = (self._all_present if all(map(is_not, grads, NONES))
                   else [g is not None for g in grads])
        if present != self.present:
            if not any(present):
                self.present = present
                return None
            self._initialize_present(state, present)
            self.bucket.select([k for k, here in enumerate(present) if here])
            self.present = present
        elif not any(present):
            return None
        if self.watch is None:
            self._watch()
        return self.bucket.chosen_grads(grads)

    def _grads(self) -> list:
        """Each parameter's gradient as the kernel reads it (None where there is none)."""
        return list(map(get_grad, self.params))

    def job(self, coeffs, module, grads, regions):
        """Phase two, after every bucket's phase one: the kernel job for the chosen gradients,
        ``(bucket, coefficients, module, gradients, addresses)``, with every gradient checked
        (layout, and no overlap with anything the step writes)."""
        chosen = self.bucket.chosen
        if not self.low_precision and not self.compact and \
                hasattr(module, "update_many_at_addresses"):
            addresses = self._grad_addresses(grads, chosen)
            if addresses is not None:
                self._check_overlap(grads, addresses, chosen, regions)
                return self.bucket, coeffs, module, grads, addresses  # grads: kept alive
        return self.bucket, coeffs, module, self._grad_arrays(grads, chosen, regions), None

    def _grad_addresses(self, grads, chosen):
        """The gradients' data addresses when every one is a dense, C-contiguous CPU tensor of
        the bucket's dtype and its parameter's element count (so it lies as the parameter's
        NumPy view does: torch gives a gradient its parameter's shape when it is assigned, and
        the count is the cheaper pass), else None for the checked path."""
        if not self.layouts.contiguous:
            return None
        sizes = self.layouts.sizes
        if chosen is not None:
            sizes = [sizes[k] for k in chosen]
        try:
            if not (list(map(get_dtype, grads)) == (self.torch_dtypes if chosen is None else
                                                    self.torch_dtypes[:len(grads)])
                    and list(map(numel, grads)) == sizes
                    and all(map(get_is_cpu, grads)) and all(map(is_contiguous, grads))
                    and not any(map(is_neg, grads))):
                return None
            addresses = np.fromiter(map(data_ptr, grads), np.uintp, len(grads))
        except RuntimeError:  # sparse layouts: is_contiguous or data_ptr refuses
            return None
        if (addresses & self.align_mask).any():  # memory from torch.frombuffer, say
            return None
        return addresses

    def _check_overlap(self, grads, addresses, chosen, regions) -> None:
        clean = self.clean
        if clean is not None and clean[0] is regions and np.array_equal(clean[1], addresses):
            return
        nbytes = self.nbytes if chosen is None else self.nbytes[chosen]
        suspects = regions.may_overlap(addresses, nbytes)
        if suspects.any():
            for j in np.flatnonzero(suspects).tolist():
                k = j if chosen is None else chosen[j]
                regions.check(f"the gradient of {self.label(k)}", flat_array(grads[j]))
        self.clean = (regions, addresses.copy())

    def _grad_arrays(self, grads, chosen, regions):
        """Flat arrays of gradients the fast check did not pass: checked one by one, read in
        place when their layout is the parameter's, copied otherwise (pairing elements by
        logical index, as torch does)."""
        out = []
        for j, g in enumerate(grads):
            k = j if chosen is None else chosen[j]
            p = self.local[k]
            if g.layout != torch.strided:
                raise RuntimeError(SPARSE)
            if g.shape != p.shape:
                raise RuntimeError(f"the gradient of {self.label(k)} has shape {tuple(g.shape)} "
                                   f"but the parameter has shape {tuple(p.shape)}")
            if g.device.type != "cpu":
                raise RuntimeError(f"the gradient of {self.label(k)} is on {g.device}, its "
                                   f"parameter on the CPU")
            g = g.detach()
            if g.is_neg() or g.is_conj():
                g = g.resolve_conj().resolve_neg()
            # A 16-bit parameter's float32 gradient is read as it is (not rounded first).
            wide = self.low_precision and g.dtype == torch.float32
            if (g.dtype != p.dtype and not wide) or layout_key(g) != self.keys[k] or \
                    g.data_ptr() % g.element_size():
                with torch.no_grad():
                    g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
            array = flat_array(g)
            regions.check(f"the gradient of {self.label(k)}", array)
            out.append(array)
        return out

    def written_names(self) -> list[tuple[np.ndarray, str]]:
        """(array, description) for everything a step of this bucket writes."""
        out = []
        for k, array in enumerate(self.bucket.params):
            out.append((array, f"parameter {self.label(k)}"))
        for name, arrays in self.bucket.state.items():
            for k, array in enumerate(arrays or ()):
                if array is None:
                    continue
                parts = ([(array.codes, "_codes"), (array.scales, "_scales")]
                         if hasattr(array, "codes") else [(array, "")])
                for part, suffix in parts:
                    out.append((part, f"the {name}{suffix} of parameter {self.label(k)}"))
        return out
