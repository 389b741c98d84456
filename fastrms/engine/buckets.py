"""Buckets: the parameters of one (parameter group, dtype) pair as the kernels see them, with their
state buffers and step counts, stepped by one multi-tensor kernel call.

A bucket holds NumPy arrays only (a front end gives it zero-copy views of its own objects), so the
same bucket serves ``fastrms.RMSprop``'s arrays, ``fastrms.torch.RMSprop``'s tensors and the
sharded optimizer's shards. Two layouts:

- *list*: one array per parameter and per state buffer; a step is one ``update_many`` call (or
  ``update_many_at_addresses`` when the backend takes gradient addresses).
- *flat*: the parameters, their gradients and each state buffer are consecutive ranges of one flat
  buffer each (:class:`fastrms.FlatParams`, or ``fastrms.torch.RMSprop(flatten=True)``); a step is
  one ``update`` over the flat buffers.

A bucket may step only some of its parameters (a torch parameter whose ``.grad`` is None):
:meth:`Bucket.select` fixes which, and the lists handed to the kernel are built once per selection.

A float16 / bfloat16 bucket keeps float32 state (and, with master weights, a float32 copy of its
parameters, the ``"master_param"`` state buffer) and steps through the backend's
``update_many_low_precision`` (``update_low_precision`` for a flat bucket rounding to nearest),
with the rounding options of :mod:`.precision`.

A bucket with compact state (``state_format`` ``"bfloat16"`` or ``"blockwise8"``, float32 or
16-bit parameters) holds bfloat16 arrays or :class:`~fastrms.Blockwise8` buffers as its state
and steps through the backend's ``update_compact`` (:mod:`.compact`).
"""
from __future__ import annotations

import numpy as np

from .._codecs import FLOAT32
from .._validation import is_kernel_ready
from ..backends import compact_module
from .compact import DEFAULT_STATE_FORMAT, new_states, run_compact, state_arrays
from .precision import MASTER, is_low_precision, key_bases, step_keys

STATE_BUFFERS = ("square_avg", "momentum_buffer", "grad_avg")
OPTIONAL_BUFFERS = ("momentum_buffer", "grad_avg")
_STREAMS = ("param",) + STATE_BUFFERS
_ALL = slice(None)
_add = np.add


class StepCounts:
    """Per-parameter step counts in arrays that never move, so that a view of one count (torch's
    ``state[p]["step"]``) stays live for the optimizer's lifetime, whatever is re-planned.

    A parameter gets a slot once (:meth:`slot`); buckets increment their slots together.
    """

    __slots__ = ("dtype", "one", "chunks", "_free", "_chunk_size")

    def __init__(self, dtype, chunk_size: int = 1024):
        self.dtype = np.dtype(dtype)
        self.one = self.dtype.type(1)
        self.chunks: list[np.ndarray] = []
        self._chunk_size = chunk_size
        self._free = 0  # next free slot in the last chunk

    def new_slot(self) -> tuple[int, int]:
        """A fresh slot, at zero: ``(chunk index, position)``."""
        if not self.chunks or self._free == self.chunks[-1].size:
            self.chunks.append(np.zeros(self._chunk_size, self.dtype))
            self._free = 0
        slot = (len(self.chunks) - 1, self._free)
        self._free += 1
        return slot

    def view(self, slot: tuple[int, int]) -> np.ndarray:
        """The 0-d array view of one count (writing it sets the count)."""
        chunk, position = slot
        return self.chunks[chunk][position:position + 1].reshape(())

    def get(self, slot):
        chunk, position = slot
        return self.chunks[chunk][position].item()

    def set(self, slot, value) -> None:
        chunk, position = slot
        self.chunks[chunk][position] = value

    def groups(self, slots) -> list[tuple[np.ndarray, object]]:
        """``slots`` as ``(array, positions)`` pairs, for :meth:`Bucket.advance`: a view of the
        consecutive positions and ``slice(None)`` where they are consecutive (the usual case, and
        the cheapest ``+=``), else the chunk and an index array."""
        by_chunk: dict[int, list[int]] = {}
        for chunk, position in slots:
            by_chunk.setdefault(chunk, []).append(position)
        out = []
        for c, positions in by_chunk.items():
            lo = positions[0]
            if positions == list(range(lo, lo + len(positions))):
                out.append((self.chunks[c][lo:lo + len(positions)], _ALL))
            else:
                out.append((self.chunks[c], np.array(positions, dtype=np.intp)))
        return out


class Bucket:
    """The parameters of one (group, dtype) pair, their state and their step counts.

    ``params``: the arrays the kernel updates, one per parameter (C-contiguous views as a rule;
    the list layout also takes strided ones, updated through copies). ``state[name]``: a list of
    per-parameter arrays, or None while that buffer is off. ``flat``: the flat buffers of the
    flat layout (``"param"``, ``"grad"`` and each state buffer), all None in the list layout.
    ``slots``: each parameter's slot in ``counts`` (a :class:`StepCounts`).

    16-bit buckets: ``state_dtype`` is float32 (else the parameters' dtype); ``ids`` are the
    parameters' ids in their optimizer (they pick the stochastic rounding streams, see
    :mod:`.precision`; default 0, 1, ...); ``precision`` is ``(param_rounding, seed,
    master_weights)`` for the next run, set by :meth:`Engine.plan
    <fastrms.engine.Engine.plan>`.

    ``state_format``: ``"float32"`` (the state has ``state_dtype``) or a compact format, whose
    per-parameter state entries are bfloat16 arrays or Blockwise8 buffers (:mod:`.compact`).
    """

    __slots__ = ("group", "dtype", "params", "count", "offsets", "size", "state", "flat",
                 "unready", "caches", "counts", "slots", "_step_groups", "chosen", "_lists",
                 "state_dtype", "low_precision", "ids", "precision", "_bases", "state_format",
                 "compact", "_special")

    def __init__(self, group: int, dtype, params: list, counts: StepCounts, slots: list,
                 flat_param=None, flat_grad=None, ids=None,
                 state_format: str = DEFAULT_STATE_FORMAT):
        self.group = group
        self.dtype = np.dtype(dtype)
        self.low_precision = is_low_precision(self.dtype)
        self.state_format = state_format
        self.compact = state_format != DEFAULT_STATE_FORMAT
        #: Not the plain float32 / float64 step (one test in run()).
        self._special = self.low_precision or self.compact
        self.state_dtype = FLOAT32 if self.low_precision else self.dtype
        self.ids = list(range(len(params))) if ids is None else list(ids)
        self.precision = ("nearest", 0, False)
        self._bases = None  # (seed, key bases of self.ids)
        self.params = list(params)
        self.count = len(self.params)
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.size)
        self.offsets = offsets
        self.size = offsets[-1]
        self.state: dict[str, list | None] = dict.fromkeys(STATE_BUFFERS + (MASTER,))
        self.flat: dict[str, np.ndarray | None] = dict.fromkeys(_STREAMS + ("grad", MASTER))
        self.flat["param"], self.flat["grad"] = flat_param, flat_grad
        #: Positions of parameters the kernels cannot take as they are (strided or misaligned).
        self.unready = [k for k, p in enumerate(self.params) if not is_kernel_ready(p)]
        #: update_many function -> the dict it may keep conversions of our lists in.
        self.caches: dict = {}
        self.counts = counts
        self.slots = list(slots)
        self._step_groups = counts.groups(self.slots)
        #: Positions of the parameters that step (None: all of them); see select().
        self.chosen: list[int] | None = None
        self._lists = None

    @property
    def is_flat(self) -> bool:
        return self.flat["param"] is not None

    # -- state -------------------------------------------------------------------------------

    def allocate(self, name: str, fill) -> None:
        """A new state buffer at ``fill``: one flat buffer, with a view per parameter (compact
        state: bfloat16 views of one flat buffer, or one Blockwise8 per parameter)."""
        if self.compact and name != MASTER:
            arrays, flat = new_states(self.state_format, name, [p.shape for p in self.params],
                                      fill)
            self.set_state(name, arrays, flat)
            return
        buffer = np.full(self.size, fill, self.state_dtype)
        self.set_state(name, [buffer[lo:hi].reshape(p.shape) for lo, hi, p in
                              zip(self.offsets, self.offsets[1:], self.params)], buffer)

    def allocate_initial(self, group, always_momentum: bool = False) -> None:
        """The state a new bucket starts with, from its parameter group (a mapping with the
        :data:`~fastrms.engine.HYPERPARAMETERS`): ``square_avg`` at ``initial_square_avg``, and
        zero ``momentum_buffer`` (when momentum is on, or always with ``always_momentum``) and
        ``grad_avg`` (when centered). ``ValueError`` when the initial value overflows the dtype;
        nothing is allocated then. A 16-bit bucket of a group with ``master_weights`` gets its
        float32 master copy."""
        with np.errstate(over="ignore"):
            initial = self.state_dtype.type(group["initial_square_avg"])
        if not np.isfinite(initial):
            raise ValueError(f"param_groups[{self.group}]: initial_square_avg too large for "
                             f"{self.dtype}")
        self.allocate("square_avg", initial)
        if group["momentum"] != 0 or always_momentum:
            self.allocate("momentum_buffer", 0.0)
        if group["centered"]:
            self.allocate("grad_avg", 0.0)
        if self.low_precision and group.get("master_weights", False):
            self.allocate_master()

    def allocate_master(self) -> None:
        """The float32 master copy of a 16-bit bucket, from the parameters' values (exact)."""
        if self.is_flat:
            buffer = self.flat["param"].astype(FLOAT32)
        else:
            buffer = np.empty(self.size, FLOAT32)
            for lo, hi, p in zip(self.offsets, self.offsets[1:], self.params):
                buffer[lo:hi] = p.reshape(-1)
        self.set_state(MASTER, [buffer[lo:hi].reshape(p.shape) for lo, hi, p in
                                zip(self.offsets, self.offsets[1:], self.params)], buffer)

    def set_state(self, name: str, arrays: list | None, flat=None) -> None:
        """Install (or, with None, drop) a state buffer: per-parameter arrays and, in the flat
        layout, the flat buffer they are views of."""
        self.state[name] = arrays
        self.flat[name] = flat
        self._forget_lists()

    def set_state_array(self, name: str, k: int, array: np.ndarray) -> None:
        """Replace parameter ``k``'s array of one state buffer (list layout)."""
        self.state[name][k] = array
        self._forget_lists()

    def set_param_array(self, k: int, array: np.ndarray) -> None:
        self.params[k] = array
        self.unready = [j for j, p in enumerate(self.params) if not is_kernel_ready(p)]
        self._forget_lists()

    def _forget_lists(self) -> None:
        self.caches.clear()
        self._lists = None

    def written(self) -> list[np.ndarray]:
        """Every array a step of this bucket writes."""
        out = [p for p in self.params if p.size]
        for arrays in self.state.values():
            if arrays is not None:  # entries are None for parameters that have no state yet
                if self.compact:
                    out.extend(part for a in arrays if a is not None
                               for part in state_arrays(a) if part.size)
                else:
                    out.extend(a for a in arrays if a is not None and a.size)
        return out

    def step_count(self, k: int = 0):
        return self.counts.get(self.slots[k])

    # -- which parameters step -----------------------------------------------------------------

    def select(self, chosen: list[int] | None) -> None:
        """Step only the parameters at positions ``chosen`` (None: all of them)."""
        if chosen is not None and len(chosen) == self.count:
            chosen = None
        if chosen != self.chosen:
            self.chosen = chosen
            self._forget_lists()

    def _kernel_lists(self) -> dict:
        """The lists the kernel call takes for the current selection (new list objects whenever
        they change: a backend may cache conversions by list identity)."""
        lists = self._lists
        if lists is None:
            chosen = self.chosen
            if self.is_flat and self.low_precision:  # one view per parameter (its own key)
                ks = range(self.count) if chosen is None else chosen
                lists = {name: (None if flat is None else
                                [flat[self.offsets[k]:self.offsets[k + 1]] for k in ks])
                         for name, flat in self.flat.items()}
            elif self.is_flat:
                runs = self._runs()
                lists = {name: (None if flat is None else [flat[lo:hi] for lo, hi in runs])
                         for name, flat in self.flat.items()}
            else:
                def pick(items):
                    if items is None:
                        return None
                    return list(items) if chosen is None else [items[k] for k in chosen]
                lists = {"param": pick(self.params)}
                lists.update((name, pick(arrays)) for name, arrays in self.state.items())
            if chosen is None:
                lists["steps"] = self._step_groups
            else:
                lists["steps"] = self.counts.groups([self.slots[k] for k in chosen])
            self._lists = lists
        return lists

    def _runs(self) -> list[tuple[int, int]]:
        """Consecutive chosen parameters as ranges of the flat buffers."""
        chosen = range(self.count) if self.chosen is None else self.chosen
        runs: list[list[int]] = []
        for k in chosen:
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if runs and runs[-1][1] == lo:
                runs[-1][1] = hi
            else:
                runs.append([lo, hi])
        return [(lo, hi) for lo, hi in runs]

    # -- the step ------------------------------------------------------------------------------

    def chosen_grads(self, grads: list) -> list:
        return grads if self.chosen is None else [grads[k] for k in self.chosen]

    def run(self, coeffs, module, grads=None, addresses=None) -> None:
        """One kernel call for the chosen parameters. List layout: ``grads`` are arrays of the
        chosen parameters (checked by the front end), or ``addresses`` their data addresses (an
        ``np.uintp`` array) for a backend with ``update_many_at_addresses``. The flat layout
        reads the flat gradient buffer."""
        if self._special:
            if self.compact:
                run_compact(self, coeffs, module, grads)
            else:
                self._run_low_precision(coeffs, module, grads)
            return
        momentum = coeffs.uses_momentum
        centered = coeffs.centered
        flat = self.flat
        if flat["param"] is not None and self.chosen is None:
            arrays = (flat["param"], flat["grad"], flat["square_avg"],
                      flat["momentum_buffer"] if momentum else None,
                      flat["grad_avg"] if centered else None)
            if not module.update_if_ready(coeffs, *arrays):
                module.update(coeffs, *arrays)
            return
        lists = self._kernel_lists()
        if flat["param"] is not None:
            grads, addresses = lists["grad"], None
        optional = (lists["momentum_buffer"] if momentum else None,
                    lists["grad_avg"] if centered else None)
        update_many = getattr(module, "update_many_at_addresses", None) \
            if addresses is not None else None
        if update_many is None:
            update_many, taken = module.update_many, grads
        else:
            taken = addresses
        self._call(update_many, coeffs, lists["param"], (taken, lists["square_avg"], *optional))

    def _call(self, update_many, coeffs, params: list, rest: tuple) -> None:
        """``update_many(coeffs, params, *rest)``. Parameters the kernels cannot take as they
        are (``self.unready``) go as C-contiguous copies, written back after. Otherwise our
        lists are the same objects every step (they change only through this class), so the
        backend gets a cache in which to keep what it converts them to."""
        unready = self.unready if self.chosen is None else ()
        if unready:
            params = list(params)
            for k in unready:
                params[k] = np.array(params[k], order="C", copy=True)
            update_many(coeffs, params, *rest)
            for k in unready:
                self.params[k][...] = params[k]
            return
        cache = self.caches.get(update_many)
        if cache is None:
            cache = self.caches[update_many] = {}
        update_many(coeffs, params, *rest, cache=cache)

    def _run_low_precision(self, coeffs, module, grads) -> None:
        """:meth:`run` for a float16 / bfloat16 bucket, rounding as ``self.precision`` says."""
        stochastic = self.precision[0] == "stochastic"
        optional = (coeffs.uses_momentum, coeffs.centered)
        flat = self.flat
        if flat["param"] is not None and self.chosen is None and not stochastic:
            module.update_low_precision(
                coeffs, flat["param"], flat["grad"], flat["square_avg"],
                flat["momentum_buffer"] if optional[0] else None,
                flat["grad_avg"] if optional[1] else None, flat[MASTER], None)
            return
        lists = self._kernel_lists()
        if flat["param"] is not None:
            grads = lists["grad"]
        keys = self.keys(self.precision[1]) if stochastic else None
        self._call(module.update_many_low_precision, coeffs, lists["param"],
                   (grads, lists["square_avg"], lists["momentum_buffer"] if optional[0] else None,
                    lists["grad_avg"] if optional[1] else None, lists[MASTER], keys))

    def keys(self, seed: int) -> np.ndarray:
        """The stochastic rounding keys (uint64) of the chosen parameters for the step they
        take next: parameter id ``i`` at its 1-based step ``t`` (see :mod:`.precision`)."""
        bases = self._bases
        if bases is None or bases[0] != seed:
            bases = self._bases = (seed, key_bases(seed, self.ids))
        chosen = self.chosen
        slots = self.slots if chosen is None else [self.slots[k] for k in chosen]
        steps = np.fromiter((self.counts.get(slot) for slot in slots), np.uint64, len(slots))
        return step_keys(bases[1] if chosen is None else bases[1][chosen], steps + np.uint64(1))

    def run_range(self, coeffs, module, lo: int, hi: int, grad: np.ndarray) -> None:
        """One kernel call for elements ``[lo, hi)`` of a flat bucket's buffers, reading ``grad``
        (``hi - lo`` elements) in place of that range of the flat gradient buffer. For a front
        end whose gradients arrive piece by piece: the sharded optimizer updates each piece of
        its shard as that piece's reduced gradient arrives. Steps are counted apart
        (:meth:`advance`), once per step however many ranges it ran. A 16-bit bucket rounds to
        nearest (``grad``: its dtype or float32), on its master copy when it has one. Compact
        state: bfloat16 only (a blockwise8 range would have to start on a block)."""
        flat = self.flat
        arrays = (flat["param"][lo:hi], grad, flat["square_avg"][lo:hi],
                  flat["momentum_buffer"][lo:hi] if coeffs.uses_momentum else None,
                  flat["grad_avg"][lo:hi] if coeffs.centered else None)
        master = flat[MASTER]
        if self.compact:  # bfloat16 state (one flat buffer per state buffer, as the params)
            compact_module(module).update_compact(
                coeffs, *arrays, None if master is None else master[lo:hi], None)
        elif self.low_precision:  # rounding to nearest: a range has no stochastic stream
            module.update_low_precision(coeffs, *arrays,
                                        None if master is None else master[lo:hi], None)
        elif not module.update_if_ready(coeffs, *arrays):
            module.update(coeffs, *arrays)

    def advance(self) -> None:
        """Count one step for each chosen parameter."""
        groups = self._step_groups if self.chosen is None else self._kernel_lists()["steps"]
        one = self.counts.one
        for chunk, positions in groups:
            if positions is _ALL:  # a view of consecutive counts: a ufunc call, half the cost
                _add(chunk, one, out=chunk)
            else:
                chunk[positions] += one
